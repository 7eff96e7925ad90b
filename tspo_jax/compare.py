"""Compare advantage estimators: the same experiment trained with each algorithm and several seeds, side by side.

    python -m tspo_jax.compare --out runs/compare [--algorithms tspo grpo gtpo] [--seeds 0 1 2] [--parallel 2] \\
        -- --gin_file=configs/experiments/compare_demo.gin [--gin.NAME=VALUE …]

Every run is `python -m tspo_jax.train` with the given gin flags plus `configs/algorithms/<algorithm>.gin`,
`train.seed = <seed>` and its own RUN_DIR (`<out>/<algorithm>_seed<seed>`), so the runs share everything else:
the starting checkpoint, the world (DataSpec.demo_seed, not train.seed), the hyper-parameters and the step budget.
Runs go `--parallel` at a time; each one's log is `<run>/train.log`. Interrupted, the command resumes: finished
runs are kept, unfinished ones continue from their checkpoints. At the end it writes `<out>/summary.json`
(tspo_jax.curves.compare_summary) and `<out>/compare.png` (seed mean with a min–max band per algorithm) and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence

from tspo_jax import curves
from tspo_jax import metrics as names

ALGORITHMS = ("tspo", "grpo", "gtpo")


def run_name(algorithm: str, seed: int) -> str:
    return f"{algorithm}_seed{seed}"


def train_command(out: pathlib.Path, algorithm: str, seed: int, gin_flags: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "tspo_jax.train", *gin_flags, f"--gin_file=configs/algorithms/{algorithm}.gin",
            f"--gin.train.seed={seed}", f"--gin.RUN_DIR='{out / run_name(algorithm, seed)}'"]


def _finished(run_dir: pathlib.Path) -> bool:
    return (run_dir / "curves.png").exists()


def run_all(out: pathlib.Path, algorithms: Sequence[str], seeds: Sequence[int], gin_flags: Sequence[str], *,
            parallel: int) -> None:
    """Runs every (algorithm, seed) not finished yet, `parallel` at a time; fails naming a run that fails."""
    pending = [(a, s) for s in seeds for a in algorithms if not _finished(out / run_name(a, s))]
    total, done, started = len(pending), 0, time.monotonic()
    running: dict[tuple[str, int], subprocess.Popen] = {}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    while pending or running:
        while pending and len(running) < parallel:
            algorithm, seed = pending.pop(0)
            run_dir = out / run_name(algorithm, seed)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "train.log", "a")
            running[(algorithm, seed)] = subprocess.Popen(train_command(out, algorithm, seed, gin_flags),
                                                          stdout=log, stderr=subprocess.STDOUT, env=env)
            log.close()
        time.sleep(2.0)
        for key, process in list(running.items()):
            code = process.poll()
            if code is None:
                continue
            del running[key]
            run_dir = out / run_name(*key)
            if code != 0:
                for other in running.values():
                    other.terminate()
                raise RuntimeError(f"run {run_dir} failed (exit {code}); see {run_dir / 'train.log'}")
            done += 1
            elapsed = time.monotonic() - started
            eta = elapsed / done * (total - done)
            print(f"compare: {done}/{total} runs done ({run_name(*key)}) | {elapsed / 60:.1f} min | "
                  f"ETA {eta / 60:.1f} min", flush=True)


def collect(out: pathlib.Path, algorithms: Sequence[str], seeds: Sequence[int]) -> dict:
    """runs[algorithm][seed] = metrics rows."""
    return {a: {s: names.read_jsonl(out / run_name(a, s) / "metrics.jsonl") for s in seeds} for a in algorithms}


def table(summary: dict) -> str:
    head = "| algorithm | final test EM (mean ± std) | per seed | steps to GRPO's final EM | non-zero-adv share |"
    lines = [head, "|---|---|---|---|---|"]
    for algorithm, s in summary["algorithms"].items():
        per_seed = ", ".join(f"{v:.3f}" for v in s["final_em_per_seed"])
        reach = "never" if s["steps_to_reach_grpo_final_em"] is None else str(s["steps_to_reach_grpo_final_em"])
        lines.append(f"| {algorithm} | {s['final_em_mean']:.3f} ± {s['final_em_std']:.3f} | {per_seed} | {reach} "
                     f"| {s['nonzero_adv_share_mean']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    gin_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m tspo_jax.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory of the runs, summary.json and compare.png")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    args = parser.parse_args(own)
    if not gin_flags:
        parser.error("give the experiment's gin flags after --, e.g. -- --gin_file=configs/experiments/compare_demo.gin")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        run_all(out, args.algorithms, args.seeds, gin_flags, parallel=max(1, args.parallel))
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    runs = collect(out, args.algorithms, args.seeds)
    summary = curves.compare_summary(runs)
    summary["wall_minutes"] = round((time.monotonic() - started) / 60, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    curves.plot_compare(runs, out / "compare.png", title=f"{', '.join(args.algorithms)}; seeds {args.seeds}")
    print(table(summary))
    print(f"done: {out / 'summary.json'} and {out / 'compare.png'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
