"""The papers' results table (SPEC §10), from per-example records (host side, pure Python).

One row per model; columns: each data source present, the seven Search-R1 benchmarks first in the papers' order
(NQ, TriviaQA, PopQA | HotpotQA, 2WikiMultiHopQA, MuSiQue, Bamboogle), any other source after them by name; then
the average EM over the data sources present (each source counts once, whatever its size, as the papers average),
and, when both groups are present, the averages over the general-QA and the multi-hop sources.

A record is a `tspo_jax.training.evaluation.trajectory_record` dict (`data_source`, `em`, `f1`,
`search_failures`, …): the table is computed from trajectories.jsonl alone, so it can be recomputed at any time.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping

GENERAL, MULTIHOP = "general", "multihop"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """data_source: the name Search-R1's data scripts write in the `data_source` column. column: the header."""

    data_source: str
    column: str
    group: str


BENCHMARKS = (
    Benchmark("nq", "NQ", GENERAL),
    Benchmark("triviaqa", "TriviaQA", GENERAL),
    Benchmark("popqa", "PopQA", GENERAL),
    Benchmark("hotpotqa", "HotpotQA", MULTIHOP),
    Benchmark("2wikimultihopqa", "2WikiMultiHopQA", MULTIHOP),
    Benchmark("musique", "MuSiQue", MULTIHOP),
    Benchmark("bamboogle", "Bamboogle", MULTIHOP),
)
_BY_SOURCE = {b.data_source: b for b in BENCHMARKS}
_GROUP_COLUMNS = {GENERAL: "General QA", MULTIHOP: "Multi-hop QA"}


def benchmark(data_source: str) -> Benchmark | None:
    """The paper benchmark a data_source names (case-insensitive), or None for any other source."""
    return _BY_SOURCE.get(data_source.lower())


def source_order(data_sources: Iterable[str]) -> list[str]:
    """The papers' column order: the seven benchmarks in their order, then the other sources by name."""
    position = {b.data_source: i for i, b in enumerate(BENCHMARKS)}

    def key(source: str):
        known = benchmark(source)
        return (0, position[known.data_source], source) if known else (1, 0, source)

    return sorted(set(data_sources), key=key)


@dataclasses.dataclass(frozen=True)
class SourceScore:
    """One data source: n examples, mean EM and F1, searches that failed and the examples they hit."""

    n: int
    em: float
    f1: float
    failed_searches: int
    examples_with_failed_searches: int


@dataclasses.dataclass(frozen=True)
class ResultsTable:
    """model: the row's label. per_source: in column order. average_em: over the sources (macro).
    group_em: {"general": x, "multihop": y} when both groups are present, else empty."""

    model: str
    per_source: dict[str, SourceScore]
    average_em: float
    group_em: dict[str, float]

    @property
    def n(self) -> int:
        return sum(score.n for score in self.per_source.values())

    @property
    def failed_searches(self) -> int:
        return sum(score.failed_searches for score in self.per_source.values())

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "columns": list(self.per_source),
            "per_source": {source: dataclasses.asdict(score) for source, score in self.per_source.items()},
            "average_em": self.average_em,
            **{f"{group}_em": em for group, em in self.group_em.items()},
            "n": self.n,
            "failed_searches": self.failed_searches,
        }

    def to_markdown(self) -> str:
        """The papers' row (EM), then per-source details and a note on failed searches."""
        headers = ["Model", *(_column(s) for s in self.per_source), "Avg."]
        values = [self.model, *(f"{s.em:.3f}" for s in self.per_source.values()), f"{self.average_em:.3f}"]
        for group, em in self.group_em.items():
            headers.append(_GROUP_COLUMNS[group])
            values.append(f"{em:.3f}")
        lines = ["Exact match (EM), greedy decoding.", "", _row(headers), _row(["---"] + ["---:"] * (len(headers) - 1)),
                 _row(values), "", _row(["data source", "n", "EM", "F1", "failed searches", "examples hit"]),
                 _row(["---"] + ["---:"] * 5)]
        for source, s in self.per_source.items():
            lines.append(_row([source, str(s.n), f"{s.em:.3f}", f"{s.f1:.3f}", str(s.failed_searches),
                               str(s.examples_with_failed_searches)]))
        if self.failed_searches:
            hit = sum(s.examples_with_failed_searches for s in self.per_source.values())
            lines += ["", f"**{self.failed_searches} searches failed** (the retrieval service did not answer) in {hit} "
                          f"of {self.n} examples; those examples were scored with a \"search failed\" observation. "
                          "Re-run them with `--redo-failed` once the service is healthy."]
        return "\n".join(lines) + "\n"


def _column(source: str) -> str:
    known = benchmark(source)
    return known.column if known else source


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def results_table(model: str, records: Iterable[Mapping]) -> ResultsTable:
    """The table of one model from its records (each example once)."""
    by_source: dict[str, list[Mapping]] = {}
    for record in records:
        by_source.setdefault(record["data_source"], []).append(record)
    if not by_source:
        raise ValueError("no records to tabulate")
    per_source = {}
    for source in source_order(by_source):
        rows = by_source[source]
        per_source[source] = SourceScore(
            n=len(rows), em=_mean(r["em"] for r in rows), f1=_mean(r["f1"] for r in rows),
            failed_searches=sum(int(r["search_failures"]) for r in rows),
            examples_with_failed_searches=sum(int(r["search_failures"]) > 0 for r in rows))
    average = _mean(s.em for s in per_source.values())
    groups: dict[str, list[float]] = {}
    for source, score in per_source.items():
        known = benchmark(source)
        if known:
            groups.setdefault(known.group, []).append(score.em)
    group_em = ({group: _mean(groups[group]) for group in (GENERAL, MULTIHOP)}
                if GENERAL in groups and MULTIHOP in groups else {})
    return ResultsTable(model=model, per_source=per_source, average_em=average, group_em=group_em)


def _mean(values: Iterable[float]) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)


def dumps(table: ResultsTable) -> str:
    return json.dumps(table.to_json(), indent=2) + "\n"
