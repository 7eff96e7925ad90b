"""Resumable dense builds: encoded vectors are kept in shards under OUT.partial, with a state file saying which
shards are finished and where the corpus and the document store stood after each.

    OUT.partial/build_state.json      fingerprint (corpus sha256 + every argument that shapes the vectors) and,
                                      per finished shard, its row count, the corpus read position and the
                                      document store size after it
    OUT.partial/shards/00012.f32      float32[rows, D], row-major: the vectors of shard 12
    OUT.partial/docs.jsonl, ...        the document store, flushed to disk at every shard boundary

A shard's vectors go to `NNNNN.f32.part` until the shard is complete, then it is renamed, the document store is
fsynced and the state file replaced atomically — so a build killed at any instant restarts from its last finished
shard: the corpus is read from the recorded byte offset, the store truncated to the recorded size, and the half-done
shard encoded again. Restarted with a different corpus or different arguments it refuses, naming each difference.
"""

import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np

from retrieval_service.corpus import ReadPosition

STATE_FILE = "build_state.json"
SHARDS_DIR = "shards"


class ResumeMismatch(ValueError):
    """OUT.partial was started with another corpus or other arguments."""


def fingerprint_differences(then: dict, now: dict, prefix: str = "") -> list[str]:
    """'key: X then, Y now' for every leaf that differs between two fingerprints (nested dicts)."""
    out = []
    for key in sorted(set(then) | set(now)):
        a, b = then.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return out


def _write_json_atomically(path: pathlib.Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardedBuild:
    """The finished shards of one build directory; `begin_shard` / `append` / `finish_shard` add more."""

    def __init__(self, partial_dir, fingerprint: dict, dim: int, *, restart: bool = False):
        self.dir = pathlib.Path(partial_dir)
        self.dim = dim
        state_path = self.dir / STATE_FILE
        if state_path.exists() and not restart:
            state = json.loads(state_path.read_text())
            differences = fingerprint_differences(state["fingerprint"], fingerprint)
            if differences:
                raise ResumeMismatch(
                    f"{self.dir} holds {len(state['shards'])} finished shards of a build with another corpus or "
                    f"other arguments: " + "; ".join(differences)
                    + ". Run the same command as before to resume it, or pass --restart to discard it")
            self.shards = state["shards"]
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.shards = []
        self.fingerprint = fingerprint
        (self.dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        for stale in (self.dir / SHARDS_DIR).glob("*.part"):
            stale.unlink()  # a shard that was being written when the build stopped
        self._part = None
        self._save()

    @property
    def resumed(self) -> bool:
        return bool(self.shards)

    def read_position(self) -> ReadPosition | None:
        return ReadPosition(**self.shards[-1]["corpus"]) if self.shards else None

    def store_position(self) -> tuple[int, int] | None:
        """(rows, bytes) of the document store after the last finished shard."""
        return tuple(self.shards[-1]["store"]) if self.shards else None

    def _shard_path(self, i: int) -> pathlib.Path:
        return self.dir / SHARDS_DIR / f"{i:05d}.f32"

    def _save(self) -> None:
        _write_json_atomically(self.dir / STATE_FILE, {"fingerprint": self.fingerprint, "shards": self.shards})

    def append(self, vectors: np.ndarray) -> None:
        """Adds float32[n, D] vectors to the shard being built."""
        if self._part is None:
            self._part = open(self._shard_path(len(self.shards)).with_suffix(".f32.part"), "wb")
        self._part.write(np.ascontiguousarray(vectors, np.float32).tobytes())

    def finish_shard(self, rows: int, position: ReadPosition, store_at: tuple[int, int]) -> None:
        """Seals the current shard (rows vectors, the corpus read up to `position`, the store flushed to `store_at`)."""
        if self._part is None:
            return
        self._part.flush()
        os.fsync(self._part.fileno())
        self._part.close()
        self._part = None
        i = len(self.shards)
        part = self._shard_path(i).with_suffix(".f32.part")
        if part.stat().st_size != rows * self.dim * 4:
            raise RuntimeError(f"{part}: {part.stat().st_size} bytes, expected {rows} x {self.dim} float32")
        os.replace(part, self._shard_path(i))
        self.shards.append({"rows": rows, "corpus": dataclasses.asdict(position), "store": list(store_at)})
        self._save()

    def vectors(self) -> list[np.ndarray]:
        """The finished shards' vectors, memory-mapped, in order: float32[rows_i, D] each."""
        return [np.memmap(self._shard_path(i), dtype=np.float32, mode="r", shape=(s["rows"], self.dim))
                for i, s in enumerate(self.shards)]

    def discard_shards(self) -> None:
        """Drops the vector shards and the state (once the index is written from them)."""
        shutil.rmtree(self.dir / SHARDS_DIR)
        (self.dir / STATE_FILE).unlink()
