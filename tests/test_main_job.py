"""The main job's own path (`make train`: configs/experiments/tiny_cpu.gin) for two steps, nothing stubbed: the demo
world written into RUN_DIR, its BM25 index built and served by a retrieval service the session starts on loopback,
the shipped demo policy (the SFT warm start) loaded, greedy eval at step 0 and at the end.

Its rollouts must give RL something to learn from: gold answers show up in search results (FOLR hit rate > 0),
some groups have a non-zero advantage, and the policy searches. The run writes what a user looks at: the world's
retrieval ceiling, eval and train samples, curves.png and the `eval EM a -> b` line."""

import json
import subprocess
import sys

from tspo_jax import metrics as names
from tspo_jax.training import bootstrap

STEPS = 2


def test_the_main_job_searches_finds_gold_answers_and_teaches_from_the_shipped_policy(tmp_path):
    run_dir = tmp_path / "tiny_cpu"
    command = [sys.executable, "-m", "tspo_jax.train", "--gin_file=configs/experiments/tiny_cpu.gin",
               f"--gin.RUN_DIR='{run_dir}'", f"--gin.train.num_steps={STEPS}", f"--gin.train.eval_every={STEPS}",
               "--gin.DataSpec.eval_limit_per_source=8", "--gin.MeshSpec.num_devices=1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "eval EM " in result.stdout and " -> " in result.stdout.split("eval EM ")[-1]

    rows = names.read_jsonl(run_dir / "metrics.jsonl")
    steps = [row for row in rows if names.REWARD in row]
    assert len(steps) == STEPS
    assert max(row[names.FOLR_HIT_RATE] for row in steps) > 0
    assert max(row[names.GROUPS_NONZERO_ADVANTAGE] for row in steps) > 0
    assert min(row["rollout/searches_per_trajectory"] for row in steps) > 0.5
    evals = [row for row in rows if "eval/em" in row]
    assert [row["step"] for row in evals] == [0, STEPS]

    recall = json.loads((run_dir / "demo_data" / "recall@3.json").read_text())
    assert set(recall) == {f"{split}/demo_{h}hop" for split in ("train", "test") for h in (2, 3)}
    samples = names.read_jsonl(run_dir / "samples" / f"step_{STEPS}.jsonl")
    assert {s["kind"] for s in samples} == {"eval", "train"}
    assert all("advantage" in turn for s in samples if s["kind"] == "train" for turn in s["turns"])
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert bootstrap.is_complete(run_dir / "demo_data")
