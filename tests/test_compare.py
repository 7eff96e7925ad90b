"""The algorithm comparison's numbers (tspo_jax.curves.compare_summary), picture and table from curves written by
hand, with every expected number worked out here from the curves' definition."""

import json

import pytest

from tspo_jax import compare, curves


def _rows(em, nonzero, reward=0.5, evals=(0, 10, 20)):
    """metrics.jsonl rows of one run: a step row per step 1..20, eval rows at `evals` (step 0 has no step row)."""
    rows = [{"step": s, "reward/mean": reward, "groups/nonzero_advantage": nonzero[s - 1],
             "reward/folr_hit_rate": 0.5} for s in range(1, 21)]
    rows += [{"step": s, "eval/em": e} for s, e in zip(evals, em)]
    return sorted(rows, key=lambda r: r["step"])


RUNS = {
    # GRPO ends at mean EM (0.4 + 0.6) / 2 = 0.5.
    "grpo": {0: _rows([0.3, 0.35, 0.4], [0.25] * 20), 1: _rows([0.3, 0.4, 0.6], [0.75] * 20)},
    # TSPO's seed mean is 0.3, 0.5, 0.7: it reaches 0.5 at step 10.
    "tspo": {0: _rows([0.3, 0.6, 0.8], [1.0] * 20), 1: _rows([0.3, 0.4, 0.6], [0.5] * 10 + [1.0] * 10)},
    # GTPO never reaches 0.5 (mean 0.3, 0.35, 0.45); one seed misses the step-10 eval, so the curve skips it.
    "gtpo": {0: _rows([0.3, 0.4, 0.5], [0.0] * 20), 1: _rows([0.3, 0.4], [0.5] * 20, evals=(0, 20))},
}


def test_the_summary_follows_from_the_curves():
    summary = curves.compare_summary(RUNS)
    assert summary["steps"] == 20 and summary["seeds"] == [0, 1]
    grpo, tspo, gtpo = (summary["algorithms"][a] for a in ("grpo", "tspo", "gtpo"))
    assert grpo["final_em_mean"] == pytest.approx(0.5) and grpo["final_em_std"] == pytest.approx(0.1)
    assert grpo["steps_to_reach_grpo_final_em"] == 20  # its own final mean, first met at its last eval
    assert grpo["nonzero_adv_share_mean"] == pytest.approx(0.5)
    assert tspo["em_curve_mean"] == [[0, pytest.approx(0.3)], [10, pytest.approx(0.5)], [20, pytest.approx(0.7)]]
    assert tspo["steps_to_reach_grpo_final_em"] == 10
    assert tspo["nonzero_adv_share_mean"] == pytest.approx((20 * 1.0 + 10 * 0.5 + 10 * 1.0) / 40)
    assert tspo["final_em_per_seed"] == [0.8, 0.6]
    assert [s for s, _ in gtpo["em_curve_mean"]] == [0, 20]
    assert gtpo["final_em_mean"] == pytest.approx(0.45) and gtpo["steps_to_reach_grpo_final_em"] is None


def test_without_the_baseline_no_step_count_is_claimed():
    summary = curves.compare_summary({"tspo": RUNS["tspo"]})
    assert summary["algorithms"]["tspo"]["steps_to_reach_grpo_final_em"] is None


def test_collect_reads_each_runs_metrics_and_writes_the_picture_and_table(tmp_path):
    for algorithm, by_seed in RUNS.items():
        for seed, rows in by_seed.items():
            run = tmp_path / compare.run_name(algorithm, seed)
            run.mkdir()
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = compare.collect(tmp_path, list(RUNS), [0, 1])
    assert runs == RUNS
    curves.plot_compare(runs, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = compare.table(curves.compare_summary(runs)).splitlines()
    assert lines[2].startswith("| grpo | 0.500 ± 0.100 | 0.400, 0.600 | 20 | 0.500 |")
    assert "| gtpo | 0.450 ± 0.050 | 0.500, 0.400 | never | 0.250 |" in lines


def test_a_run_command_adds_the_algorithm_seed_and_its_own_run_dir(tmp_path):
    command = compare.train_command(tmp_path, "gtpo", 2, ["--gin_file=configs/experiments/compare_demo.gin"])
    assert command[1:4] == ["-m", "tspo_jax.train", "--gin_file=configs/experiments/compare_demo.gin"]
    assert command[4:] == ["--gin_file=configs/algorithms/gtpo.gin", "--gin.train.seed=2",
                           f"--gin.RUN_DIR='{tmp_path / 'gtpo_seed2'}'"]
