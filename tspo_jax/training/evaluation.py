"""Greedy evaluation with the training agent (host side loop; the engine does the device work).

`greedy_eval` runs one greedy trajectory per QA example through the same agent, prompt, stop rules and limits as
training, scores it with the run's answer metric, and keeps every example's record (`trajectory_record`), so any
number it reports can be re-scored. The RL trainer's periodic eval, SFT's eval and `python -m tspo_jax.evaluate`
all go through it.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from tspo_jax import metrics as names
from tspo_jax.rewards import ScoringConfig, score_trajectories
from tspo_jax.rollout.trajectory import Trajectory


def trajectory_record(example, trajectory: Trajectory, *, answer: str | None, correct: bool, folr_turn: int,
                      turn_advantages: Sequence[float] | None = None) -> dict:
    """One trajectory as a JSON-ready dict: the question, each turn's text / query / observation (and advantage
    when given), the extracted answer, the golds, EM and the FOLR turn (0-based, -1 = none)."""
    turns = []
    for k, text in enumerate(trajectory.turn_texts):
        turn = {"text": text, "query": trajectory.queries[k], "observation": trajectory.observations[k]}
        if trajectory.retrieved_titles is not None:
            turn["retrieved_titles"] = trajectory.retrieved_titles[k]
        if turn_advantages is not None:
            turn["advantage"] = float(turn_advantages[k])
        turns.append(turn)
    return {"data_source": example.data_source, "id": example.uid, "question": example.question,
            "golds": list(example.golds), "prediction": answer, "em": float(correct), "folr_turn": int(folr_turn),
            "num_turns": trajectory.num_turns, "stop_reason": trajectory.stop_reason,
            "search_failures": trajectory.search_failures, "turns": turns}


@dataclasses.dataclass
class EvalResult:
    """per_source: data_source -> [correct, count]; records: one `trajectory_record` per example, in order."""

    per_source: dict[str, list[float]]
    records: list[dict]
    seconds: float

    def metrics(self) -> dict[str, float]:
        """`eval/<data_source>/em` for each source and `eval/em` over all examples."""
        sources = sorted(self.per_source)
        totals = np.array([self.per_source[s] for s in sources], np.float64).reshape(-1, 2)
        out = {names.eval_em_name(s): float(totals[i, 0] / totals[i, 1]) for i, s in enumerate(sources)}
        out["eval/em"] = float(totals[:, 0].sum() / max(totals[:, 1].sum(), 1.0))
        out["time/eval"] = self.seconds
        return out


def greedy_eval(agent, params, batches: Iterable[Sequence], *, prompts: Callable[[Sequence], list],
                scoring: ScoringConfig) -> EvalResult:
    """Greedy trajectories (one per example) for every batch of QA examples.

    agent: a SearchAgent whose engine decodes greedily. params: what its engine samples from.
    prompts(examples) -> RolloutPrompts (training.rollouts.rollout_prompts with the run's template)."""
    per_source: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    records = []
    started = time.perf_counter()
    for examples in batches:
        trajectories, _ = agent.rollout(params, prompts(examples), 1, seed=0)
        scores = score_trajectories([t.turn_texts for t in trajectories], [t.observations for t in trajectories],
                                    [t.golds for t in trajectories], config=scoring)
        for i, (example, trajectory) in enumerate(zip(examples, trajectories)):
            per_source[example.data_source][0] += float(scores.correct[i])
            per_source[example.data_source][1] += 1.0
            records.append(trajectory_record(example, trajectory, answer=scores.answers[i],
                                             correct=bool(scores.correct[i]), folr_turn=int(scores.folr_turn[i])))
    return EvalResult(per_source=dict(per_source), records=records, seconds=time.perf_counter() - started)
