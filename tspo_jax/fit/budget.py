"""Bytes per chip: what a run holds between its jitted calls, what each call adds, and the step's peak.

A training step runs its phases one after another, and each phase's compiled function sees some of the run's
long-lived buffers as its arguments (the update: params, optimizer state, the mini-batch) while the rest stay
alive around it (the reference, the engine's bf16 copy). So the step's peak on a chip is the largest, over the
functions, of

    held around the call  +  the call's own peak (arguments + outputs - donated aliases + temporaries + code)

with every long-lived buffer counted once. All sizes are of the largest shard of each array on one device.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

GIB = 2.0**30


def bytes_per_device(tree) -> int:
    """Largest per-device footprint of a tree of ShapeDtypeStructs (or arrays) carrying shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


@dataclasses.dataclass(frozen=True)
class FunctionMemory:
    """A compiled function's buffers on one device (XLA's memory analysis) and how long it took to compile."""

    name: str
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    compile_s: float
    held_around: int  # long-lived bytes alive during the call that are not among its arguments
    out_of_hbm: bool = False  # XLA refused to compile it: `temp` is the total XLA said it needs

    @classmethod
    def of(cls, name: str, compiled, compile_s: float, held_around: int) -> "FunctionMemory":
        stats = compiled.memory_analysis()
        return cls(name=name, argument=stats.argument_size_in_bytes, output=stats.output_size_in_bytes,
                   alias=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes,
                   code=stats.generated_code_size_in_bytes, compile_s=compile_s, held_around=held_around)

    @property
    def peak(self) -> int:
        """The call's own high-water mark: donated outputs reuse their arguments' buffers."""
        return self.argument + self.output - self.alias + self.temp + self.code

    @property
    def step_peak(self) -> int:
        return self.held_around + self.peak


@dataclasses.dataclass(frozen=True)
class Knob:
    """A change that lowers the peak: the binding, its new value, and the estimated peak after it (bytes)."""

    binding: str
    value: object
    peak_after: int
    why: str
