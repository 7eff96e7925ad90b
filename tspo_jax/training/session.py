"""The state and services of one training run, set up in fail-fast order:

    config files → data files → retrieval service → model + tokenizer → checkpoint (resume) → engines + agents

so a missing data file or an unreachable service stops the run in seconds, before a model is loaded, each with a
message naming the culprit. RUN_DIR may be local or gs:// (tspo_jax.run_files); on several processes
(`jax.distributed`) each process holds its own slice of every step's prompts and its own rollout engine on its
local devices (tspo_jax.training.multihost), and everything written once is written by process 0. The RL step
itself is `tspo_jax.train.Trainer.step`; this module holds what it uses.

The set-up pieces other entry points share live in their own modules: qa_data (QA files / demo world),
retrieval (connect or start the service), policy (tokenizer, config, mesh, weights), rollouts (engine + agent,
prompts), evaluation (greedy eval and per-example records), errors.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import signal

import jax
import numpy as np
from flax import nnx

from retrieval_service.client import RetrievalError
from tspo_jax import metrics as names
from tspo_jax import run_files
from tspo_jax.checkpoint import CheckpointError, RunCheckpoints
from tspo_jax.data import eval_batches, training_batches
from tspo_jax.rewards import query_similarity_shaping
from tspo_jax.rollout.agent import RolloutPrompt, SearchAgent
from tspo_jax.rollout.engine import Engine
from tspo_jax.rollout.sampling import SamplingConfig
from tspo_jax.training import bootstrap, gin_config, multihost
from tspo_jax.training.errors import NonFiniteUpdates, StartupError
from tspo_jax.training.evaluation import greedy_eval
from tspo_jax.training.optimizer import learning_rate_schedule, make_optimizer
from tspo_jax.training.policy import make_mesh, open_policy, tiny_model_dir
from tspo_jax.training.qa_data import open_qa_data
from tspo_jax.training.retrieval import connect_retrieval
from tspo_jax.training.rollouts import build_agent, engine_slots, rollout_prompts
from tspo_jax.training.update import PolicyUpdate

__all__ = ["NonFiniteGuard", "NonFiniteUpdates", "StartupError", "TrainingSession"]

log = logging.getLogger("tspo_jax.train")

# Update metric (from the loss and the jitted update) -> logged name.
_UPDATE_NAMES = {
    "policy_loss": names.POLICY_LOSS, "kl": names.KL, "entropy": names.ENTROPY,
    "clip_fraction": names.CLIP_FRACTION, "grad_norm": names.GRAD_NORM, "learning_rate": names.LEARNING_RATE,
    "loss": "loss/total", "ppo_kl": "loss/ppo_kl", "dual_clip_fraction": "loss/dual_clip_fraction",
    "ratio_mean": "loss/ratio_mean", "ratio_min": "loss/ratio_min", "ratio_max": "loss/ratio_max",
}


def exit_on_sigterm(signum, frame):
    """Until a run's loop can save a checkpoint, SIGTERM just unwinds (closing what set-up opened)."""
    raise SystemExit(128 + signum)


