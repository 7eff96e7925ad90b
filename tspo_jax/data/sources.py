"""Random-access QA sources for Grain: Search-R1 parquet rows and plain JSONL (SPEC.md §6).

Host-side only. Each file is validated completely when it is opened, so a bad row stops the run before any
training work, naming the file and the line (JSONL) or row (parquet). Rows are then read lazily: a JSONL source
keeps only byte offsets, a parquet source keeps the Arrow table (columnar, no Python object per row).

Every example gets `uid = "<source name>:<row>"`. The source name is unique across the sources of a run (the
pipeline checks), so the uid is unique per prompt across datasets; Search-R1's `extra_info.index` restarts at 0
in every dataset, so it is kept as `source_id` for reference but never used as the group id.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np


class QADataError(ValueError):
    """A data file is missing or holds a row that cannot be used; the message names the file and line/row."""


@dataclasses.dataclass(frozen=True)
class QAExample:
    """One prompt of a QA dataset.

    uid: unique across every source of a run; the n samples drawn for this prompt share it as their group id.
    question: the bare question; the rollout's chat template wraps it.
    golds: the gold answers (at least one).
    data_source: the dataset it belongs to (per-source eval EM is reported under this name).
    source_id: the row's own id in its dataset (Search-R1 `extra_info.index` or JSONL `id`), for reference only.
    prompt_messages: the dataset's own chat messages when it ships them (Search-R1 parquet), else None.
    """

    uid: str
    question: str
    golds: tuple[str, ...]
    data_source: str
    source_id: str
    prompt_messages: tuple[tuple[str, str], ...] | None = None


def default_source_name(path: str | pathlib.Path) -> str:
    """`<parent dir>/<stem>`: tells nq/train.parquet from hotpotqa/train.parquet."""
    path = pathlib.Path(path)
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def _golds_from(value, where: str) -> tuple[str, ...]:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise QADataError(f"{where}: gold answers must be a non-empty list of strings, got {value!r}")
    golds = []
    for gold in value:
        if isinstance(gold, (int, float)) and not isinstance(gold, bool):
            gold = str(gold)  # numeric answers ("1990") are compared as text anyway
        if not isinstance(gold, str) or not gold.strip():
            raise QADataError(f"{where}: gold answer {gold!r} is not a non-empty string")
        golds.append(gold)
    return tuple(golds)


def _require_file(path: pathlib.Path, kind: str) -> None:
    if not path.is_file():
        raise QADataError(f"{kind} file not found: {path}")


class JsonlLines:
    """The non-blank lines of a JSONL file by index, for random access: where each starts and its line number
    (for error messages). `check(raw, line_number, index)` sees every line while the file is indexed, so a bad
    line fails before any training starts."""

    def __init__(self, path: pathlib.Path, check):
        self.path = path
        offsets, line_numbers = [], []
        with open(path, "rb") as f:
            offset = 0
            for line_number, raw in enumerate(f, start=1):
                if raw.strip():
                    check(raw, line_number, len(offsets))
                    offsets.append(offset)
                    line_numbers.append(line_number)
                offset += len(raw)
        self._offsets = np.asarray(offsets, np.int64)
        self._line_numbers = np.asarray(line_numbers, np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def line_number(self, index: int) -> int:
        return int(self._line_numbers[int(index)])

    def read(self, index: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[int(index)]))
            return f.readline()


class JsonlQASource:
    """Lines of `{"question": str, "golden_answers": [str, ...], "id"?: str|int, "data_source"?: str}`.

    Blank lines are skipped. `data_source` defaults to the file's name (stated here, the one rule) when a line
    has none.
    """

    def __init__(self, path: str | pathlib.Path, *, name: str | None = None):
        self.path = pathlib.Path(path)
        self.name = name or default_source_name(self.path)
        _require_file(self.path, "JSONL data")
        self._lines = JsonlLines(self.path, lambda raw, line_number, _: self._parse(raw, line_number))
        if not len(self._lines):
            raise QADataError(f"{self.path}: no examples in file")

    def _parse(self, raw: bytes, line_number: int) -> dict:
        where = f"{self.path}, line {line_number}"
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QADataError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise QADataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise QADataError(f"{where}: 'question' must be a non-empty string, got {question!r}")
        if "golden_answers" not in row:
            raise QADataError(f"{where}: missing 'golden_answers'")
        golds = _golds_from(row["golden_answers"], where)
        data_source = row.get("data_source", self.path.stem)
        if not isinstance(data_source, str) or not data_source:
            raise QADataError(f"{where}: 'data_source' must be a non-empty string, got {data_source!r}")
        return {"question": question, "golds": golds, "data_source": data_source, "id": row.get("id")}

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> QAExample:
        index = int(index)
        row = self._parse(self._lines.read(index), self._lines.line_number(index))
        source_id = str(row["id"]) if row["id"] is not None else str(index)
        return QAExample(
            uid=f"{self.name}:{index}",
            question=row["question"],
            golds=row["golds"],
            data_source=row["data_source"],
            source_id=source_id,
        )

    def __repr__(self) -> str:
        return f"JsonlQASource({str(self.path)!r}, name={self.name!r}, rows={len(self)})"


class ParquetQASource:
    """Search-R1 rows: `data_source`, `prompt` [chat messages], `reward_model.ground_truth.target` [answers],
    `extra_info.index`, and (in Search-R1's own files) `question`. Without a `question` column the question is
    taken from the user message after its last "Question:".
    """

    REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model")

    def __init__(self, path: str | pathlib.Path, *, name: str | None = None):
        import pyarrow.parquet as pq  # host-side only, and only when parquet is used

        self.path = pathlib.Path(path)
        self.name = name or default_source_name(self.path)
        _require_file(self.path, "parquet data")
        try:
            table = pq.read_table(self.path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise QADataError(f"{self.path}: cannot be read as parquet ({type(e).__name__}: {e})") from None
        missing = [c for c in self.REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise QADataError(
                f"{self.path}: missing column(s) {missing}; Search-R1 rows need {list(self.REQUIRED_COLUMNS)} "
                f"(found {table.column_names})"
            )
        if table.num_rows == 0:
            raise QADataError(f"{self.path}: no rows")
        keep = [c for c in ("data_source", "prompt", "reward_model", "extra_info", "question") if c in table.column_names]
        self._table = table.select(keep)
        for row in range(self._table.num_rows):  # validate every row now
            self._example(row)

    def __len__(self) -> int:
        return self._table.num_rows

    def _example(self, row: int) -> QAExample:
        where = f"{self.path}, row {row}"
        record = self._table.slice(row, 1).to_pylist()[0]
        data_source = record["data_source"]
        if not isinstance(data_source, str) or not data_source:
            raise QADataError(f"{where}: 'data_source' must be a non-empty string, got {data_source!r}")
        try:
            target = record["reward_model"]["ground_truth"]["target"]
        except (KeyError, TypeError):
            raise QADataError(f"{where}: missing reward_model.ground_truth.target") from None
        golds = _golds_from(target, where + " reward_model.ground_truth.target")
        messages = record["prompt"]
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        ):
            raise QADataError(f"{where}: 'prompt' must be a non-empty list of chat messages, got {messages!r}")
        question = record.get("question")
        if question is None:
            user = [m["content"] for m in messages if m.get("role") == "user"]
            if not user:
                raise QADataError(f"{where}: 'prompt' has no user message and there is no 'question' column")
            content = user[-1]
            question = content.rsplit("Question:", 1)[1] if "Question:" in content else content
        if not isinstance(question, str) or not question.strip():
            raise QADataError(f"{where}: question is empty")
        extra = record.get("extra_info") or {}
        source_id = str(extra.get("index", row)) if isinstance(extra, dict) else str(row)
        return QAExample(
            uid=f"{self.name}:{row}",
            question=question.strip(),
            golds=golds,
            data_source=data_source,
            source_id=source_id,
            prompt_messages=tuple((m.get("role", "user"), m["content"]) for m in messages),
        )

    def __getitem__(self, index: int) -> QAExample:
        return self._example(int(index))

    def __repr__(self) -> str:
        return f"ParquetQASource({str(self.path)!r}, name={self.name!r}, rows={len(self)})"


def open_qa_source(path: str | pathlib.Path, *, name: str | None = None) -> JsonlQASource | ParquetQASource:
    """Opens a `.parquet` (Search-R1) or `.jsonl`/`.json` (plain) QA file, validating every row."""
    path = pathlib.Path(path)
    if path.suffix == ".parquet":
        return ParquetQASource(path, name=name)
    if path.suffix in (".jsonl", ".json"):
        return JsonlQASource(path, name=name)
    raise QADataError(f"{path}: unknown data format {path.suffix!r} (expected .parquet, .jsonl or .json)")
