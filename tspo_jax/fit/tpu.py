"""TPU chips and topologies for compiling without them.

libtpu (requirements-tpu.txt) compiles for a named topology on any host: `jax.experimental.topologies` gives
compile-only devices that `jax.jit(...).lower(...).compile()` accepts, with the real device ids, coordinates
and hosts (`process_index`) of that slice. Nothing can run on them or be transferred to them.
"""

from __future__ import annotations

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    """name: the generation as topologies are written ("v5p"); hbm_gib: HBM per chip; bf16_tflops: peak dense
    bf16 matmul throughput per chip (the denominator of MFU); hbm_gbps: HBM bandwidth."""

    name: str
    hbm_gib: float
    bf16_tflops: float
    hbm_gbps: float


# Google Cloud's published per-chip figures.
CHIPS = {
    "v4": Chip("v4", hbm_gib=32, bf16_tflops=275, hbm_gbps=1200),
    "v5e": Chip("v5e", hbm_gib=16, bf16_tflops=197, hbm_gbps=819),
    "v5p": Chip("v5p", hbm_gib=95, bf16_tflops=459, hbm_gbps=2765),
    "v6e": Chip("v6e", hbm_gib=32, bf16_tflops=918, hbm_gbps=1640),
}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice's compile-only devices. devices: one per TensorCore JAX sees (v4 exposes two per chip)."""

    name: str
    chip: Chip
    devices: tuple

    @property
    def num_chips(self) -> int:
        return len({tuple(d.coords) for d in self.devices})

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.num_chips

    @property
    def num_hosts(self) -> int:
        return len({d.process_index for d in self.devices})

    def host_devices(self, process: int) -> list:
        return [d for d in self.devices if d.process_index == process]

    def one_host(self) -> "Topology":
        """A single host of this slice as its own topology (v5e:4x4 -> v5e:2x2). A host's rollout engine is a
        program of its own chips; libtpu compiles such a program only for devices numbered from 0, which the
        other hosts' chips of a slice are not."""
        if self.num_hosts == 1:
            return self
        coords = [tuple(d.coords) for d in self.host_devices(0)]
        extents = [max(c[i] for c in coords) - min(c[i] for c in coords) + 1 for i in range(len(coords[0]))]
        generation, shape = self.name.split(":")
        extents = extents[:len(shape.split("x"))]
        return topology(f"{generation}:{'x'.join(map(str, extents))}")


def prepare_compile_only_process() -> None:
    """Before JAX starts: run on the host CPU and never claim a TPU (a fit check beside a training run on a TPU
    VM must not take its chips), and let libtpu load in several processes at once (it takes a machine-wide lock
    otherwise, which a compile-only client does not need)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology(name: str) -> Topology:
    """"v5p:2x2x1", "v5e:4x4", "v6e:2x4", "v4:2x2x2" … -> its compile-only devices (needs libtpu)."""
    match = _TOPOLOGY.match(name)
    if not match:
        raise ValueError(f"--topology {name!r}: expected GENERATION:SHAPE with GENERATION one of "
                         f"{sorted(CHIPS)} and SHAPE like 2x2x1 (v4, v5p) or 4x4 (v5e, v6e)")
    try:
        import libtpu  # noqa: F401  (only to say what is missing)
    except ImportError:
        raise ValueError("compiling for a TPU topology needs libtpu: pip install -r requirements-tpu.txt "
                         "(or `make fit-check`, which installs it)") from None
    from jax.experimental import topologies

    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as error:  # libtpu's own message says what it did not accept
        raise ValueError(f"--topology {name!r}: libtpu cannot describe it ({error})") from None
    return Topology(name=name, chip=CHIPS[match.group(1)], devices=tuple(description.devices))