class NonFiniteGuard:
    """Counts skipped (non-finite) updates in a row; too many stop the run."""

    def __init__(self, max_in_a_row: int, in_a_row: int = 0):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = in_a_row

    def record(self, applied: bool, metrics: dict, where: str) -> None:
        if applied:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        log.warning("non-finite loss or gradient (loss %s, grad norm %s): update skipped (%d in a row)",
                    metrics.get("loss"), metrics.get("grad_norm"), self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteUpdates(f"{self.in_a_row} non-finite updates in a row (UpdateSpec.max_nonfinite_in_a_row="
                                   f"{self.max_in_a_row}); the last checkpoint is in {where}")


class TrainingSession:
    def __init__(self, exp):
        self.exp = exp
        try:
            self.run_dir, self.local_dir = run_files.open_run_dirs(exp.run_dir, exp.local_dir, program="train")
        except run_files.RunFilesError as error:
            raise StartupError(str(error)) from None
        self._stack = contextlib.ExitStack()
        self.nonfinite = NonFiniteGuard(exp.update.max_nonfinite_in_a_row)
        # Until the loop can save a checkpoint, SIGTERM just unwinds (stopping a retrieval service we started).
        signal.signal(signal.SIGTERM, exit_on_sigterm)
        try:
            self._setup()
        except BaseException:
            self._stack.close()
            raise

    def _setup(self) -> None:
        exp = self.exp
        if run_files.is_remote(self.run_dir):
            log.info("RUN_DIR is %s: checkpoints, metrics, TensorBoard events and configs go there; files that "
                     "need a local path (demo data and index, tiny model build, retrieval log) go to %s",
                     self.run_dir, self.local_dir)
        if jax.process_index() == 0:
            gin_config.write_config(self.run_dir)  # operative_config.gin follows after the first step
        self._open_data()
        self.retrieval = connect_retrieval(exp.retrieval, self._stack, local_dir=self.local_dir,
                                           demo_corpus=self.demo_paths and self.demo_paths["corpus"])
        self._load_model()
        self.checkpoints = RunCheckpoints.for_run(exp.checkpoints, self.run_dir)
        self._stack.callback(self.checkpoints.close)
        self._restore_or_initialize()
        self._build_agents()
        if jax.process_index() == 0:
            self.metrics_log = names.MetricsLog(self.run_dir, resume_step=self.start_step)
            self._stack.callback(self.metrics_log.close)
        self.checkpoints.install_sigterm_handler()

    # ----- data ------------------------------------------------------------------------------------------------
    def _open_data(self) -> None:
        exp = self.exp
        qa = open_qa_data(exp.data, local_dir=self.local_dir, top_k=exp.retrieval.top_k)
        self.demo_paths, self.train_sources, self.eval_sources = qa.demo_paths, qa.train_sources, qa.eval_sources
        self.qa = qa
        try:
            self.data = training_batches(self.train_sources, prompts_per_step=exp.prompts_per_step, seed=exp.seed,
                                         process_index=jax.process_index(), process_count=jax.process_count())
        except ValueError as error:  # a global batch that the processes cannot split evenly
            raise StartupError(f"train.prompts_per_step: {error}") from None
        self.has_eval = bool(self.eval_sources)

    # ----- model -----------------------------------------------------------------------------------------------
    def _load_model(self) -> None:
        exp, spec = self.exp, self.exp.model
        if spec.checkpoint is None:
            if self.demo_paths is None:
                raise StartupError("ModelSpec.checkpoint is None (make a tiny model) but there is no demo corpus to "
                                   "train its tokenizer on; use DataSpec.demo = True or give a checkpoint")
            model_dir = tiny_model_dir(spec, run_dir=self.run_dir, local_dir=self.local_dir, seed=exp.seed,
                                       texts=bootstrap.demo_tokenizer_texts())
        else:
            model_dir = spec.checkpoint
        mesh, rules = make_mesh(exp.mesh)
        self.policy = open_policy(spec, model_dir, mesh, rules)
        policy = self.policy
        self.model_dir, self.tokenizer, self.cfg = policy.model_dir, policy.tokenizer, policy.cfg
        self.mesh, self.rules, self.abstract_model = policy.mesh, policy.rules, policy.abstract_model
        self.abstract_params, self.pad_id = policy.abstract_params, policy.pad_id
        self.max_context = exp.rollout.agent.max_context_tokens

        trajectories = exp.prompts_per_step // jax.process_count() * exp.samples_per_prompt
        mini = trajectories // exp.update.mini_batches
        micro = exp.update.micro_batch_size or mini
        if mini % micro:
            raise StartupError(f"UpdateSpec.micro_batch_size={micro} does not divide the {mini} trajectories each of "
                               f"the {jax.process_count()} processes holds per mini-batch")
        # One process: the engine samples from the trainer's own arrays. Several: each process's engine runs on
        # its local devices, from a per-host copy gathered after every update.
        self.host_replicas = None
        if jax.process_count() > 1:
            _, abstract_state = nnx.split(policy.abstract_model)
            try:
                self.host_replicas = multihost.HostReplicas(abstract_state, tensor=exp.mesh.tensor,
                                                            rules=exp.mesh.rules or None, dtype=policy.cfg.dtype)
            except ValueError as error:
                raise StartupError(f"MeshSpec.tensor / rules on each host's {jax.local_device_count()} devices: "
                                   f"{error}") from None
        total_updates = exp.num_steps * exp.update.mini_batches * exp.update.epochs
        try:
            self.update = PolicyUpdate(
                policy.graphdef, self.abstract_params, optimizer=make_optimizer(exp.optimizer, total_updates),
                schedule=learning_rate_schedule(exp.optimizer, total_updates), loss_config=exp.loss,
                mesh=self.mesh, rules=self.rules, micro_batch_size=micro,
                logprob_chunk_size=spec.logprob_chunk_size)
        except ValueError as error:
            raise StartupError(f"UpdateSpec / MeshSpec: {error}") from None
        self.reference_params = nnx.state(policy.load_reference()) if self.update.uses_reference else None

    # ----- checkpoint ------------------------------------------------------------------------------------------
    def _abstract_state(self) -> dict:
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        opt = jax.eval_shape(self.update.optimizer.init, self.abstract_params)
        opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt,
                           self.update.opt_shardings)
        return {"params": self.abstract_params, "opt_state": opt,
                "rng": jax.ShapeDtypeStruct((2,), np.uint32, sharding=replicated)}

    def _restore_or_initialize(self) -> None:
        try:
            restored = self.checkpoints.restore_latest(self._abstract_state())
        except CheckpointError as error:
            raise StartupError(str(error)) from None
        if restored is None:
            self.params = nnx.state(self.policy.load())
            self.opt_state = self.update.init_optimizer(self.params)
            self.rng = np.asarray(jax.random.key_data(jax.random.key(self.exp.seed)))
            self.start_step = 0
            log.info("starting a new run in %s from %s", self.run_dir, self.model_dir)
            return
        step, state, meta = restored
        if step > self.exp.num_steps:
            raise StartupError(f"checkpoint {self.checkpoints.step_path(step)} is past train.num_steps="
                               f"{self.exp.num_steps}; raise num_steps to continue this run")
        self.params, self.opt_state = state["params"], state["opt_state"]
        self.rng = np.asarray(state["rng"])
        self.data.set_state(meta["data_iterator"])
        self.nonfinite.in_a_row = int(meta.get("nonfinite_in_a_row", 0))
        self.start_step = step
        log.info("resumed from %s (step %d of %d)", self.checkpoints.step_path(step), step, self.exp.num_steps)

    def save(self, step: int, *, force: bool = False) -> None:
        state = {"params": self.params, "opt_state": self.opt_state, "rng": self.rng}
        meta = {"step": step, "data_iterator": self.data.get_state(), "nonfinite_in_a_row": self.nonfinite.in_a_row}
        self.checkpoints.save(step, state, meta, force=force)

    # ----- rollouts --------------------------------------------------------------------------------------------
    def _build_agents(self) -> None:
        exp = self.exp
        mesh, rules = ((self.host_replicas.mesh, self.host_replicas.rules) if self.host_replicas
                       else (self.mesh, self.rules))
        local = exp.prompts_per_step // jax.process_count() * exp.samples_per_prompt
        slots = engine_slots(exp.rollout.slots or local, mesh, rules)

        def agent(sampling: SamplingConfig) -> SearchAgent:
            return build_agent(self.policy, exp.rollout, self.retrieval, top_k=exp.retrieval.top_k, slots=slots,
                               sampling=sampling, mesh=mesh, rules=rules)

        self.agent = agent(exp.rollout.sampling)
        self.engine = self.agent.engine
        self.engine_params = self.sampler_params(self.engine)
        self.eval_agent = agent(SamplingConfig(temperature=0.0)) if self.has_eval else None
        self.eval_batch_size = slots

    def sampler_params(self, engine: Engine):
        """The current params as `engine` samples from them, in the compute dtype: on one process the same arrays
        (a bf16 copy of fp32 master weights); on several, this host's whole copy on its local devices (a
        collective: every process calls it at the same point)."""
        params = self.host_replicas(self.params) if self.host_replicas else self.params
        return engine.load_params(params)

    def rollout_prompts(self, examples) -> list[RolloutPrompt]:
        return rollout_prompts(self.tokenizer, examples, template=self.exp.rollout.prompt_template,
                               use_dataset_prompt=self.exp.data.use_dataset_prompt)

    def next_seeds(self) -> tuple[int, int]:
        """(rollout seed, mini-batch order seed) for this step, advancing the run's checkpointed RNG."""
        key, rollout_key, order_key = jax.random.split(jax.random.wrap_key_data(self.rng), 3)
        self.rng = np.asarray(jax.random.key_data(key))
        draw = lambda k: int(jax.random.randint(k, (), 0, np.iinfo(np.int32).max))  # noqa: E731
        return draw(rollout_key), draw(order_key)

    def gtpo_shaping(self, trajectories, scores) -> tuple[np.ndarray | None, int]:
        """GTPO's query-similarity shaping f32[G, N] (AlgorithmSpec.gtpo_shaping_beta > 0; else None), embedding
        the queries with the service, and how many queries it failed to embed. Retrieval is never fatal: when
        Embed fails (a dead or hung service) the step goes on with zero shaping, logged and counted."""
        beta = self.exp.algorithm.gtpo_shaping_beta
        if not beta:
            return None, 0
        samples = self.exp.samples_per_prompt
        no_shaping = np.zeros((len(trajectories) // samples, samples), np.float32)
        queries = [[q for q in t.queries if q] for t in trajectories]
        flat = [q for qs in queries for q in qs]
        if not flat:
            return no_shaping, 0
        try:
            vectors = self.retrieval.embed(flat)
        except RetrievalError as error:
            log.warning("GTPO shaping is 0 this step: embedding %d queries failed: %s", len(flat), error)
            return no_shaping, len(flat)
        embeddings, start = [], 0
        for qs in queries:
            embeddings.append(vectors[start:start + len(qs)])
            start += len(qs)
        correct = scores.correct.reshape(-1, samples)
        return query_similarity_shaping(embeddings, correct, beta=beta), 0

    # ----- update ----------------------------------------------------------------------------------------------
    def train_on(self, batch, old_logp: np.ndarray | None, ref_logp: np.ndarray | None, order_seed: int) -> dict:
        """Mini-batch updates over the step's trajectories (`epochs` passes in a seeded order). old_logp None:
        the step's one update takes its own log-probs as the old ones (UpdateSpec.old_policy_pass is False)."""
        exp = self.exp
        on_policy = old_logp is None
        if on_policy and exp.update.old_policy_pass:
            raise ValueError("train_on: old_logp is needed when a step makes several updates")
        arrays = batch.device_arrays()
        arrays["loss_mask"] = arrays["loss_mask"].astype(np.int32)
        if not on_policy:
            arrays["old_logp"] = old_logp
        if ref_logp is not None:
            arrays["ref_logp"] = ref_logp
        rows = batch.shape[0]
        mini = rows // exp.update.mini_batches
        order_rng = np.random.default_rng(order_seed)
        applied, skipped = [], 0
        for _ in range(exp.update.epochs):
            order = order_rng.permutation(rows)
            for m in range(exp.update.mini_batches):
                index = np.sort(order[m * mini:(m + 1) * mini])
                part = {name: value[index] for name, value in arrays.items()}
                self.params, self.opt_state, result = self.update.update(self.params, self.opt_state, part,
                                                                         on_policy=on_policy)
                if result.applied:
                    applied.append(result.metrics)
                else:
                    skipped += 1
                self.nonfinite.record(result.applied, result.metrics, str(self.checkpoints.directory))
        out = {names.SKIPPED_UPDATES: float(skipped)}
        for key, name in _UPDATE_NAMES.items():
            values = [m[key] for m in applied if key in m]
            if key == "ratio_min":
                out[name] = min(values) if values else float("nan")
            elif key == "ratio_max":
                out[name] = max(values) if values else float("nan")
            else:
                out[name] = float(np.mean(values)) if values else float("nan")
        return out

    # ----- eval, metrics, shutdown -----------------------------------------------------------------------------
    def evaluate(self) -> tuple[dict[str, float], list[dict]]:
        """Greedy EM per data_source on the eval files (one sample per prompt); returns the metrics (combined over
        processes) and this process's per-example records (training.evaluation.trajectory_record)."""
        params = self.sampler_params(self.eval_agent.engine)
        batches = eval_batches(self.eval_sources, batch_size=self.eval_batch_size, process_index=jax.process_index(),
                               process_count=jax.process_count(), limit_per_source=self.exp.data.eval_limit_per_source)
        result = greedy_eval(self.eval_agent, params, batches, prompts=self.rollout_prompts, scoring=self.exp.scoring)
        # Each process scored its own shard, which need not hold every data_source of a mixed file.
        merged: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
        for process_hits in multihost.gather_json(result.per_source):
            for source, (correct, count) in process_hits.items():
                merged[source][0] += correct
                merged[source][1] += count
        result.per_source = dict(merged)
        out = result.metrics()
        log.info("eval: %s", ", ".join(f"{k} {v:.3f}" for k, v in out.items() if k.endswith("/em")))
        return out, result.records

    def stop_requested(self) -> bool:
        """SIGTERM reached any process (every process asks after each step, so all stop after the same one)."""
        return multihost.any_process(self.checkpoints.preempted)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if jax.process_index() == 0:
            self.metrics_log.write(step, metrics)

    def close(self) -> None:
        self._stack.close()
