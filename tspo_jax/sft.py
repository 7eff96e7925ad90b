"""Supervised warm start (SFT): fine-tune a policy on demonstrated search-agent trajectories before RL.

    python -m tspo_jax.sft --gin_file=configs/experiments/sft_demo.gin [--gin_file=…] [--gin.NAME=VALUE …]

The demonstrations (JSONL, tspo_jax.data.trajectories) are rendered into exactly the token streams the RL agent
produces, with the run's tokenizer, chat template, prompt template and agent limits; the loss is next-token
cross-entropy on the policy's own tokens only (observation and prompt tokens have loss_mask 0), averaged over
them. Same machinery as RL: gin configs (`sft.*`, with the RL run's ModelSpec / RolloutSpec / OptimizerSpec /
MeshSpec / CheckpointSpec), a Grain data stream, Orbax checkpoints that resume exactly (params, optimizer state,
data iterator), metrics.jsonl + TensorBoard + a progress line, SIGTERM saves and exits, and optional greedy
evaluation with the RL agent against a retrieval service. At the end the policy is exported as a Hugging Face
directory, `RUN_DIR/hf`, which an RL run starts from with `ModelSpec.checkpoint = 'RUN_DIR/hf'`.

One SFT step: a batch of demonstrations → rendered, padded [B, T] → one AdamW update (micro-batches accumulated).
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import signal
import sys
import time
from collections.abc import Sequence

import jax
from flax import nnx

from tspo_jax import metrics as names
from tspo_jax import run_files
from tspo_jax.checkpoint import CheckpointError, RunCheckpoints
from tspo_jax.data import eval_batches
from tspo_jax.data.trajectories import TrajectoryDataError
from tspo_jax.models.hf_io import export_hf_checkpoint
from tspo_jax.rollout.sampling import SamplingConfig
from tspo_jax.training import bootstrap, gin_config, multihost
from tspo_jax.training.errors import NonFiniteUpdates, StartupError
from tspo_jax.training.evaluation import greedy_eval
from tspo_jax.training.optimizer import learning_rate_schedule, make_optimizer
from tspo_jax.training.policy import make_mesh, open_policy, tiny_model_dir
from tspo_jax.training.qa_data import open_qa_data
from tspo_jax.training.retrieval import connect_retrieval
from tspo_jax.training.rollouts import build_agent, engine_slots, rollout_prompts
from tspo_jax.training.session import NonFiniteGuard, exit_on_sigterm
from tspo_jax.training.sft_data import DemonstrationRenderer, open_demonstrations, sft_batches
from tspo_jax.training.update import SupervisedUpdate

log = logging.getLogger("tspo_jax.sft")

NLL = "sft/nll"
ENTROPY = "sft/entropy"


class SFTTrainer:
    """One SFT run: demonstrations, policy, optimizer state, checkpoints, and (optionally) the eval agent."""

    def __init__(self, exp):
        self.exp = exp
        try:
            self.run_dir, self.local_dir = run_files.open_run_dirs(exp.run_dir, exp.local_dir, program="sft")
        except run_files.RunFilesError as error:
            raise StartupError(str(error)) from None
        self._stack = contextlib.ExitStack()
        signal.signal(signal.SIGTERM, exit_on_sigterm)  # until the loop can save, SIGTERM just unwinds
        try:
            self._setup()
        except BaseException:
            self._stack.close()
            raise

    # ----- set-up (fail-fast order: config → model → data → eval services → checkpoint) ------------------------
    def _setup(self) -> None:
        exp = self.exp
        if jax.process_index() == 0:
            gin_config.write_config(self.run_dir)
        self.policy = self._open_policy()
        self._open_data()
        self._open_eval()
        mesh, rules = self.policy.mesh, self.policy.rules
        micro = exp.micro_batch_size or exp.batch_size // jax.process_count()
        try:
            self.update = SupervisedUpdate(
                self.policy.graphdef, self.policy.abstract_params,
                optimizer=make_optimizer(exp.optimizer, exp.num_steps),
                schedule=learning_rate_schedule(exp.optimizer, exp.num_steps), mesh=mesh, rules=rules,
                micro_batch_size=micro, logprob_chunk_size=exp.model.logprob_chunk_size)
        except ValueError as error:
            raise StartupError(f"sft.micro_batch_size / MeshSpec: {error}") from None
        self.nonfinite = NonFiniteGuard(3)
        self.checkpoints = RunCheckpoints.for_run(exp.checkpoints, self.run_dir)
        self._stack.callback(self.checkpoints.close)
        self._restore_or_initialize()
        if jax.process_index() == 0:
            self.metrics_log = names.MetricsLog(self.run_dir, resume_step=self.start_step)
            self._stack.callback(self.metrics_log.close)
        self.checkpoints.install_sigterm_handler()

    def _open_policy(self):
        exp, spec = self.exp, self.exp.model
        if spec.checkpoint is None:
            model_dir = tiny_model_dir(spec, run_dir=self.run_dir, local_dir=self.local_dir, seed=exp.seed,
                                       texts=bootstrap.demo_tokenizer_texts())
        else:
            model_dir = spec.checkpoint
        mesh, rules = make_mesh(exp.mesh)
        return open_policy(spec, model_dir, mesh, rules)

    def _open_data(self) -> None:
        exp = self.exp
        files = list(exp.train_files)
        if exp.demo_demonstrations:
            with multihost.process_zero_first("demonstrations"):
                files = [bootstrap.demo_demonstrations(self.local_dir / "demonstrations.jsonl",
                                                       count=exp.demo_demonstrations, seed=exp.seed,
                                                       config=exp.demonstrations)]
        self.renderer = DemonstrationRenderer(self.policy.tokenizer, template=exp.rollout.prompt_template,
                                              agent=exp.rollout.agent)
        try:
            sources = open_demonstrations(files, self.renderer)
            self.data = sft_batches(sources, self.renderer, batch_size=exp.batch_size, seed=exp.seed,
                                    pad_id=self.policy.pad_id, min_length=exp.min_sequence_length,
                                    max_length=exp.rollout.agent.max_context_tokens,
                                    process_index=jax.process_index(), process_count=jax.process_count())
        except TrajectoryDataError as error:
            raise StartupError(f"demonstrations: {error}") from None
        except ValueError as error:
            raise StartupError(f"sft.batch_size: {error}") from None

    def _open_eval(self) -> None:
        exp = self.exp
        self.eval_agent = None
        if exp.eval_data is None or not (exp.eval_every or exp.eval_at_start):
            return
        qa = open_qa_data(exp.eval_data, local_dir=self.local_dir, require_train=False)
        self.eval_sources = qa.eval_sources
        retrieval = connect_retrieval(exp.retrieval, self._stack, local_dir=self.local_dir,
                                      demo_corpus=qa.demo_paths and qa.demo_paths["corpus"])
        self.eval_batch_size = engine_slots(exp.batch_size, self.policy.mesh, self.policy.rules)
        self.eval_agent = build_agent(self.policy, exp.rollout, retrieval, top_k=exp.retrieval.top_k,
                                      slots=self.eval_batch_size, sampling=SamplingConfig(temperature=0.0))

    def _abstract_state(self) -> dict:
        opt = jax.eval_shape(self.update.optimizer.init, self.policy.abstract_params)
        opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt,
                           self.update.opt_shardings)
        return {"params": self.policy.abstract_params, "opt_state": opt}

    def _restore_or_initialize(self) -> None:
        try:
            restored = self.checkpoints.restore_latest(self._abstract_state())
        except CheckpointError as error:
            raise StartupError(str(error)) from None
        if restored is None:
            self.params = nnx.state(self.policy.load())
            self.opt_state = self.update.init_optimizer(self.params)
            self.start_step = 0
            log.info("starting SFT in %s from %s", self.run_dir, self.policy.model_dir)
            return
        step, state, meta = restored
        if step > self.exp.num_steps:
            raise StartupError(f"checkpoint {self.checkpoints.step_path(step)} is past sft.num_steps="
                               f"{self.exp.num_steps}; raise num_steps to continue this run")
        self.params, self.opt_state = state["params"], state["opt_state"]
        self.data.set_state(meta["data_iterator"])
        self.start_step = step
        log.info("resumed SFT from %s (step %d of %d)", self.checkpoints.step_path(step), step, self.exp.num_steps)

    # ----- the loop --------------------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One optimizer update on the next batch of demonstrations; returns its metrics."""
        tick = time.perf_counter()
        batch = next(self.data)
        self.params, self.opt_state, result = self.update.update(self.params, self.opt_state, batch)
        self.nonfinite.record(result.applied, result.metrics, str(self.checkpoints.directory))
        seconds = time.perf_counter() - tick
        tokens = float(batch["attention_mask"].sum()) * jax.process_count()
        return {NLL: result.metrics["nll"], ENTROPY: result.metrics["entropy"],
                names.GRAD_NORM: result.metrics["grad_norm"], names.LEARNING_RATE: result.metrics["learning_rate"],
                names.SKIPPED_UPDATES: float(not result.applied), "sft/loss_tokens": result.metrics["tokens"],
                "sft/sequence_length": float(batch["tokens"].shape[1]), names.TIME_STEP: seconds,
                "throughput/tokens_per_s": tokens / seconds}

    def evaluate(self) -> dict[str, float]:
        """Greedy EM of the current policy with the RL agent (per data_source and overall)."""
        params = self.eval_agent.engine.load_params(self.params)
        batches = eval_batches(self.eval_sources, batch_size=self.eval_batch_size, process_index=jax.process_index(),
                               process_count=jax.process_count(),
                               limit_per_source=self.exp.eval_data.eval_limit_per_source)
        prompts = lambda examples: rollout_prompts(self.policy.tokenizer, examples,  # noqa: E731
                                                   template=self.exp.rollout.prompt_template)
        result = greedy_eval(self.eval_agent, params, batches, prompts=prompts, scoring=self.exp.scoring)
        out = result.metrics()
        log.info("eval: %s", ", ".join(f"{k} {v:.3f}" for k, v in out.items() if k.endswith("/em")))
        return out

    def run(self) -> pathlib.Path | None:
        """Trains to num_steps (or until SIGTERM); exports the final policy; returns the export directory (None
        when stopped early)."""
        exp = self.exp
        start = self.start_step
        progress = names.ProgressLine(exp.num_steps, start_step=start)
        try:
            if start == 0 and exp.eval_at_start and self.eval_agent is not None:
                self.log_metrics(0, self.evaluate())
            for step in range(start + 1, exp.num_steps + 1):
                metrics = self.step()
                last = step == exp.num_steps
                if self.eval_agent is not None and exp.eval_every and (last or step % exp.eval_every == 0):
                    metrics.update(self.evaluate())
                self.log_metrics(step, metrics)
                progress.update(step, metrics)
                if step == start + 1 and jax.process_index() == 0:
                    gin_config.write_config(self.run_dir, operative=True)
                stop = multihost.any_process(self.checkpoints.preempted)
                self.checkpoints.save(step, {"params": self.params, "opt_state": self.opt_state},
                                      {"step": step, "data_iterator": self.data.get_state()}, force=last or stop)
                if stop and not last:
                    self.checkpoints.wait()
                    log.warning("stopping after step %d on SIGTERM: saved checkpoint %s", step,
                                self.checkpoints.step_path(step))
                    return None
            self.checkpoints.wait()
            return self.export()
        finally:
            self._stack.close()

    def export(self) -> pathlib.Path:
        """The trained policy as a Hugging Face directory (RUN_DIR/hf; local_dir/hf for a gs:// RUN_DIR)."""
        base = self.local_dir if run_files.is_remote(self.run_dir) else pathlib.Path(str(self.run_dir))
        out = base / "hf"
        export_hf_checkpoint(nnx.merge(self.policy.graphdef, self.params), self.policy.cfg, out)
        if jax.process_index() == 0:
            self.policy.tokenizer.save_pretrained(out)
        return out

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if jax.process_index() == 0:
            self.metrics_log.write(step, metrics)


# ----------------------------------------------------------------------------------------------------------------
def load_experiment(flags: gin_config.GinFlags):
    """Parses and checks every gin file and binding, then builds the SFTExperiment (no work is done)."""
    from tspo_jax import configurables

    return gin_config.build(flags, configurables.sft)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in ("absl", "fsspec", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    flags, rest = gin_config.split_gin_flags(sys.argv[1:] if argv is None else argv)
    if rest:
        print(f"error: unknown arguments {rest} (gin flags: --gin_file F, --gin.NAME=VALUE, --gin_bindings "
              "'NAME = VALUE', --gin_search_path DIR)", file=sys.stderr)
        return 2
    try:
        experiment = load_experiment(flags)
        trainer = SFTTrainer(experiment)
    except (gin_config.GinConfigError, StartupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        out = trainer.run()
    except NonFiniteUpdates as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    if jax.process_index() == 0 and out is not None:
        print(f"done: checkpoints in {trainer.checkpoints.directory}\n"
              f"      metrics in {trainer.run_dir / 'metrics.jsonl'}\n"
              f"      the policy as a Hugging Face directory in {out} (ModelSpec.checkpoint of an RL run)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
