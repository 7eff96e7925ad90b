#!/usr/bin/env python3
"""Train on a Cloud TPU VM or pod slice: create (or reuse) it, ship this checkout, install the pinned
requirements with the TPU runtime (requirements-tpu.txt), copy the model to every worker, start the retrieval service on worker 0, and run
training on every worker.

    python launch/tpu_vm.py --tpu my-v5e --zone us-west4-a --accelerator-type v5litepod-16 \\
        --model gs://my-bucket/Qwen2.5-3B --index gs://my-bucket/wiki18_e5_flat --encoder gs://my-bucket/e5-base-v2 \\
        -- --gin_file=configs/experiments/search_r1_qwen2_5_3b.gin --gin.RUN_DIR="'gs://my-bucket/runs/tspo_3b'" \\
           --gin.TRAIN_FILES="['/data/train.parquet']" --gin.EVAL_FILES="['/data/test.parquet']"

Everything after `--` goes to `python -m tspo_jax.train` unchanged (gin flags). The trainer runs with
`--distributed`, so every worker calls `jax.distributed.initialize()` and the workers form one mesh. RUN_DIR
(checkpoints, metrics, TensorBoard events, configs) should be gs://, storage every worker shares, as Orbax's
multi-host checkpoints need. The model and the data files are read from each worker's local disk: `--model`
copies a gs:// model directory to every worker and sets MODEL_DIR; QA files must already be on every worker
(a gs:// path there fails at start-up naming the binding).

`--dry-run` prints every command (gcloud, and what is shipped) without running anything. Stdlib only: this
runs on your workstation, where the project's venv need not exist. Steps can be chosen with `--steps`, e.g.
`--steps train` to restart training on a VM that is already set up (it resumes from the latest checkpoint).
"""

from __future__ import annotations

import argparse
import io
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = ("create", "ship", "install", "model", "retrieval", "train")
REMOTE_DIR = "tspo_jax"  # in the login user's home on every worker
REMOTE_MODEL_DIR = "tspo_model"  # --model is copied here (in the home directory) on every worker
ARCHIVE = "tspo_jax_code.tar.gz"
# Never shipped: local environments, outputs and caches (checkpoints live in RUN_DIR, usually on GCS).
EXCLUDED = {".venv", ".git", "runs", "build", "__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache"}
RETRIEVAL_PORT = 50051


def code_archive(root: pathlib.Path = REPO_ROOT) -> tuple[bytes, list[str]]:
    """A .tar.gz of the checkout as it is on disk (uncommitted gin edits included), minus EXCLUDED."""
    names = []
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            if any(part in EXCLUDED for part in relative.parts) or path.suffix == ".pyc" or not path.is_file():
                continue
            tar.add(path, arcname=str(relative))
            names.append(str(relative))
    return buffer.getvalue(), names


