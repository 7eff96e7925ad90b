"""One tiny_cpu-sized RL step, broken down by phase, with rollout and update throughput.

    .venv/bin/python bench/train_step.py [--steps 2] [--gin.NAME=VALUE ...]

Builds the main job's run (configs/experiments/tiny_cpu.gin: demo world, dense index, a real retrieval service on
loopback, the tiny Qwen2 in fp32 after its format warm-up, so it searches and answers like the main job) in a
temporary directory, runs one step to compile, then times `--steps` more. Phases: rollout (of which retrieval),
scoring, log-probs (old policy + reference), update (mini-batch forward/backward/AdamW). Extra --gin.NAME=VALUE
flags change the run (e.g. --gin.UpdateSpec.mini_batches=1: one update per step, no old-policy pass). Last line:
step_s=<s>.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time

import jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the compile step")
    args, gin_overrides = parser.parse_known_args()
    logging.basicConfig(level=logging.WARNING, force=True)

    from tspo_jax.train import Trainer, load_experiment
    from tspo_jax.training.gin_config import split_gin_flags

    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as run_dir:
        flags, rest = split_gin_flags([
            "--gin_file=configs/experiments/tiny_cpu.gin", f"--gin.RUN_DIR='{run_dir}'",
            f"--gin.train.num_steps={args.steps + 1}",
            "--gin.train.eval_every=0", "--gin.train.eval_at_start=False", "--gin.MeshSpec.num_devices=1",
            "--gin.CheckpointSpec.save_every=1000", *gin_overrides,
        ])
        if rest:
            parser.error(f"unrecognized arguments: {rest}")
        experiment = load_experiment(flags)
        started = time.perf_counter()
        trainer = Trainer(experiment)
        setup_s = time.perf_counter() - started
        try:
            compile_tick = time.perf_counter()
            trainer.step(1)
            compile_s = time.perf_counter() - compile_tick
            rows = []
            for step in range(2, args.steps + 2):
                tick = time.perf_counter()
                metrics = trainer.step(step)
                metrics["time/step"] = time.perf_counter() - tick
                rows.append(metrics)
            engine = trainer.session.engine
            init_ms = []
            for _ in range(5):  # what every rollout pays before its first prefill
                tick = time.perf_counter()
                jax.block_until_ready(engine.init_decode_state())
                init_ms.append((time.perf_counter() - tick) * 1e3)
        finally:
            trainer.session.close()
        cfg = trainer.session.cfg

    def mean(name):
        return statistics.fmean(r.get(name, 0.0) for r in rows)

    devices = jax.devices()
    print(f"backend={jax.default_backend()} devices={len(devices)} ({devices[0].device_kind}) mesh=1 device "
          f"dtype={cfg.dtype} model=tiny Qwen2 ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"vocab {cfg.vocab_size}) engine=tspo_jax.rollout.engine (fused decode) retrieval=dense MiniLM flat, gRPC")
    print(f"step shape: {experiment.prompts_per_step} prompts x {experiment.samples_per_prompt} samples, "
          f"max_turns={experiment.rollout.agent.max_turns}, {experiment.rollout.agent.max_turn_tokens} tokens/turn, "
          f"context {experiment.rollout.agent.max_context_tokens}, {experiment.update.mini_batches} mini-batches "
          f"of micro-batches of {experiment.update.micro_batch_size}, {experiment.update.epochs} epoch(s)"
          + (f"; overrides {' '.join(gin_overrides)}" if gin_overrides else ""))
    print(f"setup_s={setup_s:.1f} first_step_s (compiles)={compile_s:.1f} timed_steps={len(rows)}")
    for phase in ("rollout", "retrieval", "scoring", "logprobs", "update"):
        print(f"phase {phase:<9} {mean('time/' + phase):9.4f} s")
    print(f"decode_state_init_ms={statistics.median(init_ms):.2f} (median of 5, inside phase rollout)")
    print(f"rollout_tokens_generated={mean('rollout/tokens_generated'):.0f} "
          f"rollout_tokens_per_s={mean('rollout/tokens_generated') / mean('time/rollout'):.1f}")
    print(f"update_tokens_per_s={mean('throughput/update_tokens_per_s'):.1f} "
          f"logprob_tokens_per_s={mean('throughput/logprob_tokens_per_s'):.1f}")
    print(f"step_s={mean('time/step'):.3f}")


if __name__ == "__main__":
    sys.exit(main())
