"""The trainer as TWO processes (`jax.distributed` over loopback, 4 CPU devices each, gloo collectives) forming
one 8-device 2x4 mesh, at production settings (Adam eps 1e-8, 2 mini-batches x 2 epochs per step), against the
same run on ONE process with 8 devices (in this test process):

- the same prompts (each process drew its own half of every step's batch, none twice, none lost) and the same
  sampled trajectories; the metrics are logged once, for the whole step (summed / averaged over the processes),
  and the greedy eval (each process scores its own shard of the eval file) gives the 1-process EM per source;
- step 1 of the 2-process run equals, to rounding, the same mini-batches computed on one process (below);
- both processes write their shards of each checkpoint into the shared run directory and both restore it: a
  2-process run resumed from its checkpoint ends bit-identical to the uninterrupted 2-process run.

Why not "1 and 2 processes agree update for update": each process draws a step's mini-batches from its own rows
(as veRL's data-parallel ranks do; nothing moves between hosts), so with 2 mini-batches the 2-process run trains on
other halves of the same 16 trajectories than a 1-process run (measured: the step-1 params differ by 10-40% of
the step's update), and from step 2 on it samples from other params. What does hold, and is checked: replaying
step 1 on one process with the 2-process mini-batches (each process's seeded permutation of its own 8 rows, process
0's rows first) gives the 2-process checkpoint to rounding. At eps 1e-8 Adam's step is near g/|g| for these tiny
gradients, yet the measured difference is <= 1.4e-5 of each tensor's update: the bound is 1e-4 (a lost, doubled
or wrongly reduced update would differ by about the whole update).
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
from tspo_jax.train import Trainer, load_experiment
from tspo_jax.training.gin_config import split_gin_flags
from tests.fixtures.demo_world import tiny_run_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 2
MINI_BATCHES, EPOCHS = 2, 2
# Production optimizer and update settings (Adam's default eps 1e-8); a micro-batch is the whole mini-batch:
# 8 rows on one process, 4 of each process's on two.
COMMON = [f"--gin.train.num_steps={STEPS}", "--gin.CheckpointSpec.save_every=1",
          f"--gin.UpdateSpec.mini_batches={MINI_BATCHES}", f"--gin.UpdateSpec.epochs={EPOCHS}",
          "--gin.MeshSpec.num_devices=None", "--gin.MeshSpec.data=2", "--gin.MeshSpec.fsdp=4"]
ONE_PROCESS, TWO_PROCESSES = ["--gin.UpdateSpec.micro_batch_size=8"], ["--gin.UpdateSpec.micro_batch_size=4"]


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


def _state(run_dir, step, like):
    """The checkpoint's arrays as NumPy, restored on one device; `like` is a state of the same tree."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
    checkpoints = RunCheckpoints(run_dir / "checkpoints", save_every=1)
    state, meta = checkpoints.restore(step, target)
    checkpoints.close()
    return jax.tree.map(np.asarray, state), meta


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x).copy(), tree)


