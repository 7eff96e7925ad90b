"""The trainer as TWO processes (`jax.distributed` over loopback, 4 CPU devices each, gloo collectives) forming
one 8-device 2x4 mesh, against the same run as ONE process with 8 devices:

- the same prompts (each process drew its own half of every step's batch, none twice, none lost), the same
  trajectories and the same loss curve (tolerance below);
- the metrics are logged once, for the whole step (summed / averaged over the processes), and the greedy eval
  (each process scores its own shard of the eval file) gives the 1-process EM per data source;
- both processes write their shards of each checkpoint into the shared run directory and both restore it: a
  2-process run resumed from its checkpoint ends bit-identical to the uninterrupted 2-process run.
"""

import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tspo_jax import metrics as names
from tspo_jax.checkpoint import RunCheckpoints
from tests.fixtures.demo_world import tiny_run_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 2
# mini_batches=1: each process draws its mini-batches from its own rows, so with several mini-batches per step a
# 2-process run's mini-batches are not the 1-process run's (equally random, but not the same rows). One mini-batch
# of all rows (twice: epochs=2) makes the runs comparable update for update.
# Adam's eps: the tiny model's per-parameter gradients here are ~1e-6 (grad norm ~3e-4), so at eps=1e-8 Adam takes a
# full +-lr step on any parameter whose gradient is near zero, and the rounding of two topologies' summation orders
# (legitimately different) flips such steps. eps=1e-4 keeps each update proportional to its gradient, so rounding
# stays rounding and the runs can be compared update for update.
COMMON = [f"--gin.train.num_steps={STEPS}", "--gin.CheckpointSpec.save_every=1", "--gin.UpdateSpec.mini_batches=1",
          "--gin.UpdateSpec.epochs=2", "--gin.MeshSpec.num_devices=None", "--gin.MeshSpec.data=2",
          "--gin.MeshSpec.fsdp=4", "--gin.OptimizerSpec.eps=1e-4"]


def _env(devices, cache_dir):
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            "JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_two_processes(flags, cache_dir, logs):
    port = _free_port()
    processes = []
    for process_id in range(2):
        command = [sys.executable, "-m", "tspo_jax.train", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2", f"--process_id={process_id}", *flags]
        log = open(logs / f"process_{process_id}.log", "w")
        processes.append((subprocess.Popen(command, cwd=ROOT, env=_env(4, cache_dir), stdout=log,
                                           stderr=subprocess.STDOUT), log))
    outputs = []
    for process, log in processes:
        try:
            code = process.wait(timeout=600)
        finally:
            for other, _ in processes:
                if other.poll() is None and process.returncode != 0:
                    other.kill()  # a failed peer would leave the other waiting at a collective
            log.close()
        outputs.append(pathlib.Path(log.name).read_text())
        assert code == 0, outputs[-1][-4000:]
    return outputs


def _state(run_dir, step, like=None):
    """The checkpoint's arrays as NumPy; `like` (a state of the same tree) gives the target of a checkpoint saved
    on another topology (two processes), restored here on one device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = None if like is None else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
    checkpoints = RunCheckpoints(run_dir / "checkpoints", save_every=1)
    state, meta = checkpoints.restore(step, target)
    checkpoints.close()
    return jax.tree.map(np.asarray, state), meta


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_world, demo_retrieval, tiny_policy_dir):
    root = tmp_path_factory.mktemp("multihost")
    one, two = root / "one_process", root / "two_processes"
    evaluation = [f"--gin.DataSpec.eval_files=['{demo_world['test']}']", f"--gin.train.eval_every={STEPS}",
                  "--gin.DataSpec.eval_limit_per_source=8"]
    flags = lambda run_dir: tiny_run_flags(run_dir, demo_world, demo_retrieval, tiny_policy_dir,  # noqa: E731
                                           *COMMON, *evaluation)
    single = subprocess.run([sys.executable, "-m", "tspo_jax.train", *flags(one)], cwd=ROOT,
                            env=_env(8, root / "cache_8"), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    outputs = _run_two_processes(flags(two), root / "cache_4", root)
    return {"one": one, "two": two, "outputs": outputs, "flags": flags, "root": root}


def test_two_processes_follow_the_one_process_loss_curve_on_the_same_prompts(runs):
    one = names.read_jsonl(runs["one"] / "metrics.jsonl")
    two = names.read_jsonl(runs["two"] / "metrics.jsonl")
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # one row per step: only process 0 writes
    for a, b in zip(one, two, strict=True):
        # The same 16 trajectories (4 prompts x 4 samples, 8 per process): counts add up exactly ...
        for name in ("rollout/trajectories", "rollout/tokens_generated", "rollout/retrieval_calls"):
            assert a[name] == b[name], name
        # ... per-trajectory means are the mean of two equal halves' means (rounding only) ...
        for name in (names.REWARD, names.TURNS, names.RESPONSE_LENGTH, names.GROUPS_NONZERO_ADVANTAGE):
            np.testing.assert_allclose(b[name], a[name], rtol=1e-12, err_msg=name)
        assert a[names.RESPONSE_LENGTH_MAX] == b[names.RESPONSE_LENGTH_MAX]
        # ... and the loss differs by the summation order of 8 devices and 1 vs 2 micro-batches: 1e-4 relative
        # on fp32 values of order 1, as the 2x4-mesh test of tests/test_train.py.
        for name in ("loss/total", names.KL, names.ENTROPY, names.GRAD_NORM):
            np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)
    evals = [{k: v for k, v in row.items() if k.startswith("eval/")} for row in (one[-1], two[-1])]
    assert len(evals[0]) >= 2 and evals[0] == evals[1]  # overall and per data_source


def test_both_processes_write_one_checkpoint_that_holds_the_one_process_params(runs):
    one, meta_one = _state(runs["one"], STEPS)
    two, meta_two = _state(runs["two"], STEPS, like=one)  # every shard present: both processes wrote theirs
    assert meta_one == meta_two  # the same data iterator position: the processes walk one global stream
    before, _ = _state(runs["one"], STEPS - 1, like=one)
    for a, b, a_before in zip(*(jax.tree.leaves(s["params"]) for s in (one, two, before)), strict=True):
        # Rounding differences only, measured against the last step's update of the same tensor: a lost, doubled
        # or reordered update would differ by about that whole update (a ratio near 1); rounding measured <= 3e-5.
        update = np.linalg.norm(a - a_before)
        assert update > 0
        assert np.linalg.norm(b - a) <= 1e-3 * update, (np.linalg.norm(b - a), update)
    np.testing.assert_array_equal(one["rng"], two["rng"])


def test_a_two_process_run_resumes_from_its_checkpoint_bit_identical(runs):
    resumed = runs["root"] / "resumed"
    shutil.copytree(runs["two"], resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))  # as if stopped after step STEPS - 1
    outputs = _run_two_processes(runs["flags"](resumed), runs["root"] / "cache_4", runs["root"])
    assert all(f"resumed from {resumed / 'checkpoints' / str(STEPS - 1)}" in out for out in outputs)
    like, _ = _state(runs["one"], STEPS)
    expected, expected_meta = _state(runs["two"], STEPS, like=like)
    state, meta = _state(resumed, STEPS, like=like)
    assert meta == expected_meta
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(b, a)
    rows = [names.reproducible(r) for r in names.read_jsonl(resumed / "metrics.jsonl")]
    assert rows == [names.reproducible(r) for r in names.read_jsonl(runs["two"] / "metrics.jsonl")]
