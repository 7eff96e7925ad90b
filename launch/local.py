#!/usr/bin/env python3
"""Train on this machine against a real corpus: build the retrieval index if it is not built yet, start the
retrieval service on loopback, run the trainer, and stop the service when training ends.

    python launch/local.py --corpus data/wiki18.jsonl --index runs/wiki18_index \\
        -- --gin_file=configs/experiments/search_r1_qwen2_5_3b.gin --gin.MODEL_DIR="'/ckpt/Qwen2.5-3B'" \\
           --gin.RUN_DIR="'runs/tspo_3b'"

The service runs in its own process and outlives trainer restarts only if you start it yourself; this script
ties them together for one run. Restarting the same command resumes from the run's latest checkpoint.
`--dry-run` prints the commands without running them. (`make train` needs none of this: the tiny_cpu job
makes its own data, index and service.)
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_index_command(python: str, corpus: str, index: str, backend: str, encoder: str | None) -> list[str]:
    command = [python, "-m", "retrieval_service.build_index", "--corpus", corpus, "--backend", backend, "--out", index]
    return command + (["--encoder", encoder] if encoder else [])


def serve_command(python: str, index: str, port: int) -> list[str]:
    """The service's JAX stays on the host CPU (no --device), leaving the accelerators to the trainer."""
    return [python, "-m", "retrieval_service.serve", "--index", index, "--port", str(port), "--host", "127.0.0.1"]


def service_environment() -> dict[str, str]:
    """The service's (and the index builder's) environment: ours with JAX on the host CPU."""
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def train_command(python: str, train_args: list[str], address: str) -> list[str]:
    return [python, "-m", "tspo_jax.train", *train_args, f"--gin.RetrievalSpec.addresses=['{address}']"]


def wait_until_listening(port: int, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the retrieval service exited with code {process.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise SystemExit(f"the retrieval service did not listen on 127.0.0.1:{port} within {timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="index directory (built from --corpus if missing)")
    parser.add_argument("--corpus", help="Search-R1-format corpus JSONL, needed only to build the index")
    parser.add_argument("--backend", default="dense", choices=["dense", "bm25"])
    parser.add_argument("--encoder", help="encoder directory for a dense index (default: the builder's)")
    parser.add_argument("--port", type=int, default=0, help="service port (default: a free one)")
    parser.add_argument("--python", default=str(REPO_ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the service")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(own)
    if not train_args:
        parser.error("give the trainer's gin flags after `--`")
    port = args.port or free_loopback_port()
    address = f"127.0.0.1:{port}"

    steps = []
    if not pathlib.Path(args.index).is_dir():
        if not args.corpus:
            parser.error(f"index {args.index} does not exist; give --corpus to build it")
        steps.append(build_index_command(args.python, args.corpus, args.index, args.backend, args.encoder))
    serve = serve_command(args.python, args.index, port)
    train = train_command(args.python, train_args, address)
    for command in [*steps, serve, train]:
        print("+ " + shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    for command in steps:
        subprocess.run(command, check=True, cwd=REPO_ROOT, env=service_environment())
    service = subprocess.Popen(serve, cwd=REPO_ROOT, env=service_environment())
    try:
        wait_until_listening(port, service, args.startup_timeout)
        return subprocess.run(train, cwd=REPO_ROOT).returncode
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()


if __name__ == "__main__":
    sys.exit(main())
