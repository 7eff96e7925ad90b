"""Streaming reader for retrieval corpora (SPEC §6), one JSONL line at a time.

Two line formats are accepted:
  {"id": ..., "contents": "\"Title\"\ntext"}   Search-R1's wiki-18 format
  {"id": ..., "title": ..., "text": ...}
A malformed line stops the read with `CorpusError` naming the file, the line number and the reason, unless the
reader was told to skip bad lines (then they are counted in `bad_lines` and reported by the builder).
"""

import dataclasses
import gzip
import json
import pathlib


@dataclasses.dataclass(frozen=True)
class CorpusDocument:
    id: str
    title: str
    text: str
    # The line's own "contents" when it is not exactly '"title"\ntext', so Search-R1 clients get it back verbatim.
    raw_contents: str | None = None

    @property
    def contents(self) -> str:
        """Search-R1's `contents` field: '"Title"\\ntext'."""
        return self.raw_contents if self.raw_contents is not None else f'"{self.title}"\n{self.text}'


class CorpusError(ValueError):
    def __init__(self, path, line_number: int, reason: str):
        super().__init__(f"{path}:{line_number}: {reason}")
        self.path, self.line_number, self.reason = str(path), line_number, reason


def split_contents(contents: str) -> tuple[str, str]:
    """'"Title"\\ntext' -> ("Title", "text"); the first line is the title, one pair of quotes around it dropped."""
    title, newline, text = contents.partition("\n")
    if not newline:
        return "", contents
    if len(title) >= 2 and title.startswith('"') and title.endswith('"'):
        title = title[1:-1]
    return title, text


def parse_corpus_line(line: str) -> CorpusDocument:
    """One JSONL line -> CorpusDocument; ValueError with the reason when the line is malformed."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "id" not in record:
        raise ValueError('missing "id"')
    doc_id = record["id"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise ValueError(f'"id" must be a string or an integer, got {type(doc_id).__name__}')
    if "contents" in record:
        contents = record["contents"]
        if not isinstance(contents, str):
            raise ValueError(f'"contents" must be a string, got {type(contents).__name__}')
        title, text = split_contents(contents)
        canonical = f'"{title}"\n{text}'
        return CorpusDocument(str(doc_id), title, text, None if contents == canonical else contents)
    if "text" in record:
        title, text = record.get("title", ""), record["text"]
        for field, value in (("title", title), ("text", text)):
            if not isinstance(value, str):
                raise ValueError(f'"{field}" must be a string, got {type(value).__name__}')
        return CorpusDocument(str(doc_id), title, text)
    raise ValueError('needs "contents" (Search-R1 format) or "title" and "text"')


@dataclasses.dataclass(frozen=True)
class ReadPosition:
    """Where a reader stands after a document: enough to continue a read there (a resumed build)."""
    byte_offset: int   # in the file as stored (uncompressed files only: .gz resumes by counting lines)
    line: int          # lines consumed
    documents: int
    bad_lines: int
    first_bad_line: str | None


class CorpusReader:
    """Iterates the documents of a .jsonl (or .jsonl.gz) corpus, optionally from a ReadPosition.

    After a full iteration `documents` and `bad_lines` are final. `bytes_read` / `total_bytes` (on-disk, compressed
    for .gz) drive progress and ETA; `position()` is where the last document handed out ended.
    """

    def __init__(self, path, *, skip_bad_lines: bool = False, start: ReadPosition | None = None):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"corpus {self.path} does not exist")
        self.skip_bad_lines = skip_bad_lines
        self.total_bytes = self.path.stat().st_size
        self.start = start or ReadPosition(0, 0, 0, 0, None)
        self.bytes_read = self.start.byte_offset
        self.documents = self.start.documents
        self.bad_lines = self.start.bad_lines
        self.first_bad_line: str | None = self.start.first_bad_line  # "file:line: reason" of the first skipped
        self._line = self.start.line
        self._offset = self.start.byte_offset

    def position(self) -> ReadPosition:
        return ReadPosition(self._offset, self._line, self.documents, self.bad_lines, self.first_bad_line)

    def __iter__(self):
        gz = self.path.suffix == ".gz"
        with open(self.path, "rb") as raw:
            if gz:
                lines = gzip.open(raw)
                for _ in range(self.start.line):  # no random access into gzip: skip what was read before
                    lines.readline()
            else:
                raw.seek(self.start.byte_offset)
                lines = raw
            for line_number, line in enumerate(lines, start=self.start.line + 1):
                self.bytes_read = raw.tell()
                self._line = line_number
                self._offset += len(line)
                if not line.strip():
                    continue  # blank lines (e.g. a trailing one) carry no document
                try:
                    doc = parse_corpus_line(line.decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as e:
                    reason = f"not UTF-8 ({e.reason})" if isinstance(e, UnicodeDecodeError) else str(e)
                    error = CorpusError(self.path, line_number, reason)
                    if not self.skip_bad_lines:
                        raise error from None
                    self.bad_lines += 1
                    self.first_bad_line = self.first_bad_line or str(error)
                    continue
                self.documents += 1
                yield doc
