"""The output directory of an evaluation (host side, local or shared POSIX filesystem):

    OUT/evaluation.json                       what is evaluated: model, step, data files, settings, examples
    OUT/trajectories.jsonl                    one record per example (a single process appends here; the final
                                              file holds every example once, in data order)
    OUT/trajectories.shard-I-of-N.jsonl       shard I's records while several processes share the evaluation
    OUT/progress[.shard-I-of-N].jsonl         the progress lines as JSON rows (rate, ETA, EM so far), to plot
    OUT/results.md, OUT/results.json          the table, written once every example has its record

Each record is appended and flushed as its example finishes, so a killed evaluation loses at most the examples in
flight: restarted with the same command it reads what is there and runs only the rest (a line torn by the kill is
dropped). Every process appends only to its own file; whichever finishes last (under a lock) finds every example
recorded and writes the merged trajectories.jsonl and the table. A directory holding another evaluation (another
model, step, data or setting) is refused, naming what differs, rather than mixed into one table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

MANIFEST = "evaluation.json"
RECORDS = "trajectories.jsonl"
_MORE_RECORDS = re.compile(r"^trajectories\..+\.jsonl$")  # a shard's, or one copied in by a merge


class StoreError(RuntimeError):
    """The output directory cannot be used for this evaluation; the message says why and names the file."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's slice of the examples: every `count`-th one from `index` (0-based)."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"--shard {self.index}/{self.count}: expected I/N with 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not match:
            raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4 (the first of four processes)")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def suffix(self) -> str:
        """"" for the only process, ".shard-I-of-N" otherwise."""
        return "" if self.count == 1 else f".shard-{self.index}-of-{self.count}"

    def take(self, items: list) -> list:
        return items[self.index::self.count]


class EvalStore:
    """OUT for the evaluation that `manifest` (JSON-able dict) describes; created or checked on open."""

    def __init__(self, out_dir: str | os.PathLike, manifest: Mapping):
        self.out_dir = pathlib.Path(out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"--out {self.out_dir}: {error}") from None
        self.manifest = json.loads(json.dumps(manifest))  # as it reads back (tuples become lists)
        path = self.out_dir / MANIFEST
        if path.exists():
            stored = read_manifest(self.out_dir)
            differences = [key for key in sorted(set(stored) | set(self.manifest))
                           if stored.get(key) != self.manifest.get(key)]
            if differences:
                details = "; ".join(f"{key}: {_short(stored.get(key))} there, {_short(self.manifest.get(key))} now"
                                    for key in differences)
                raise StoreError(f"{path} records another evaluation ({details}); give another --out, or delete "
                                 f"{self.out_dir} to start over")
        else:
            _write_atomic(path, json.dumps(self.manifest, indent=2) + "\n")

    # ----- records -----------------------------------------------------------------------------------------
    def record_files(self) -> list[pathlib.Path]:
        files = [self.out_dir / RECORDS] if (self.out_dir / RECORDS).exists() else []
        return files + sorted(p for p in self.out_dir.iterdir() if _MORE_RECORDS.match(p.name))

    def records(self) -> dict[str, dict]:
        """Every complete record in OUT by id (the first one when an id was recorded twice)."""
        out: dict[str, dict] = {}
        for path in self.record_files():
            for record in read_records(path):
                out.setdefault(record["id"], record)
        return out

    @contextlib.contextmanager
    def claim(self, shard: Shard):
        """Holds `shard`'s place in OUT: a second process started on the same OUT and shard (whose appends would
        interleave with this one's) fails at once, naming it. Released when the process ends, however it ends."""
        path = self.out_dir / f".trajectories{shard.suffix}.lock"
        with open(path, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"another process is already evaluating {self.out_dir} with the same --shard "
                                 f"({path} is locked)") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def writer(self, shard: Shard) -> Iterator[Callable[[dict], None]]:
        """append(record) for this process's own file, flushed per record; a line torn by a kill is cut first."""
        path = self.out_dir / f"trajectories{shard.suffix}.jsonl"
        _cut_torn_line(path)
        with open(path, "a", encoding="utf-8") as f:
            def append(record: dict) -> None:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()

            yield append
            os.fsync(f.fileno())

    def drop(self, ids: set[str]) -> int:
        """Removes the records of `ids` from every record file (so those examples run again); returns how many.
        Rewrites other shards' files too: no other process may be evaluating into OUT meanwhile."""
        dropped = 0
        with self.lock():
            for path in self.record_files():
                records = list(read_records(path))
                kept = [r for r in records if r["id"] not in ids]
                dropped += len(records) - len(kept)
                _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        return dropped

    # ----- the merged result -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """Serializes the processes that share OUT while one of them reads or rewrites the record files."""
        with open(self.out_dir / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def merge(self, order: Callable[[dict], object]) -> list[dict]:
        """Every record once, sorted by `order`, written as OUT/trajectories.jsonl; the shard files, now in it,
        are removed. Call under `lock()` once every example has a record."""
        records = sorted(self.records().values(), key=order)
        shard_files = [p for p in self.record_files() if p.name != RECORDS]
        _write_atomic(self.out_dir / RECORDS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        for path in shard_files:
            path.unlink()
        return records

    def write_results(self, markdown: str, results_json: str) -> None:
        _write_atomic(self.out_dir / "results.md", markdown)
        _write_atomic(self.out_dir / "results.json", results_json)

    def progress_log(self, shard: Shard):
        """The file progress rows are appended to (one JSON object per line)."""
        return open(self.out_dir / f"progress{shard.suffix}.jsonl", "a", encoding="utf-8")


def read_manifest(out_dir: pathlib.Path) -> dict:
    path = pathlib.Path(out_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} not found: is {out_dir} the --out of an evaluation?") from None
    except json.JSONDecodeError as error:
        raise StoreError(f"{path} is not valid JSON ({error})") from None


def read_records(path: pathlib.Path) -> Iterable[dict]:
    """The complete records of one file. Only the last line may be torn (by a kill while it was written): it is
    skipped. A bad line anywhere else is damage, and stops with the file and line."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError("not a record (a JSON object with an id)")
        except ValueError as error:
            if number == len(lines) and not line.endswith("\n"):
                return
            raise StoreError(f"{path}, line {number}: {error}") from None
        yield record


def _cut_torn_line(path: pathlib.Path) -> None:
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."
