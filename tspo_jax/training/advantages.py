"""From scored trajectories to per-token advantages with the configured estimator (GRPO, TSPO or GTPO).

The estimators are the algorithm module's jitted functions, bound through gin (`tspo_advantages.alpha = 0.5`);
this module only lays the step's trajectories out as [G groups, N samples] arrays, calls the chosen one with the
inputs it takes, and spreads its turn advantages onto tokens.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence

import numpy as np

from tspo_jax.algorithms import advantages as estimators


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """estimator: one of tspo_jax.algorithms' `tspo_advantages`, `grpo_advantages`, `gtpo_advantages` (gin:
    `AlgorithmSpec.estimator = @tspo_advantages`; its options are bound on the function itself).
    gtpo_shaping_beta: GTPO's query-similarity shaping of failed trajectories (0 = off); it embeds the queries
    with the retrieval service's encoder."""

    estimator: Callable | None = None
    gtpo_shaping_beta: float = 0.0

    def __post_init__(self):
        if self.estimator is None:
            raise ValueError("AlgorithmSpec.estimator is not set: include configs/algorithms/tspo.gin (or grpo.gin, "
                             "gtpo.gin), or bind AlgorithmSpec.estimator = @tspo_advantages")
        if estimator_name(self.estimator) is None:
            raise ValueError(f"AlgorithmSpec.estimator = {self.estimator!r} is not tspo_advantages, grpo_advantages "
                             "or gtpo_advantages")
        if self.gtpo_shaping_beta and estimator_name(self.estimator) != "gtpo":
            raise ValueError("AlgorithmSpec.gtpo_shaping_beta is set but the estimator is not gtpo_advantages")

    @property
    def name(self) -> str:
        return estimator_name(self.estimator)


def estimator_name(estimator) -> str | None:
    """"tspo" | "grpo" | "gtpo" for the (possibly gin-wrapped) estimator function, else None."""
    base = inspect.unwrap(estimator)
    return {estimators.tspo_advantages: "tspo", estimators.grpo_advantages: "grpo",
            estimators.gtpo_advantages: "gtpo"}.get(base)


@dataclasses.dataclass(frozen=True)
class StepAdvantages:
    """turn: f32[G, N, K] turn advantages; token: f32[B, T] on the packed batch; stats: group composition."""

    turn: np.ndarray
    token: np.ndarray
    stats: dict[str, float]


def turn_advantages(spec: AlgorithmSpec, *, outcome, correct, folr_turn, num_turns, max_turns: int, shaping=None):
    """f32[G, N, K] turn advantages of the configured estimator (the inputs of `compute_advantages`); traceable,
    so the fit check can compile it."""
    name = spec.name
    if name == "tspo":
        return spec.estimator(outcome, folr_turn, num_turns, correct=correct, max_turns=max_turns)
    if name == "grpo":
        return estimators.lift_to_turns(spec.estimator(outcome), num_turns, max_turns=max_turns)
    return spec.estimator(outcome, num_turns, max_turns=max_turns, shaping=shaping)


def compute_advantages(spec: AlgorithmSpec, *, outcome: np.ndarray, correct: np.ndarray, folr_turn: np.ndarray,
                       num_turns: np.ndarray, max_turns: int, turn_id: np.ndarray, loss_mask: np.ndarray,
                       shaping: np.ndarray | None = None) -> StepAdvantages:
    """outcome f32[G, N], correct bool[G, N], folr_turn i32[G, N] (-1 none), num_turns i32[G, N] (K_i >= 1),
    max_turns K (static, >= every K_i); turn_id / loss_mask i32[B, T] with the first G*N rows the trajectories in
    group-major order (further rows are padding and get 0)."""
    turn = np.asarray(turn_advantages(spec, outcome=outcome, correct=correct, folr_turn=folr_turn,
                                      num_turns=num_turns, max_turns=max_turns, shaping=shaping), np.float32)
    stats = {k: float(v) for k, v in estimators.group_stats(correct, turn).items()}
    groups, samples = outcome.shape
    rows = groups * samples
    token = np.zeros(turn_id.shape, np.float32)
    token[:rows] = np.asarray(estimators.token_advantages(turn.reshape(rows, max_turns), turn_id[:rows],
                                                          loss_mask[:rows]))
    return StepAdvantages(turn=turn, token=token, stats=stats)


def grouped(values: Sequence, groups: int, samples: int) -> np.ndarray:
    """Group-major list of G*N values -> [G, N] array."""
    return np.asarray(values).reshape(groups, samples)
