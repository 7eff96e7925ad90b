"""Learning curves from runs' metrics.jsonl (host side): a run's own picture, the algorithm comparison's picture
and its summary numbers.

    curves.png   test EM, train reward, FOLR hit rate and the share of groups with non-zero advantage, by step
    compare.png  the same panels, one line per algorithm: the mean over seeds with a min–max band

`compare_summary` is a pure function of the curves, so it is tested on curves written by hand.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

from tspo_jax import metrics as names

EVAL_EM = "eval/em"
# (metric, panel title) in the order the pictures show them.
PANELS = ((EVAL_EM, "test EM (greedy)"), (names.REWARD, "train reward"),
          (names.GROUPS_NONZERO_ADVANTAGE, "groups with non-zero advantage"), (names.FOLR_HIT_RATE, "FOLR hit rate"))

Curve = list[tuple[int, float]]  # (step, value), steps ascending


def curve(rows: Sequence[Mapping], name: str) -> Curve:
    """(step, value) of metric `name` wherever a row has it (the last row of a step wins)."""
    points: dict[int, float] = {}
    for row in rows:
        if name in row and row[name] is not None and math.isfinite(row[name]):
            points[int(row["step"])] = float(row[name])
    return sorted(points.items())


def plot_run(rows: Sequence[Mapping], out_png: str | os.PathLike, *, title: str = "") -> None:
    """curves.png of one run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (name, label) in zip(axes, PANELS):
        points = curve(rows, name)
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if name == EVAL_EM else None, markersize=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("RL step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _aligned(curves: Sequence[Curve]) -> tuple[list[int], list[list[float]]]:
    """Steps every seed has, with each seed's value there."""
    common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
    lookup = [dict(c) for c in curves]
    return common, [[values[s] for values in lookup] for s in common]


def mean_curve(curves: Sequence[Curve]) -> Curve:
    steps, values = _aligned(curves)
    return [(s, sum(v) / len(v)) for s, v in zip(steps, values)]


def compare_summary(runs: Mapping[str, Mapping[int, Sequence[Mapping]]], *, baseline: str = "grpo") -> dict:
    """The comparison's numbers from metrics rows, runs[algorithm][seed] = rows.

    Per algorithm: final_em_mean / final_em_std (population std over seeds of the last eval's EM),
    em_curve_mean ([step, seed-mean EM] at the eval steps all seeds share), nonzero_adv_share_mean (the mean of
    groups/nonzero_advantage over all steps and seeds) and steps_to_reach_grpo_final_em (the first eval step
    whose seed-mean EM >= the baseline's final seed-mean EM; None if never).
    """
    out: dict = {"algorithms": {}}
    all_steps, seeds = set(), set()
    per_algo = {}
    for algorithm, by_seed in runs.items():
        seeds.update(by_seed)
        em_curves = [curve(rows, EVAL_EM) for rows in by_seed.values()]
        mean = mean_curve(em_curves)
        finals = [c[-1][1] for c in em_curves if c]
        nonzero = [v for rows in by_seed.values() for _, v in curve(rows, names.GROUPS_NONZERO_ADVANTAGE)]
        for rows in by_seed.values():
            all_steps.update(s for s, _ in curve(rows, names.REWARD))
        final_mean = sum(finals) / len(finals) if finals else None
        final_std = (math.sqrt(sum((f - final_mean) ** 2 for f in finals) / len(finals)) if finals else None)
        per_algo[algorithm] = {"final_em_mean": final_mean, "final_em_std": final_std,
                               "nonzero_adv_share_mean": sum(nonzero) / len(nonzero) if nonzero else None,
                               "em_curve_mean": [[s, v] for s, v in mean], "final_em_per_seed": finals}
    target = per_algo.get(baseline, {}).get("final_em_mean")
    for algorithm, summary in per_algo.items():
        reached = None
        if target is not None:
            reached = next((s for s, v in summary["em_curve_mean"] if v >= target), None)
        summary["steps_to_reach_grpo_final_em"] = reached
        out["algorithms"][algorithm] = summary
    out["steps"] = max(all_steps) if all_steps else 0
    out["seeds"] = sorted(seeds)
    return out


def plot_compare(runs: Mapping[str, Mapping[int, Sequence[Mapping]]], out_png: str | os.PathLike, *,
                 title: str = "") -> None:
    """compare.png: per panel, each algorithm's seed mean with a min–max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4))
    for ax, (name, label) in zip(axes, PANELS):
        for algorithm, by_seed in runs.items():
            steps, values = _aligned([curve(rows, name) for rows in by_seed.values()])
            if not steps:
                continue
            mean = [sum(v) / len(v) for v in values]
            line, = ax.plot(steps, mean, label=f"{algorithm} (n={len(by_seed)})",
                            marker="o" if name == EVAL_EM else None, markersize=3)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.18,
                            color=line.get_color())
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("RL step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
