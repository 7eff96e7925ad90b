"""Where a run's files live: a local directory or a gs:// URL (host side).

Everything the trainer keeps under RUN_DIR goes through `etils.epath` paths (Orbax's own path type, with gcsfs
behind gs://): checkpoints (Orbax + TensorStore), metrics.jsonl, config.gin, operative_config.gin, the tiny model
a run made for itself, and TensorBoard events (tensorboardX's own GCS writer). A gs:// RUN_DIR is shared by every
host of a pod, which is what Orbax's multi-host checkpoints need.

Programs that only open POSIX paths get a *local working directory* instead: the demo data and its retrieval index
(read by the retrieval service process), a tiny model while it is built, the retrieval service's log. It is RUN_DIR
itself when RUN_DIR is local, else `train.local_dir` (default `~/.cache/tspo_jax/runs/<bucket>/<path>`); the run
says where at start-up. Any other URL scheme fails at start-up naming the setting that holds it.
"""

from __future__ import annotations

import os
import pathlib
import socket
import uuid
from collections.abc import Collection

from etils import epath

SUPPORTED_SCHEMES = ("gs",)
_LOCAL_CACHE = pathlib.Path("~/.cache/tspo_jax/runs")


class RunFilesError(ValueError):
    """A run path is unsupported or unusable; the message names the setting (RUN_DIR, …) and the path."""


def scheme(url: str) -> str | None:
    """"gs" for gs://bucket/x, None for a local path."""
    head, sep, _ = str(url).partition("://")
    return head if sep else None


def is_remote(path: str | os.PathLike) -> bool:
    return scheme(os.fspath(path)) is not None


def check_supported(url: str | os.PathLike, *, what: str) -> None:
    """A local path or a gs:// URL passes; any other URL scheme fails naming `what`."""
    found = scheme(os.fspath(url))
    if found is not None and found not in SUPPORTED_SCHEMES:
        raise RunFilesError(f"{what} = {os.fspath(url)!r}: only local paths and gs:// URLs are supported")


def run_path(url: str | os.PathLike, *, what: str) -> epath.Path:
    """The epath for a local path (made absolute) or a gs:// URL; anything else fails naming `what`."""
    url = os.fspath(url)
    check_supported(url, what=what)
    if scheme(url) is None:
        return epath.Path(os.path.abspath(os.path.expanduser(url)))
    try:
        import gcsfs  # noqa: F401  (epath's gs:// backend)
    except ImportError as error:
        raise RunFilesError(f"{what} = {url!r} needs gcsfs (pinned in requirements.txt): {error}") from None
    return epath.Path(url)


def require_local(url: str | os.PathLike | None, *, what: str) -> None:
    """Settings read by code that opens POSIX files (HF checkpoints, tokenizers, QA files, indexes) must be local
    paths; a URL fails at start-up naming the setting, rather than being taken for a relative directory."""
    if url is not None and is_remote(os.fspath(url)):
        raise RunFilesError(f"{what} = {os.fspath(url)!r} is a URL, but it is read from local disk on every host: "
                            f"copy it there first (e.g. `gcloud storage cp -r {os.fspath(url)} ~/`) and give that path")


def check_writable(path: epath.Path, *, what: str) -> None:
    """Creates `path` and writes, reads back and deletes a small probe file in it, so missing credentials, a
    missing bucket or a read-only directory stop the run at start-up naming `what` and the cause."""
    probe = path / f".write_probe.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("tspo_jax")
        if probe.read_text() != "tspo_jax":
            raise OSError("the probe file read back different bytes")
        probe.unlink()
    except Exception as error:  # gcsfs/google-auth raise many types (no credentials, 403, 404 bucket)
        raise RunFilesError(f"{what} {path} is not writable: {type(error).__name__}: {_first_line(error)}") from None


def local_work_dir(run_dir: epath.Path, local_dir: str | None, *, what: str) -> pathlib.Path:
    """Where files that need a POSIX path go: `local_dir` (the setting `what`) if given, else RUN_DIR itself when
    it is local, else ~/.cache/tspo_jax/runs/<bucket>/<path>."""
    if local_dir is not None:
        require_local(local_dir, what=what)
        return pathlib.Path(local_dir).expanduser().absolute()
    if not is_remote(run_dir):
        return pathlib.Path(os.fspath(run_dir))
    _, _, rest = os.fspath(run_dir).partition("://")
    return (_LOCAL_CACHE / rest.strip("/")).expanduser().absolute()


def open_run_dirs(run_dir: str | os.PathLike, local_dir: str | None, *, program: str
                  ) -> tuple[epath.Path, pathlib.Path]:
    """A run's RUN_DIR (checked writable) and its local working directory (created), for the `program` whose
    settings they are (`train`, `sft`): `<program>.run_dir`, `<program>.local_dir`. Fails with a RunFilesError
    naming the setting and the cause."""
    path = run_path(run_dir, what=f"RUN_DIR ({program}.run_dir)")
    local = local_work_dir(path, local_dir, what=f"{program}.local_dir")
    check_writable(path, what=f"RUN_DIR ({program}.run_dir)")
    try:
        local.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFilesError(f"the local working directory {local} ({program}.local_dir): {error}") from None
    return path, local


def copy_tree(source: os.PathLike, target: os.PathLike, *, skip: Collection[str] = ()) -> int:
    """Copies every file under `source` to the same relative path under `target` (local <-> gs://), except those
    whose relative path is in `skip`; returns the number of files. Used for small directories only (a tiny
    model)."""
    source, target = epath.Path(source), epath.Path(target)
    count = 0
    for path in _files_under(source):
        relative = os.path.relpath(os.fspath(path), os.fspath(source))
        if relative in skip:
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(path.read_bytes())
        count += 1
    return count


def _files_under(directory: epath.Path):
    # iterdir keeps the gs:// scheme on every child (epath's walk() does not, under fsspec).
    for child in sorted(directory.iterdir(), key=os.fspath):
        if child.is_dir():
            yield from _files_under(child)
        else:
            yield child


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)
