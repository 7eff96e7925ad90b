"""The rollout record handed to scoring and training (host side; fields exactly as contracts.md defines)."""

from __future__ import annotations

import dataclasses

import numpy as np

# Why a trajectory ended.
STOP_ANSWER = "answer"  # a turn ended on </answer>
STOP_MAX_TURNS = "max_turns"  # the final, no-search turn ended without </answer>
STOP_CONTEXT = "context"  # max_context_tokens reached


@dataclasses.dataclass
class Trajectory:
    """One sampled trajectory: prompt + turns + observations, exactly the tokens the policy saw.

    Token-level arrays share length T. turn_id is 1-based (0 = prompt): tokens of turn k and of the
    observation after it carry k, so the token with turn_id j >= 1 gets the 0-based turn advantage A[.., j-1].
    Per-turn lists are 0-based: turn_texts[k], queries[k], observations[k] belong to turn_id k + 1.
    """

    group_id: str  # unique per prompt (never a per-dataset index); the n samples share it
    sample_index: int  # 0..n-1 within the group
    golds: list[str]  # gold answers, carried from the data
    tokens: np.ndarray  # int32[T]
    loss_mask: np.ndarray  # int32[T]: 1 only on tokens the policy generated
    turn_id: np.ndarray  # int32[T]
    sampler_logprobs: np.ndarray  # float32[T]: log-prob of each generated token under the sampler, 0 elsewhere
    turn_texts: list[str]  # generated text of each turn
    queries: list[str | None]  # per turn: the <search> query issued after it, or None
    observations: list[str | None]  # per turn: the observation text appended after it, or None
    stop_reason: str  # STOP_ANSWER | STOP_MAX_TURNS | STOP_CONTEXT
    num_turns: int  # K >= 1 == len(turn_texts)
    search_failures: int  # retrieval calls that failed for this trajectory
    retrieved_titles: list[list[str] | None] | None = None  # per turn: titles of the documents retrieved after it
