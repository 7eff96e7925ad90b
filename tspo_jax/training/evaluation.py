"""Greedy evaluation with the training agent (host side loop; the engine does the device work).

`greedy_records` runs one greedy trajectory per QA example through the same agent, prompt, stop rules and limits
as training, with the slots kept full across all the examples (continuous batching), scores each with the run's
answer metric and yields its record (`trajectory_record`) as soon as it ends, so any number it reports can be
re-scored. `greedy_eval` collects them for the RL trainer's periodic eval (and SFT's); `python -m
tspo_jax.evaluate` saves each as it comes, so a long evaluation can resume.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from tspo_jax import metrics as names
from tspo_jax.rewards import ScoringConfig, f1_score, score_trajectory
from tspo_jax.rollout.agent import RolloutMetrics
from tspo_jax.rollout.trajectory import Trajectory


def trajectory_record(example, trajectory: Trajectory, *, answer: str | None, correct: bool, folr_turn: int,
                      turn_advantages: Sequence[float] | None = None) -> dict:
    """One trajectory as a JSON-ready dict: the example (`id` = its uid, unique across a run's files;
    `source_id` = the dataset's own id), each turn's text / query / observation / retrieved titles (and
    advantage when given), the extracted answer (`prediction`, None without an <answer>), the golds, EM, F1
    (SPEC §3), the FOLR turn (0-based, -1 = none), the stop reason and the failed searches."""
    turns = []
    for k, text in enumerate(trajectory.turn_texts):
        turn = {"text": text, "query": trajectory.queries[k], "observation": trajectory.observations[k]}
        if trajectory.retrieved_titles is not None:
            turn["retrieved_titles"] = trajectory.retrieved_titles[k]
        if turn_advantages is not None:
            turn["advantage"] = float(turn_advantages[k])
        turns.append(turn)
    golds = list(example.golds)
    return {"data_source": example.data_source, "id": example.uid, "source_id": example.source_id,
            "question": example.question, "golds": golds, "prediction": answer, "em": float(correct),
            "f1": f1_score(answer, golds), "folr_turn": int(folr_turn), "num_turns": trajectory.num_turns,
            "stop_reason": trajectory.stop_reason, "search_failures": trajectory.search_failures, "turns": turns}


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


def greedy_records(agent, params, examples: Iterable, *, prompts: Callable[[Sequence], list],
                   scoring: ScoringConfig, metrics: RolloutMetrics | None = None) -> Iterator[dict]:
    """One `trajectory_record` per QA example, yielded as soon as its greedy trajectory ends (not in order).

    agent: a SearchAgent whose engine decodes greedily; its slots stay full across all `examples` (drawn
    lazily), with one retrieval call per round for every pending search. params: what its engine samples from.
    prompts(examples) -> RolloutPrompts (training.rollouts.rollout_prompts with the run's template).
    metrics: the agent's counters (tokens, searches, failures, time), updated in place.
    """
    pending: dict[str, object] = {}

    def prompt_stream():
        for example in examples:
            if example.uid in pending:
                raise ValueError(f"example {example.uid!r} is being evaluated twice at once")
            pending[example.uid] = example
            yield prompts([example])[0]

    for trajectory in agent.stream(params, prompt_stream(), seed=0, metrics=metrics):
        example = pending.pop(trajectory.group_id)
        score = score_trajectory(trajectory.turn_texts, trajectory.observations, trajectory.golds, config=scoring)
        yield trajectory_record(example, trajectory, answer=score.answer, correct=score.correct,
                                folr_turn=-1 if score.folr_turn is None else score.folr_turn)


def greedy_eval(agent, params, batches: Iterable[Sequence], *, prompts: Callable[[Sequence], list],
                scoring: ScoringConfig) -> EvalResult:
    """Greedy trajectories (one per example) for every example of `batches`, as `greedy_records` (the batches
    only say which examples, in which order: the agent batches them continuously)."""
    started = time.perf_counter()
    examples = [example for batch in batches for example in batch]
    order = {example.uid: i for i, example in enumerate(examples)}
    records = sorted(greedy_records(agent, params, examples, prompts=prompts, scoring=scoring),
                     key=lambda record: order[record["id"]])
    per_source: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for record in records:
        per_source[record["data_source"]][0] += record["em"]
        per_source[record["data_source"]][1] += 1.0
    return EvalResult(per_source=dict(per_source), records=records, seconds=time.perf_counter() - started)
