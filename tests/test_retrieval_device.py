"""The retrieval service keeps off the accelerators: whoever starts it (the trainer, launch/local.py,
launch/tpu_vm.py, or `python -m retrieval_service.serve` by hand) gets a service whose JAX runs on the host CPU
unless it is told `--device`. Here the parent's environment asks JAX for a TPU this machine does not have, so a
service that listened to it would fail to start instead of serving."""

import contextlib
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from retrieval_service.client import RetrievalClient
from retrieval_service.process import RetrievalServer
from tspo_jax.training.experiment import RetrievalSpec
from tspo_jax.training.retrieval import connect_retrieval

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))
import local  # noqa: E402
import tpu_vm  # noqa: E402


@pytest.fixture
def parent_wants_tpu(monkeypatch):
    """This test process's children inherit JAX_PLATFORMS=tpu (our own JAX is already on the CPU)."""
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")


def _child_environment(pid: int) -> dict[str, str]:
    pairs = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(pair.decode().split("=", 1) for pair in pairs if b"=" in pair)


def test_the_service_the_trainer_starts_encodes_on_the_host_cpu(parent_wants_tpu, dense_flat_index, tmp_path):
    with contextlib.ExitStack() as stack:
        client = connect_retrieval(RetrievalSpec(index_dir=str(dense_flat_index)), stack, local_dir=tmp_path)
        hits = client.retrieve(["capital city"], top_k=2)  # a dense index: the query went through the encoder
        assert len(hits[0]) == 2
        log = (tmp_path / "retrieval_service.log").read_text()
    assert "ready" in log


def test_the_service_process_is_started_with_jax_on_the_cpu_and_device_opts_out(parent_wants_tpu, dense_flat_index):
    jax_encoder = ["--encoder-runtime", "jax"]  # the service's JAX encoder, so JAX is surely used
    with RetrievalServer(dense_flat_index, extra_args=jax_encoder) as server:
        assert _child_environment(server.pid)["JAX_PLATFORMS"] == "cpu"
        assert "--device" not in server.command()
        with RetrievalClient(server.address) as client:
            assert len(client.retrieve(["river"], top_k=1)[0]) == 1
    # Told to use the accelerators, it honours the environment, which names a TPU that is not here.
    on_device = RetrievalServer(dense_flat_index, device=True, extra_args=jax_encoder, start_timeout_s=120)
    assert "--device" in on_device.command() and on_device.environment()["JAX_PLATFORMS"] == "tpu"
    with pytest.raises(RuntimeError, match="exited with code"):
        on_device.start()


def test_serve_by_hand_pins_the_cpu_itself(parent_wants_tpu, dense_flat_index, tmp_path):
    """What launch/tpu_vm.py and launch/local.py run: `python -m retrieval_service.serve` without --device."""
    ready, log_path = tmp_path / "ready.json", tmp_path / "serve.log"
    # The server's log goes to a file, as RetrievalServer sends it (a pipe nobody reads can fill and block it), and
    # says at the end whether SIGTERM stopped it gracefully.
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "retrieval_service.serve", "--index", str(dense_flat_index), "--port", "0",
             "--encoder-runtime", "jax", "--ready-file", str(ready)], cwd=ROOT, env=os.environ.copy(),
            stdout=subprocess.DEVNULL, stderr=log)
    try:
        import json
        import time

        deadline = time.monotonic() + 300
        while not ready.exists():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with RetrievalClient(f"127.0.0.1:{json.loads(ready.read_text())['grpc_port']}") as client:
            assert len(client.retrieve(["river"], top_k=1)[0]) == 1
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "[serve] stopped" in log_path.read_text()


def test_the_launchers_start_the_service_on_the_cpu(parent_wants_tpu):
    serve = local.serve_command(sys.executable, "idx", 1234)
    assert "--device" not in serve and local.service_environment()["JAX_PLATFORMS"] == "cpu"
    remote = tpu_vm.retrieval_command("gs://bucket/index", None, 50051)
    started = next(part for part in remote.split(" && ") if "retrieval_service.serve" in part)
    words = shlex.split(started)
    assert words[0] == "JAX_PLATFORMS=cpu" and "--device" not in words


def test_the_index_builder_runs_on_the_cpu_unless_told_device(parent_wants_tpu, retrieval_corpus, tmp_path):
    def build(*extra):
        return subprocess.run([sys.executable, "-m", "retrieval_service.build_index", "--corpus",
                               str(retrieval_corpus), "--backend", "bm25", "--out", str(tmp_path / "bm25"),
                               "--overwrite", *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert build().returncode == 0  # bm25s loads JAX at import: pinned to the CPU first
    on_device = build("--device")
    assert on_device.returncode != 0 and "tpu" in on_device.stderr.lower()
