"""What the agent did, for people (host side): a few decoded trajectories per eval in RUN_DIR/samples/step_N.jsonl
and one of them printed readably on the console.

Each file holds `{"kind": "eval", …}` rows (greedy eval trajectories) and `{"kind": "train", …}` rows (the latest
training step's sampled trajectories with each turn's advantage), in tspo_jax.training.evaluation's
`trajectory_record` layout: question, each turn's text, query and retrieved titles, the answer, the golds, EM and
the FOLR turn.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence


def write_samples(run_dir, step: int, *, eval_records: Sequence[dict], train_records: Sequence[dict]) -> object:
    """Writes RUN_DIR/samples/step_N.jsonl (run_dir: an epath, local or gs://); returns its path."""
    directory = run_dir / "samples"
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"kind": "eval", **r} for r in eval_records] + [{"kind": "train", **r} for r in train_records]
    path = directory / f"step_{step}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def readable(record: dict, *, width: int = 110) -> str:
    """One trajectory record as indented text: the question, each turn (text, query, retrieved titles,
    advantage) and the verdict."""
    lines = [f"Q: {record['question']}   gold: {' | '.join(record['golds'])}"]
    for k, turn in enumerate(record["turns"]):
        head = f"  turn {k}"
        if "advantage" in turn:
            head += f" (A={turn['advantage']:+.2f})"
        lines.append(textwrap.shorten(f"{head}: {turn['text']}", width=width, placeholder=" …"))
        if turn.get("query") is not None:
            titles = ", ".join(turn.get("retrieved_titles") or [])
            lines.append(textwrap.shorten(f"      searched {turn['query']!r} -> {titles}", width=width,
                                          placeholder=" …"))
    folr = "none" if record["folr_turn"] < 0 else f"turn {record['folr_turn']}"
    lines.append(f"  answer: {record['prediction']!r}  EM {record['em']:.0f}  FOLR {folr}")
    return "\n".join(lines)
