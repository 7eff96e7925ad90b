"""Demonstrated trajectories -> the token stream a rollout would produce (host side; SFT's input).

A demonstration is a prompt and the policy's turns, each with what the search after it returned. Rendering
applies the agent loop's own rules (tspo_jax.rollout.agent) without an engine: each turn's text is tokenized as
the policy's tokens (loss_mask 1; a turn that ends without `</search>` or `</answer>` ends, as in a rollout, with
the EOS token the policy writes, appended unless the text already ends with one), and after it comes exactly the observation the agent would append (search
results, the "search failed" text, the correction for a turn with neither tag, the final-turn notice after
`max_turns`), built by the agent's own `ObservationCodec` (loss_mask 0). A demonstration the agent could not
have produced (text after the stop tag, turns after the answer, a turn over its budget, a search without
results, a context overflow) is refused with the reason, never silently cut.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tspo_jax.rollout import prompts as texts
from tspo_jax.rollout.agent import AgentConfig, ObservationCodec, extract_query
from tspo_jax.rollout.stops import STOP_STRINGS
from tspo_jax.rollout.tokenizer import stop_token_ids

ANSWER_CLOSE = "</answer>"


class DemonstrationError(ValueError):
    """A demonstration the agent loop could not have produced; the message says which turn and why."""


@dataclasses.dataclass(frozen=True)
class DemonstratedTurn:
    """text: what the policy wrote in this turn, ending at its stop tag (`</search>` or `</answer>`), if any.
    documents: what the search after it returned (required after a turn that searches, unless search_failed).
    search_failed: the search after it failed (the agent then shows SEARCH_FAILED_TEXT)."""

    text: str
    documents: tuple[texts.Document, ...] | None = None
    search_failed: bool = False


@dataclasses.dataclass(frozen=True)
class RenderedTrajectory:
    """tokens int32[T]; loss_mask int32[T] (1 on the policy's tokens); turn_id int32[T] (0 prompt, k turn k and
    the observation after it), as in `Trajectory`."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    turn_id: np.ndarray


def _check_stop(text: str, turn: int) -> None:
    ends = [text.find(stop) + len(stop) for stop in STOP_STRINGS if stop in text]
    if ends and min(ends) != len(text):
        raise DemonstrationError(f"turn {turn}: text continues after its first stop tag (a rollout stops at "
                                 f"{STOP_STRINGS}): {text!r}")


def render_demonstration(codec: ObservationCodec, prompt_tokens: Sequence[int],
                         turns: Sequence[DemonstratedTurn]) -> RenderedTrajectory:
    """The agent's token stream for `turns` after `prompt_tokens` (codec: the run's ObservationCodec, which
    carries its AgentConfig)."""
    config: AgentConfig = codec.config
    if not turns:
        raise DemonstrationError("no turns")
    eos_ids = set(stop_token_ids(codec.tokenizer))
    tokens, loss_mask, turn_id = list(prompt_tokens), [0] * len(prompt_tokens), [0] * len(prompt_tokens)
    final_turn = config.max_turns == 0
    for k, turn in enumerate(turns, start=1):
        last = k == len(turns)
        _check_stop(turn.text, k)
        ids = codec.encode(turn.text)
        if not ids:
            raise DemonstrationError(f"turn {k}: empty text")
        if not turn.text.endswith(STOP_STRINGS) and ids[-1] not in eos_ids:
            ids.append(codec.tokenizer.eos_token_id)  # a turn without a stop tag ends when the policy writes EOS
        if len(ids) > config.max_turn_tokens:
            raise DemonstrationError(f"turn {k}: {len(ids)} tokens, over AgentConfig.max_turn_tokens="
                                     f"{config.max_turn_tokens}")
        if len(tokens) + len(ids) > config.max_context_tokens:
            raise DemonstrationError(f"turn {k}: the trajectory reaches {len(tokens) + len(ids)} tokens, over "
                                     f"AgentConfig.max_context_tokens={config.max_context_tokens}")
        tokens += ids
        loss_mask += [1] * len(ids)
        turn_id += [k] * len(ids)
        if turn.text.endswith(ANSWER_CLOSE) or final_turn:
            if not last:
                why = "answers" if turn.text.endswith(ANSWER_CLOSE) else f"is the final turn (max_turns={config.max_turns})"
                raise DemonstrationError(f"turn {k} {why}, yet {len(turns) - k} more turn(s) follow")
            break
        if last:
            raise DemonstrationError(f"turn {k} is the last but neither answers nor is the final turn: the agent "
                                     "would go on")
        searches = turn.text.endswith(STOP_STRINGS[0]) and extract_query(turn.text) is not None
        if searches and turn.search_failed:
            observation = codec.search_failed()
        elif searches:
            if turn.documents is None:
                raise DemonstrationError(f"turn {k} searches but has no documents (or search_failed)")
            observation = codec.documents(turn.documents)
        else:
            if turn.documents is not None:
                raise DemonstrationError(f"turn {k} has documents but issues no search")
            observation = codec.invalid_action()
        final_turn = k >= config.max_turns
        obs = codec.assemble(observation, final_turn=final_turn, room=config.max_context_tokens - len(tokens) - 1)
        if obs is None:
            raise DemonstrationError(f"turn {k}: the observation after it does not fit in AgentConfig."
                                     f"max_context_tokens={config.max_context_tokens}")
        tokens += obs
        loss_mask += [0] * len(obs)
        turn_id += [k] * len(obs)
    return RenderedTrajectory(tokens=np.asarray(tokens, np.int32), loss_mask=np.asarray(loss_mask, np.int32),
                              turn_id=np.asarray(turn_id, np.int32))