class Runner:
    """Runs (or, in dry-run, prints) commands; stops at the first failure naming the command."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def run(self, command: list[str], *, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
        print("+ " + shlex.join(command), flush=True)
        if self.dry_run:
            return subprocess.CompletedProcess(command, 0, stdout="", stderr="")
        result = subprocess.run(command, text=True, capture_output=capture)
        if check and result.returncode != 0:
            detail = f": {result.stderr.strip()}" if capture and result.stderr else ""
            raise SystemExit(f"command failed with exit code {result.returncode}: {shlex.join(command)}{detail}")
        return result


class TpuVm:
    """gcloud commands for one TPU VM (or pod slice)."""

    def __init__(self, args: argparse.Namespace, runner: Runner):
        self.args, self.runner = args, runner
        self.base = [args.gcloud, "compute", "tpus", "tpu-vm"]
        self.where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])

    def exists(self) -> bool:
        result = self.runner.run([*self.base, "describe", self.args.tpu, *self.where, "--format=value(state)"],
                                 check=False, capture=True)
        return result.returncode == 0 and not self.runner.dry_run

    def create(self) -> None:
        if self.exists():
            print(f"TPU VM {self.args.tpu} exists in {self.args.zone}: reusing it", flush=True)
            return
        if self.runner.dry_run:
            print("# (dry run: if the describe above fails, the VM is created)", flush=True)
        self.runner.run([
            *self.base, "create", self.args.tpu, *self.where,
            f"--accelerator-type={self.args.accelerator_type}", f"--version={self.args.runtime_version}",
            *(["--spot"] if self.args.spot else []),
        ])

    def ssh(self, command: str, *, worker: str = "all") -> None:
        self.runner.run([*self.base, "ssh", self.args.tpu, *self.where, f"--worker={worker}",
                         f"--command={command}"])

    def scp_to_all(self, local: pathlib.Path, remote: str) -> None:
        self.runner.run([*self.base, "scp", str(local), f"{self.args.tpu}:{remote}", *self.where, "--worker=all"])

    def internal_ip(self, worker: int = 0) -> str:
        if self.runner.dry_run:
            self.runner.run([*self.base, "describe", self.args.tpu, *self.where,
                             f"--format=value(networkEndpoints[{worker}].ipAddress)"])
            return f"<worker-{worker}-ip>"
        result = self.runner.run([*self.base, "describe", self.args.tpu, *self.where,
                                  f"--format=value(networkEndpoints[{worker}].ipAddress)"], capture=True)
        return result.stdout.strip()


def install_command() -> str:
    """Creates the venv on a worker: the pinned runtime requirements with the TPU runtime for the same jax
    (requirements-tpu.txt: jax[tpu] and libtpu, from PyPI)."""
    return " && ".join([
        f"cd ~/{REMOTE_DIR}",
        "python3 -m venv .venv",
        ".venv/bin/pip install --quiet --upgrade pip",
        ".venv/bin/pip install --quiet -r requirements.txt -r requirements-tpu.txt",
        ".venv/bin/pip install --quiet --no-deps -r requirements-nodeps.txt",
        ".venv/bin/pip install --quiet --no-deps --no-build-isolation -e .",
    ])


def model_command(model: str) -> str:
    """Copies a gs:// model directory (config.json, safetensors, tokenizer) to every worker's local disk."""
    source = shlex.quote(model.rstrip("/"))
    return f"mkdir -p ~/{REMOTE_MODEL_DIR} && gcloud storage cp -r {source}/* ~/{REMOTE_MODEL_DIR}/"


def model_flag(model: str) -> str:
    """The MODEL_DIR binding for the trainer: the copy (gs:// --model) or the path as given (already local on
    every worker). `$HOME` is left for the worker's shell to expand."""
    path = f"$HOME/{REMOTE_MODEL_DIR}" if model.startswith("gs://") else model
    return f"--gin.MODEL_DIR=\"'{path}'\""


def retrieval_command(index: str, encoder: str | None, port: int) -> str:
    """Starts the retrieval service on worker 0 in the background, reachable from the other workers."""
    fetch = []
    local_index = index
    if index.startswith("gs://"):
        local_index = "~/retrieval_index"
        fetch.append(f"mkdir -p {local_index} && gcloud storage cp -r {shlex.quote(index.rstrip('/'))}/* {local_index}/")
    encoder_arg = ""
    if encoder and encoder.startswith("gs://"):
        fetch.append(f"mkdir -p ~/retrieval_encoder && gcloud storage cp -r {shlex.quote(encoder.rstrip('/'))}/* ~/retrieval_encoder/")
        encoder_arg = " --encoder ~/retrieval_encoder"
    elif encoder:
        encoder_arg = f" --encoder {shlex.quote(encoder)}"
    # JAX_PLATFORMS=cpu (and no --device): the service must not open the TPU this worker trains on.
    serve = (f"JAX_PLATFORMS=cpu nohup .venv/bin/python -m retrieval_service.serve --index {local_index}"
             f"{encoder_arg} --host 0.0.0.0 --port {port} > ~/retrieval_service.log 2>&1 &")
    return " && ".join([f"cd ~/{REMOTE_DIR}", *fetch, serve])


