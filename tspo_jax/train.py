"""Train a search agent with TSPO, GRPO or GTPO.

    python -m tspo_jax.train --gin_file=configs/experiments/tiny_cpu.gin [--gin_file=…] [--gin.NAME=VALUE …]
                             [--gin_bindings='NAME = VALUE'] [--gin_search_path=DIR]
                             [--distributed [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]]

Every gin binding is parsed and checked, and the whole Experiment built, before any work starts. A run
directory with checkpoints resumes from the newest complete one, exactly where it stopped (params, optimizer
state, RNG and the data iterator are all restored). SIGTERM saves a checkpoint after the current step and exits
(exit code 0). RUN_DIR may be a local directory or gs://bucket/path. With --distributed every process (a pod's
hosts) runs this same command on its own slice of each step's prompts; process 0 writes the logs.

One RL step (`Trainer.step`): Grain prompts → rollouts (n samples each, on the engine that shares the policy's
params) → host scoring (outcome, FOLR) → old-policy and reference log-probs → advantages → mini-batch updates →
metrics → checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from tspo_jax import curves
from tspo_jax import metrics as names
from tspo_jax.rewards import score_trajectories
from tspo_jax.training.advantages import compute_advantages, grouped
from tspo_jax.training.batch import bucketed_length, pack_trajectories
from tspo_jax.training import gin_config, multihost
from tspo_jax.training.evaluation import trajectory_record
from tspo_jax.training.samples import readable, write_samples
from tspo_jax.training.session import NonFiniteUpdates, StartupError, TrainingSession

log = logging.getLogger("tspo_jax.train")

SAMPLES_PER_EVAL = 4  # eval trajectories (and training trajectories of the latest step) kept per eval


class PhaseTimer:
    """Wall-clock seconds per phase of a step, for the `time/*` metrics."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def metrics(self) -> dict[str, float]:
        return {f"time/{name}": value for name, value in self.seconds.items()}