def _replay_as_two_processes(session, recorded, params, opt_state):
    """Step 1's updates as the 2-process run makes them, on this process: every epoch each process permutes its
    own half of the rows with the step's order seed (the same permutation on both) and gives each mini-batch its
    share; the global mini-batch is process 0's rows, then process 1's. -> (params, opt_state, update metrics)."""
    batch = recorded["batch"]
    arrays = batch.device_arrays()
    arrays.update(loss_mask=arrays["loss_mask"].astype(np.int32), old_logp=recorded["old_logp"],
                  ref_logp=recorded["ref_logp"])
    local = batch.shape[0] // 2
    order_rng = np.random.default_rng(recorded["order_seed"])
    metrics = []
    for _ in range(EPOCHS):
        order = order_rng.permutation(local)
        for m in range(MINI_BATCHES):
            mine = np.sort(order[m * local // MINI_BATCHES:(m + 1) * local // MINI_BATCHES])
            rows = np.concatenate([mine, local + mine])
            params, opt_state, result = session.update.update(params, opt_state,
                                                              {k: v[rows] for k, v in arrays.items()})
            metrics.append(result.metrics)
    return params, opt_state, metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_world, demo_retrieval, tiny_policy_dir):
    root = tmp_path_factory.mktemp("multihost")
    evaluation = [f"--gin.DataSpec.eval_files=['{demo_world['test']}']", f"--gin.train.eval_every={STEPS}",
                  "--gin.train.eval_at_start=True", "--gin.DataSpec.eval_limit_per_source=8"]
    flags = lambda run_dir: tiny_run_flags(run_dir, demo_world, demo_retrieval, tiny_policy_dir,  # noqa: E731
                                           *COMMON, *evaluation, *TWO_PROCESSES)
    outputs = _run_two_processes(flags(root / "two_processes"), root / "cache_4", root)

    # The same run on one process (this one, 8 devices), watched through its own calls during step 1.
    gin, rest = split_gin_flags(tiny_run_flags(root / "one_process", demo_world, demo_retrieval, tiny_policy_dir,
                                               *COMMON, *evaluation, *ONE_PROCESS))
    assert rest == []
    trainer = Trainer(load_experiment(gin))
    session, recorded = trainer.session, {}
    train_on = session.train_on

    def recorded_train_on(batch, old_logp, ref_logp, order_seed):
        recorded.update(batch=batch, old_logp=old_logp, ref_logp=ref_logp, order_seed=order_seed)
        return train_on(batch, old_logp, ref_logp, order_seed)

    session.train_on = recorded_train_on
    try:
        initial = {"params": _host(session.params), "opt_state": _host(session.opt_state), "rng": session.rng.copy()}
        evaluation_at_start = session.evaluate()[0]
        step_1 = trainer.step(1)
        own_partition = _host(session.params)
        after_step_1 = {"rng": session.rng.copy(), "data_iterator": session.data.get_state()}
        start = jax.tree.map(lambda x, s: jax.device_put(x, s.sharding), initial["params"], session.params)
        opt_start = jax.tree.map(lambda x, s: jax.device_put(x, s.sharding), initial["opt_state"],
                                 session.opt_state)
        params, opt_state, replay_metrics = _replay_as_two_processes(session, recorded, start, opt_start)
        replay = {"params": _host(params), "opt_state": _host(opt_state)}
    finally:
        session.close()
    return {"two": root / "two_processes", "outputs": outputs, "flags": flags, "root": root, "initial": initial,
            "eval_at_start": evaluation_at_start, "step_1": step_1, "own_partition": own_partition,
            "after_step_1": after_step_1, "replay": replay, "replay_metrics": replay_metrics}


def test_the_processes_draw_and_sample_the_one_process_batch_and_log_one_row_per_step(runs):
    rows = names.read_jsonl(runs["two"] / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(0, STEPS + 1))  # one row per step (0: eval): process 0 writes
    for row in rows[1:]:
        assert row["rollout/trajectories"] == 16  # 4 prompts x 4 samples, 8 per process
    one, two = runs["step_1"], rows[1]
    # Step 1 samples from the initial params on both: the same 16 trajectories. Counts add up exactly ...
    for name in ("rollout/trajectories", "rollout/tokens_generated", "rollout/retrieval_calls"):
        assert one[name] == two[name], name
    # ... per-trajectory means are the mean of two equal halves' means (rounding only).
    for name in (names.REWARD, names.TURNS, names.RESPONSE_LENGTH, names.GROUPS_NONZERO_ADVANTAGE):
        np.testing.assert_allclose(two[name], one[name], rtol=1e-12, err_msg=name)
    assert one[names.RESPONSE_LENGTH_MAX] == two[names.RESPONSE_LENGTH_MAX]
    # The greedy eval of the initial params, each process scoring its own shard: the 1-process EM per source.
    at_start = {k: v for k, v in rows[0].items() if k.startswith("eval/") and k.endswith("/em")}
    assert len(at_start) >= 2 and at_start == {k: v for k, v in runs["eval_at_start"].items() if k in at_start}
    assert {k for k in rows[-1] if k.startswith("eval/")} >= set(at_start)  # and again after the last step


def test_step_one_equals_its_mini_batches_computed_on_one_process_at_eps_1e_8(runs):
    two, meta = _state(runs["two"], 1, like=runs["initial"])
    replay, initial = runs["replay"], runs["initial"]
    for path, got, want, start in zip(jax.tree_util.tree_leaves_with_path(two["params"]),
                                      jax.tree.leaves(two["params"]), jax.tree.leaves(replay["params"]),
                                      jax.tree.leaves(initial["params"]), strict=True):
        update = np.linalg.norm(want - start)
        assert update > 0
        assert np.linalg.norm(got - want) <= 1e-4 * update, (jax.tree_util.keystr(path), got - want, update)
    for path, got, want in zip(jax.tree_util.tree_leaves_with_path(two["opt_state"]),
                               jax.tree.leaves(two["opt_state"]), jax.tree.leaves(replay["opt_state"]), strict=True):
        if np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got, want)  # update counts
        else:  # Adam's moments
            assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want), jax.tree_util.keystr(path)
    # The 1-process run's own mini-batches are other halves of the batch: not comparable update for update.
    flat = lambda tree: np.concatenate([x.ravel() for x in jax.tree.leaves(tree)])  # noqa: E731
    step_update = np.linalg.norm(flat(replay["params"]) - flat(initial["params"]))
    assert np.linalg.norm(flat(runs["own_partition"]) - flat(replay["params"])) > 1e-2 * step_update
    # Both walked one global data stream and one RNG.
    assert meta["data_iterator"] == runs["after_step_1"]["data_iterator"]
    np.testing.assert_array_equal(two["rng"], runs["after_step_1"]["rng"])
    row = names.read_jsonl(runs["two"] / "metrics.jsonl")[1]
    for key, name in (("loss", "loss/total"), ("kl", names.KL), ("entropy", names.ENTROPY),
                      ("grad_norm", names.GRAD_NORM)):
        np.testing.assert_allclose(row[name], np.mean([m[key] for m in runs["replay_metrics"]]), rtol=1e-4,
                                   atol=1e-7, err_msg=name)


def test_a_two_process_run_resumes_from_its_checkpoint_bit_identical(runs):
    resumed = runs["root"] / "resumed"
    shutil.copytree(runs["two"], resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))  # as if stopped after step STEPS - 1
    outputs = _run_two_processes(runs["flags"](resumed), runs["root"] / "cache_4", runs["root"])
    assert all(f"resumed from {resumed / 'checkpoints' / str(STEPS - 1)}" in out for out in outputs)
    expected, expected_meta = _state(runs["two"], STEPS, like=runs["initial"])
    state, meta = _state(resumed, STEPS, like=runs["initial"])
    assert meta == expected_meta
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(b, a)
    rows = [names.reproducible(r) for r in names.read_jsonl(resumed / "metrics.jsonl")]
    assert rows == [names.reproducible(r) for r in names.read_jsonl(runs["two"] / "metrics.jsonl")]
