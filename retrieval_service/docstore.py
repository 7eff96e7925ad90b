"""The on-disk document table: one JSON record per document in a flat byte file + int64 row offsets.

A 21M-passage corpus (~14 GB of text) is never held as Python objects: the server memory-maps both files and
decodes only the rows a search returns. Row i is the document with faiss / BM25 id i.
"""

import json
import mmap
import os
import pathlib

import numpy as np

from retrieval_service.corpus import CorpusDocument

RECORDS_FILE = "docs.jsonl"
OFFSETS_FILE = "docs.offsets.int64"  # little-endian int64[N + 1]; row i is bytes [off[i], off[i+1])


class DocumentStoreWriter:
    """Appends documents in order; `close()` finishes the offsets file and returns the row count.

    resume_at=(rows, bytes): continue a store whose first `rows` documents (`bytes` of records) were written and
    flushed by an earlier, interrupted build; anything after them is cut off.
    """

    def __init__(self, out_dir, *, resume_at: tuple[int, int] | None = None):
        out_dir = pathlib.Path(out_dir)
        rows, size = resume_at or (0, 0)
        mode = "r+b" if resume_at else "wb"
        self._records = open(out_dir / RECORDS_FILE, mode)
        self._offsets = open(out_dir / OFFSETS_FILE, mode)
        if resume_at:
            self._records.truncate(size)
            self._records.seek(size)
            self._offsets.truncate(8 * (rows + 1))
            self._offsets.seek(8 * (rows + 1))
        self._pending = [] if resume_at else [0]
        self._position = size
        self.count = rows

    def add(self, doc: CorpusDocument) -> None:
        record = {"id": doc.id, "title": doc.title, "text": doc.text}
        if doc.raw_contents is not None:
            record["contents"] = doc.raw_contents
        data = json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
        self._records.write(data)
        self._position += len(data)
        self._pending.append(self._position)
        self.count += 1
        if len(self._pending) >= 1 << 16:
            self._flush_offsets()

    def _flush_offsets(self):
        self._offsets.write(np.asarray(self._pending, dtype="<i8").tobytes())
        self._pending = []

    def flush(self) -> tuple[int, int]:
        """Writes everything added so far through to disk; -> (rows, bytes) to resume from."""
        self._flush_offsets()
        for f in (self._records, self._offsets):
            f.flush()
            os.fsync(f.fileno())
        return self.count, self._position

    def close(self) -> int:
        self._flush_offsets()
        self._records.close()
        self._offsets.close()
        return self.count


class DocumentStore:
    """Read-only, memory-mapped. store[i] -> CorpusDocument; thread-safe."""

    def __init__(self, index_dir):
        index_dir = pathlib.Path(index_dir)
        self._offsets = np.memmap(index_dir / OFFSETS_FILE, dtype="<i8", mode="r")
        records_path = index_dir / RECORDS_FILE
        with open(records_path, "rb") as f:
            self._records = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if len(self._offsets) < 2 or self._offsets[-1] != len(self._records):
            raise ValueError(f"{records_path}: size {len(self._records)} does not match the last offset in "
                             f"{index_dir / OFFSETS_FILE}; the document store is incomplete, rebuild the index")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, row: int) -> CorpusDocument:
        if not 0 <= row < len(self):
            raise IndexError(f"document row {row} outside [0, {len(self)})")
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        record = json.loads(self._records[start:end])
        return CorpusDocument(record["id"], record["title"], record["text"], record.get("contents"))