class Trainer:
    """Everything one run holds: data, model and optimizer state, engine and agent, retrieval, checkpoints."""

    def __init__(self, experiment):
        self.exp = experiment
        self.session = TrainingSession(experiment)
        self.train_samples: list[dict] = []  # the latest step's first trajectories, for samples/step_N.jsonl

    # ------------------------------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        """One RL step; returns its metrics."""
        s, exp, timer = self.session, self.exp, PhaseTimer()
        examples = next(s.data)  # this process's prompts; uid = group id, unique across datasets
        rollout_seed, order_seed = s.next_seeds()
        with timer.phase("rollout"):
            trajectories, rollout = s.agent.rollout(s.engine_params, s.rollout_prompts(examples),
                                                    exp.samples_per_prompt, seed=rollout_seed)
        timer.add("retrieval", rollout.retrieval_s)
        with timer.phase("scoring"):
            scores = score_trajectories([t.turn_texts for t in trajectories], [t.observations for t in trajectories],
                                        [t.golds for t in trajectories], config=exp.scoring)
            shaping, failed_embeds = s.gtpo_shaping(trajectories, scores)
        # Every process packs to the same length: the jitted log-probs and update take one global array.
        longest = max(len(t.tokens) for t in trajectories)
        length = multihost.max_over_processes(
            bucketed_length(longest, minimum=exp.update.min_sequence_length, maximum=s.max_context))
        batch = pack_trajectories(trajectories, pad_id=s.pad_id, min_length=length, max_length=s.max_context)
        with timer.phase("logprobs"):  # the old policy's only where an earlier update of the step changes it
            old_logp = (s.update.log_probs(s.params, batch.tokens, batch.positions, batch.attention_mask)
                        if exp.update.old_policy_pass else None)
            ref_logp = (s.update.log_probs(s.reference_params, batch.tokens, batch.positions, batch.attention_mask)
                        if s.update.uses_reference else None)
        groups, samples = len(examples), exp.samples_per_prompt
        advantages = compute_advantages(
            exp.algorithm, outcome=grouped(scores.outcome, groups, samples),
            correct=grouped(scores.correct, groups, samples), folr_turn=grouped(scores.folr_turn, groups, samples),
            num_turns=grouped([t.num_turns for t in trajectories], groups, samples),
            max_turns=exp.rollout.max_turns_per_trajectory, turn_id=batch.turn_id,
            loss_mask=batch.loss_mask.astype(np.int32), shaping=shaping)
        self.train_samples = [
            trajectory_record(examples[i // samples], t, answer=scores.answers[i], correct=bool(scores.correct[i]),
                              folr_turn=int(scores.folr_turn[i]),
                              turn_advantages=advantages.turn[i // samples, i % samples, :t.num_turns])
            for i, t in enumerate(trajectories[:SAMPLES_PER_EVAL])]
        with timer.phase("update"):
            update = s.train_on(batch.replace(advantages=advantages.token), old_logp, ref_logp, order_seed)
        s.engine_params = s.sampler_params(s.engine)  # one process: the same arrays, no copy
        tokens = float(batch.attention_mask.sum())
        throughput = {"throughput/update_tokens_per_s": tokens * exp.update.epochs / timer.seconds["update"]}
        passes = exp.update.old_policy_pass + s.update.uses_reference
        if passes:
            throughput["throughput/logprob_tokens_per_s"] = tokens * passes / timer.seconds["logprobs"]
        local = {**step_metrics(trajectories, scores, advantages.stats, rollout), **update, **timer.metrics(),
                 **throughput}
        if shaping is not None:
            local[names.EMBED_FAILURES] = float(failed_embeds)
        return multihost.combine_step_metrics(multihost.gather_json(local))  # this process's rows -> the step's

    # ------------------------------------------------------------------------------------------------------
    def run(self):
        """Trains to `num_steps` (or until SIGTERM); returns the run directory (an epath)."""
        s, exp = self.session, self.exp
        start = s.start_step
        progress = names.ProgressLine(exp.num_steps, start_step=start)
        try:
            if start == 0 and exp.eval_at_start and s.has_eval:
                s.log_metrics(0, self.evaluate(0))
            for step in range(start + 1, exp.num_steps + 1):
                tick = time.perf_counter()
                metrics = self.step(step)
                metrics[names.TIME_STEP] = time.perf_counter() - tick
                last = step == exp.num_steps
                if s.has_eval and exp.eval_every and (last or step % exp.eval_every == 0):
                    metrics.update(self.evaluate(step))
                s.log_metrics(step, metrics)
                progress.update(step, metrics)
                if step == start + 1 and jax.process_index() == 0:
                    gin_config.write_config(s.run_dir, operative=True)  # every configurable has been called now
                stop = s.stop_requested()
                s.save(step, force=last or stop)
                if stop and not last:
                    s.checkpoints.wait()
                    log.warning("stopping after step %d on SIGTERM: saved checkpoint %s", step,
                                s.checkpoints.step_path(step))
                    break
            if jax.process_index() == 0 and s.start_step < exp.num_steps:
                self.summarize()
        finally:
            s.close()  # waits for the last save, stops a retrieval service the run started
        return s.run_dir

    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy eval; on process 0 also writes samples/step_N.jsonl and prints one eval trajectory."""
        metrics, records = self.session.evaluate()
        if jax.process_index() == 0:
            path = write_samples(self.session.run_dir, step, eval_records=records[:SAMPLES_PER_EVAL],
                                 train_records=self.train_samples)
            if records:
                print(f"eval sample at step {step} ({path}):\n{readable(records[0])}", flush=True)
        return metrics

    def summarize(self) -> None:
        """RUN_DIR/curves.png and the `eval EM a -> b` line (process 0, after the last step)."""
        s = self.session
        rows = s.metrics_log.rows()
        em = curves.curve(rows, curves.EVAL_EM)
        buffer = io.BytesIO()
        curves.plot_run(rows, buffer, title=f"{s.run_dir.name}: {self.exp.algorithm.name}")
        (s.run_dir / "curves.png").write_bytes(buffer.getvalue())
        if em:
            print(f"eval EM {em[0][1]:.3f} -> {em[-1][1]:.3f} (step {em[0][0]} -> {em[-1][0]}; "
                  f"curves in {s.run_dir / 'curves.png'})", flush=True)


# The agent's timings go under time/ and throughput/ (never compared across a resume); two are already phases.
_ROLLOUT_RENAMED = {"rollout/model_s": "time/rollout_model", "rollout/tokens_per_s": "throughput/rollout_tokens_per_s"}
_ROLLOUT_DROPPED = {"rollout/retrieval_s", "rollout/wall_s"}


def step_metrics(trajectories, scores, group_stats: dict[str, float], rollout) -> dict[str, float]:
    """The rollout/reward/group metrics of a step (issue 6 item 5), from host data only."""
    lengths = np.array([int(np.sum(t.loss_mask)) for t in trajectories])
    out = {_ROLLOUT_RENAMED.get(k, k): v for k, v in rollout.as_dict().items() if k not in _ROLLOUT_DROPPED}
    out.update({
        names.REWARD: float(np.mean(scores.outcome)),
        names.EM: float(np.mean(scores.correct)),
        names.FOLR_HIT_RATE: float(np.mean(scores.folr_turn >= 0)),
        "reward/well_formed": float(np.mean(scores.well_formed)),
        names.GROUPS_MIXED: group_stats["frac_mixed"],
        names.GROUPS_ALL_WRONG: group_stats["frac_all_wrong"],
        names.GROUPS_ALL_CORRECT: group_stats["frac_all_correct"],
        names.GROUPS_NONZERO_ADVANTAGE: group_stats["frac_nonzero_advantage"],
        names.RESPONSE_LENGTH: float(lengths.mean()),
        names.RESPONSE_LENGTH_MAX: float(lengths.max()),
    })
    return out


# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> tuple[gin_config.GinFlags, argparse.Namespace]:
    flags, rest = gin_config.split_gin_flags(argv)
    parser = argparse.ArgumentParser(prog="python -m tspo_jax.train", description=__doc__.split("\n\n")[0],
                                     epilog="gin flags: --gin_file F (repeatable), --gin.NAME=VALUE, "
                                            "--gin_bindings 'NAME = VALUE', --gin_search_path DIR")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (every worker of a TPU pod runs this; on TPU "
                             "the coordinator and process ids come from the environment)")
    parser.add_argument("--coordinator_address", help="with --distributed: HOST:PORT of process 0 (not needed on TPU)")
    parser.add_argument("--num_processes", type=int, help="with --distributed: number of processes (not on TPU)")
    parser.add_argument("--process_id", type=int, help="with --distributed: this process's index (not on TPU)")
    args = parser.parse_args(rest)
    explicit = [args.coordinator_address, args.num_processes, args.process_id]
    if any(v is not None for v in explicit) and not args.distributed:
        parser.error("--coordinator_address / --num_processes / --process_id need --distributed")
    return flags, args


def load_experiment(flags: gin_config.GinFlags):
    """Parses and checks every gin file and binding, then builds the Experiment (no work is done)."""
    from tspo_jax import configurables  # registers everything gin may bind

    return gin_config.build(flags, configurables.train)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)  # an import may have configured logging already
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax narrates every save at INFO
    logging.getLogger("fsspec").setLevel(logging.WARNING)  # and gcsfs every gs:// read
    flags, args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.distributed:
        # On TPU pods every argument comes from the environment. On CPU hosts, set
        # JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo so the processes' CPU devices can form one mesh.
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id)
    try:
        experiment = load_experiment(flags)
    except gin_config.GinConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(experiment)
    except StartupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        run_dir = trainer.run()
    except NonFiniteUpdates as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    if jax.process_index() != 0:
        return 0
    print(f"done: checkpoints in {trainer.session.checkpoints.directory}\n"
          f"      metrics in {run_dir / 'metrics.jsonl'} and {run_dir / 'tensorboard'}\n"
          f"      config in {run_dir / 'config.gin'} and {run_dir / 'operative_config.gin'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
