"""What a run on several processes (a TPU pod's hosts, `jax.distributed`) needs beyond one mesh.

Every process runs the same loop on its own slice of each step's prompts. The jitted log-probs and updates span
all processes' devices (one global mesh); the rollout engine does not: each process drives its own prompts at its
own pace, so it samples on a mesh of its local devices from a per-host copy of the policy (`HostReplicas`).
Everything else that must agree across processes goes through the small collectives here, called by every
process at the same point of the loop. With one process each is a no-op.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from tspo_jax import sharding

# Step metrics that are totals over the step's trajectories (summed over processes); the rest are per-trajectory
# means over equally many trajectories per process (averaged), maxima, minima or timings (the slowest process).
_SUMMED = ("rollout/trajectories", "rollout/failed_searches", "rollout/failed_embeds", "rollout/tokens_generated",
           "rollout/retrieval_calls")
_ZERO_WHEN_ABSENT = ("rollout/stop_",)  # a stop reason no trajectory of a process had


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def process_zero_first(name: str) -> Iterator[None]:
    """Process 0 does the body first (e.g. writes the demo data into a shared directory); the others wait, then
    do it themselves (finding it done, or doing it on their own disk)."""
    if jax.process_index() != 0:
        barrier(name)
    yield
    if jax.process_index() == 0:
        barrier(name)


def gather_json(value) -> list:
    """Every process's JSON-able `value`, in process order."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:size])) for row, size in zip(rows, sizes)]


def any_process(flag: bool) -> bool:
    """True on every process if it is True on any (e.g. one host received SIGTERM)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.array([flag], np.int32))).any())


def max_over_processes(value: int) -> int:
    if jax.process_count() == 1:
        return int(value)
    return int(np.asarray(multihost_utils.process_allgather(np.array([value], np.int64))).max())


def combine_step_metrics(per_process: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One row of step metrics from every process's row (each over its own, equally many, trajectories)."""
    if len(per_process) == 1:
        return dict(per_process[0])
    names = list(dict.fromkeys(name for row in per_process for name in row))
    out = {}
    for name in names:
        default = 0.0 if name.startswith(_ZERO_WHEN_ABSENT) else None
        values = [row.get(name, default) for row in per_process]
        values = [float("nan") if v is None else float(v) for v in values]
        if name in _SUMMED or name.startswith("throughput/"):
            out[name] = float(np.sum(values))
        elif name.startswith("time/") or name.endswith("_max"):
            out[name] = float(np.max(values))
        elif name.endswith("_min"):
            out[name] = float(np.min(values))
        else:
            out[name] = float(np.mean(values))
    return out


def host_mesh(process: int, tensor: int, devices=None) -> Mesh:
    """Process `process`'s devices (of `devices`, default jax.devices()) as a ("data", "fsdp", "tensor") mesh:
    where its rollout engine runs."""
    devices = jax.devices() if devices is None else devices
    devices = sorted((d for d in devices if d.process_index == process), key=lambda d: d.id)
    return sharding.make_mesh(1, -1, tensor, devices=devices)


class HostReplicas:
    """The policy's params, gathered so that every host holds a whole copy laid out on its own devices exactly
    as its engine wants them, then viewed as arrays of the host's local mesh (no further copy).

    abstract_params: the model's abstract nnx.State; tensor / rules: the engine's tensor axis size and rules.
    dtype: the copy's dtype (the engine decodes in the compute dtype; None keeps the params' own), cast before
    the gather so that it moves half the bytes of fp32 master weights.
    Costs one cross-host all-gather of the params per call (after every update).
    """

    def __init__(self, abstract_params, *, tensor: int, rules, dtype=None):
        self.mesh = host_mesh(jax.process_index(), tensor)
        self.rules = sharding.normalize_rules(rules, self.mesh)
        self.local_shardings = sharding.state_shardings(abstract_params, self.mesh, self.rules)
        # Row p of the hosts mesh is process p's local mesh; a spec without "hosts" replicates across hosts.
        per_host = np.stack([host_mesh(p, tensor).devices for p in range(jax.process_count())])
        hosts = Mesh(per_host, ("hosts", *self.mesh.axis_names))
        self._host_shardings = jax.tree.map(lambda s: NamedSharding(hosts, s.spec), self.local_shardings)
        cast = (lambda params: params) if dtype is None else (
            lambda params: jax.tree.map(lambda x: x.astype(dtype), params))
        self._gather = jax.jit(cast, out_shardings=self._host_shardings)

    def __call__(self, params):
        gathered = self._gather(params)
        return jax.tree.map(
            lambda array, local: jax.make_array_from_single_device_arrays(
                array.shape, local, [shard.data for shard in array.addressable_shards]),
            gathered, self.local_shardings)
