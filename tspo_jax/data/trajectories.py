"""Demonstrated trajectories for supervised warm starts (SFT): a Grain source over a JSONL file, one per line.

    {"question": "Which river flows through Brisk Holm?",          # or "messages": [{"role", "content"}, …]
     "golds": ["Vesk"],                                            # or "golden_answers"
     "id": "…", "data_source": "…",                                # optional
     "turns": [
       {"text": "<think> … </think>\\n<search> Brisk Holm </search>",
        "documents": [{"title": "Brisk Holm", "text": "Brisk Holm is a town on the Vesk river, …"}, …]},
       {"text": "<think> … </think>\\n<answer> Vesk </answer>"}]}

Each turn is what the policy wrote (ending at its `</search>` / `</answer>`), with the documents the search after
it returned (`"search_failed": true` when it failed). The prompt is the run's template around the question
(RolloutSpec.prompt_template), or the line's own chat messages. Every line is validated when the file is opened,
so a bad line fails the run before training starts, naming file and line.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from tspo_jax.data.sources import JsonlLines
from tspo_jax.rollout.render import DemonstratedTurn


class TrajectoryDataError(ValueError):
    """A demonstration file or line that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class _Document:
    title: str
    text: str


@dataclasses.dataclass(frozen=True)
class Demonstration:
    """One demonstrated trajectory. uid: "<source name>:<row>". prompt_messages: the line's own chat messages
    as (role, content) pairs, else None (the run's template around `question` is used)."""

    uid: str
    question: str
    golds: tuple[str, ...]
    data_source: str
    turns: tuple[DemonstratedTurn, ...]
    prompt_messages: tuple[tuple[str, str], ...] | None = None


def _string(value, what: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise TrajectoryDataError(f"{where}: {what} must be a non-empty string, got {value!r}")
    return value


def _turn(raw, k: int, where: str) -> DemonstratedTurn:
    where = f"{where}, turn {k}"
    if not isinstance(raw, dict):
        raise TrajectoryDataError(f"{where}: expected an object with 'text', got {type(raw).__name__}")
    unknown = set(raw) - {"text", "documents", "search_failed"}
    if unknown:
        raise TrajectoryDataError(f"{where}: unknown field(s) {sorted(unknown)} (text, documents, search_failed)")
    text = _string(raw.get("text"), "'text'", where)
    documents = raw.get("documents")
    if documents is not None:
        if not isinstance(documents, list):
            raise TrajectoryDataError(f"{where}: 'documents' must be a list, got {type(documents).__name__}")
        docs = []
        for i, doc in enumerate(documents):
            if not isinstance(doc, dict) or not isinstance(doc.get("title"), str) or not isinstance(doc.get("text"), str):
                raise TrajectoryDataError(f"{where}, document {i}: expected {{\"title\": str, \"text\": str}}, "
                                          f"got {doc!r}")
            docs.append(_Document(doc["title"], doc["text"]))
        documents = tuple(docs)
    failed = raw.get("search_failed", False)
    if not isinstance(failed, bool):
        raise TrajectoryDataError(f"{where}: 'search_failed' must be true or false, got {failed!r}")
    return DemonstratedTurn(text=text, documents=documents, search_failed=failed)


def parse_demonstration(row, *, uid: str, where: str, default_source: str) -> Demonstration:
    """One JSON object -> Demonstration (TrajectoryDataError naming `where` and the field otherwise)."""
    if not isinstance(row, dict):
        raise TrajectoryDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    messages = row.get("messages")
    if messages is not None:
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in messages)):
            raise TrajectoryDataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
        messages = tuple((m["role"], m["content"]) for m in messages)
        question = row.get("question") or messages[-1][1]
    else:
        question = _string(row.get("question"), "'question' (or 'messages')", where)
    golds = row.get("golds", row.get("golden_answers"))
    if not isinstance(golds, list) or not golds or not all(isinstance(g, str) and g.strip() for g in golds):
        raise TrajectoryDataError(f"{where}: 'golds' must be a non-empty list of answers, got {golds!r}")
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        raise TrajectoryDataError(f"{where}: 'turns' must be a non-empty list of turns, got {turns!r}")
    source = row.get("data_source", default_source)
    return Demonstration(uid=uid, question=question, golds=tuple(golds), data_source=_string(source, "'data_source'", where),
                         turns=tuple(_turn(t, k, where) for k, t in enumerate(turns, start=1)),
                         prompt_messages=messages)


class JsonlTrajectorySource:
    """Random access over the demonstrations of a JSONL file (Grain's RandomAccessDataSource protocol)."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise TrajectoryDataError(f"demonstration file not found: {self.path}")
        self.name = self.path.stem
        self._lines = JsonlLines(self.path, self._parse)
        if not len(self._lines):
            raise TrajectoryDataError(f"{self.path}: no demonstrations in file")

    def _parse(self, raw: bytes, line_number: int, index: int) -> Demonstration:
        where = f"{self.path}, line {line_number}"
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TrajectoryDataError(f"{where}: not valid JSON ({error})") from None
        return parse_demonstration(row, uid=f"{self.name}:{index}", where=where, default_source=self.name)

    def where(self, index: int) -> str:
        return f"{self.path}, line {self._lines.line_number(index)}"

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> Demonstration:
        index = int(index)
        return self._parse(self._lines.read(index), self._lines.line_number(index), index)

    def __repr__(self) -> str:
        return f"JsonlTrajectorySource({str(self.path)!r}, rows={len(self)})"
