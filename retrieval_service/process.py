"""RetrievalServer: runs `python -m retrieval_service.serve` as a subprocess on loopback and waits until it serves.

    with RetrievalServer(index_dir) as server:          # port=0: a free port, chosen by the server itself
        client = RetrievalClient(server.address)        # "127.0.0.1:PORT"

Used by the rollout tests, the trainer and the main job. `stop()` terminates gracefully, `kill()` is SIGKILL (for
failure tests), `start()` again restarts on the same port. The server's log goes to `log_path`. Its JAX (the
query encoder) runs on the host CPU unless `device=True`.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from retrieval_service.client import RetrievalClient


class RetrievalServer:
    def __init__(self, index_dir, *, port: int = 0, http_port: int | None = None, host: str = "127.0.0.1",
                 max_batch: int | None = None, extra_args=(), log_path=None, start_timeout_s: float = 300.0,
                 device: bool = False):
        self.index_dir = pathlib.Path(index_dir)
        self.device = device  # False: JAX on the host CPU, whatever this process's environment says
        self.host, self.port, self.http_port = host, port, http_port
        self.max_batch, self.extra_args = max_batch, list(extra_args)
        self.start_timeout_s = start_timeout_s
        self._tmp = tempfile.TemporaryDirectory(prefix="retrieval-server-")
        self.log_path = pathlib.Path(log_path) if log_path else pathlib.Path(self._tmp.name) / "server.log"
        self._ready_file = pathlib.Path(self._tmp.name) / "ready.json"
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "retrieval_service.serve", "--index", str(self.index_dir),
               "--host", self.host, "--port", str(self.port), "--ready-file", str(self._ready_file)]
        if self.http_port is not None:
            cmd += ["--http-port", str(self.http_port)]
        if self.max_batch is not None:
            cmd += ["--max-batch", str(self.max_batch)]
        if self.device:
            cmd += ["--device"]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The child's environment: ours, with JAX pinned to the host CPU unless `device` (a trainer that starts
        a service on a TPU host must keep its chips)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if not self.device:
            env["JAX_PLATFORMS"] = "cpu"
        return env

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def start(self) -> "RetrievalServer":
        """Starts the process and returns once Health says serving; raises RuntimeError with the log otherwise."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"retrieval server pid {self.process.pid} is already running on {self.address}")
        self._ready_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.environment())
        deadline = time.monotonic() + self.start_timeout_s
        while not self._ready_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"retrieval server exited with code {self.process.returncode} before serving "
                                   f"({' '.join(self.command())}); log {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"retrieval server not ready after {self.start_timeout_s}s; log "
                                   f"{self.log_path}:\n{self.log_tail()}")
            time.sleep(0.05)
        ready = json.loads(self._ready_file.read_text())
        self.port = ready["grpc_port"]  # later restarts reuse it, so clients keep their address
        if self.http_port is not None:
            self.http_port = ready["http_port"]
        with RetrievalClient(self.address, deadline_s=2.0) as client:
            while not client.health():
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.kill()
                    raise RuntimeError(f"retrieval server on {self.address} never answered Health; log "
                                       f"{self.log_path}:\n{self.log_tail()}")
                time.sleep(0.05)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (graceful: in-flight requests finish), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL now: in-flight requests fail with UNAVAILABLE (what a crashed replica looks like)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "RetrievalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):
        try:
            self.kill()
        except Exception:
            pass