def train_command(train_args: list[str], retrieval_addresses: list[str], detach: bool,
                  model: str | None = None) -> str:
    gin_addresses = "--gin.RetrievalSpec.addresses=" + shlex.quote(repr([str(a) for a in retrieval_addresses]))
    args = " ".join(shlex.quote(a) for a in train_args)
    if model:
        args += " " + model_flag(model)
    train = f".venv/bin/python -m tspo_jax.train --distributed {args} {gin_addresses}".replace("  ", " ")
    if detach:
        train = f"nohup {train} > ~/tspo_train.log 2>&1 &"
    return f"cd ~/{REMOTE_DIR} && {train}"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tpu", required=True, help="TPU VM name (created if it does not exist)")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", help="GCP project (default: gcloud's configured one)")
    parser.add_argument("--accelerator-type", default="v5litepod-8", help="e.g. v4-32, v5litepod-16, v5p-64")
    parser.add_argument("--runtime-version", default="v2-alpha-tpuv5-lite", help="TPU VM software version")
    parser.add_argument("--spot", action="store_true", help="create a spot (preemptible) VM; training resumes")
    parser.add_argument("--model", help="the model directory: gs://… (copied to every worker) or a path that exists "
                                        "on every worker; sets MODEL_DIR")
    parser.add_argument("--index", help="retrieval index directory on worker 0 or gs://… (starts the service)")
    parser.add_argument("--encoder", help="the index's encoder directory (local on worker 0 or gs://…)")
    parser.add_argument("--retrieval-address", action="append", default=[],
                        help="an already running retrieval service host:port (repeatable; instead of --index)")
    parser.add_argument("--retrieval-port", type=int, default=RETRIEVAL_PORT)
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--detach", action="store_true", help="run training under nohup (log: ~/tspo_train.log)")
    parser.add_argument("--gcloud", default="gcloud", help="the gcloud executable")
    parser.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    args = parser.parse_args(own)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {unknown}; choose from {list(STEPS)}")
    args.steps = steps
    if "model" in steps and not (args.model or "").startswith("gs://"):
        args.steps = steps = [s for s in steps if s != "model"]  # nothing to copy: a local path, or no --model
    if "train" in steps and not train_args:
        parser.error("give the trainer's gin flags after `--`, e.g. -- --gin_file=configs/experiments/…")
    if "retrieval" in steps and not args.index and not args.retrieval_address:
        parser.error("the retrieval step needs --index (or skip it and give --retrieval-address)")
    return args, train_args


def main(argv: list[str] | None = None) -> None:
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    runner = Runner(args.dry_run)
    vm = TpuVm(args, runner)
    if "create" in args.steps:
        vm.create()
    if "ship" in args.steps:
        data, names = code_archive()
        archive = REPO_ROOT / "build" / ARCHIVE
        print(f"# code archive {archive}: {len(names)} files, {len(data) / 1e6:.1f} MB "
              f"(excluding {', '.join(sorted(EXCLUDED))})", flush=True)
        if not args.dry_run:
            archive.parent.mkdir(exist_ok=True)
            archive.write_bytes(data)
        vm.scp_to_all(archive, f"~/{ARCHIVE}")
        vm.ssh(f"mkdir -p ~/{REMOTE_DIR} && tar xzf ~/{ARCHIVE} -C ~/{REMOTE_DIR}")
    if "install" in args.steps:
        vm.ssh(install_command())
    if "model" in args.steps:
        vm.ssh(model_command(args.model))
    addresses = list(args.retrieval_address)
    if "retrieval" in args.steps and args.index:
        vm.ssh(retrieval_command(args.index, args.encoder, args.retrieval_port), worker="0")
        addresses.append(f"{vm.internal_ip(0)}:{args.retrieval_port}")
    if "train" in args.steps:
        if not addresses:
            raise SystemExit("no retrieval service: give --index (with the retrieval step) or --retrieval-address")
        vm.ssh(train_command(train_args, addresses, args.detach, args.model))


if __name__ == "__main__":
    main()
