"""What a compiled program does per chip, read from its optimized HLO text, counting loops.

XLA's `cost_analysis()` counts a `while` body once, however many times it runs, and every scan (micro-batches,
log-prob chunks, scanned layers, the fused decode loop) is a `while`. Here each computation gets a multiplier:
1 for the entry, times the trip count for a loop's body and condition, inherited through fusions and calls. A
trip count is read from the loop's condition (`counter < constant`, how lax.scan / fori_loop / while_loop with
a step bound lower); a condition without one counts once.

    stats = program_stats(compiled.as_text())
    stats.matmul_flops, stats.matmul_flops_once, stats.collectives  # per chip
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
                "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_CALLEES = re.compile(r"\b(condition|body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(type_text)]


def _nbytes(type_text: str) -> float:
    return sum(_DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in _arrays(type_text))


@dataclasses.dataclass
class _Instruction:
    name: str
    type_text: str
    opcode: str
    rest: str  # operands and attributes


@dataclasses.dataclass
class _Computation:
    name: str
    instructions: list[_Instruction]
    is_entry: bool


def _parse(hlo_text: str) -> dict[str, _Computation]:
    computations, current = {}, None
    for line in hlo_text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header and not line.startswith(" "):
                current = _Computation(header.group(1), [], line.startswith("ENTRY"))
            continue
        if line.strip() == "}":
            computations[current.name] = current
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            current.instructions.append(_Instruction(*match.groups()))
    return computations


def _trip_count(condition: _Computation | None) -> int:
    """The bound N of `counter < N` in a loop condition (1 when there is none to read)."""
    if condition is None:
        return 1
    constants = {}
    for inst in condition.instructions:
        if inst.opcode == "constant":
            value = re.match(r"(\d+)\)", inst.rest)
            if value and re.match(r"s(32|64)\[\]", inst.type_text):
                constants[inst.name] = int(value.group(1))
    for inst in condition.instructions:
        if inst.opcode == "compare" and "direction=LT" in inst.rest:
            operands = re.findall(r"%([\w.\-]+)", inst.rest.split(")")[0])
            if len(operands) == 2 and operands[1] in constants:
                return constants[operands[1]]
    return 1


def _multipliers(computations: dict[str, _Computation]) -> dict[str, float]:
    """How many times each computation runs per call of the entry."""
    times: dict[str, float] = collections.defaultdict(float)

    def visit(name: str, factor: float, depth: int = 0) -> None:
        computation = computations.get(name)
        if computation is None or depth > 64:
            return
        times[name] += factor
        for inst in computation.instructions:
            callees = _CALLEES.findall(inst.rest)
            branches = _BRANCHES.search(inst.rest)
            if branches:
                callees += [("branch", b.strip().lstrip("%")) for b in branches.group(1).split(",") if b.strip()]
            trips = 1
            if inst.opcode == "while":
                condition = dict(callees).get("condition")
                trips = _trip_count(computations.get(condition))
            for role, callee in callees:
                if role == "to_apply" and inst.opcode != "call":
                    continue  # reducers' scalar bodies: no matmuls, no collectives
                visit(callee, factor * (trips if role in ("body", "condition") else 1), depth + 1)

    for name, computation in computations.items():
        if computation.is_entry:
            visit(name, 1.0)
    return times


def _matmul_flops(inst: _Instruction, shapes: dict[str, str]) -> float:
    """2 * output elements * contraction size of a dot or convolution (0 for anything else)."""
    outputs = _arrays(inst.type_text)
    if not outputs or inst.opcode not in ("dot", "convolution"):
        return 0.0
    out_elements = math.prod(outputs[0][1])
    operands = re.findall(r"%([\w.\-]+)", inst.rest.split("),")[0])
    if inst.opcode == "dot":
        lhs = _arrays(shapes.get(operands[0], "")) if operands else []
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.rest)
        if not lhs or not dims:
            return 0.0
        contraction = math.prod(lhs[0][1][int(d)] for d in dims.group(1).split(",") if d)
        return 2.0 * out_elements * contraction
    lhs = _arrays(shapes.get(operands[0], "")) if operands else []
    rhs = _arrays(shapes.get(operands[1], "")) if len(operands) > 1 else []
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.rest)
    if not lhs or not rhs or not labels:
        return 0.0
    lhs_labels, kernel_labels, out_labels = labels.groups()
    # Every output element sums over the kernel's input features and, per window (spatial) dim, over the taps
    # that land on real input. XLA:TPU writes batched matmuls as convolutions whose batch dims are windows over
    # dilated or padded inputs (one real tap per output), so taps are counted, not window sizes.
    contraction = math.prod(size for size, label in zip(rhs[0][1], kernel_labels) if label == "i")
    window = _window(inst.rest)
    out_shape = outputs[0][1]
    spatial_out = 1
    for d, label in enumerate(out_labels):
        if label.isdigit():
            k = int(label)
            s_in = lhs[0][1][lhs_labels.index(label)]
            s_out = out_shape[d]
            spatial_out *= s_out
            if k < len(window[0]):
                contraction *= _valid_taps(s_in, s_out, *(w[k] for w in window))
            else:  # no window attribute: a plain valid convolution over the kernel's extent
                contraction *= s_out * rhs[0][1][kernel_labels.index(label)]
    return 2.0 * out_elements / max(spatial_out, 1) * contraction


def _window(text: str) -> tuple[list[int], ...]:
    """(size, stride, pad_low, lhs_dilate, rhs_dilate) lists, one entry per window dim."""
    match = re.search(r"window=\{([^}]*)\}", text)
    fields = dict(item.split("=", 1) for item in match.group(1).split()) if match else {}
    sizes = [int(x) for x in fields.get("size", "").split("x") if x]
    n = len(sizes)

    def ints(name, default):
        return [int(x) for x in fields[name].split("x")] if name in fields else [default] * n

    pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * n
    return sizes, ints("stride", 1), pads, ints("lhs_dilate", 1), ints("rhs_dilate", 1)


def _valid_taps(s_in: int, s_out: int, size: int, stride: int, pad_low: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
    """How many (output position, window tap) pairs of one window dim read a real input element."""
    key = (s_in, s_out, size, stride, pad_low, lhs_dilate, rhs_dilate)
    if key not in _TAPS:
        outputs = np.arange(s_out)[:, None] * stride - pad_low
        positions = outputs + np.arange(size)[None, :] * rhs_dilate  # in the lhs-dilated input
        real = (positions >= 0) & (positions <= (s_in - 1) * lhs_dilate) & (positions % lhs_dilate == 0)
        _TAPS[key] = int(real.sum())
    return _TAPS[key]


_TAPS: dict[tuple, int] = {}


@dataclasses.dataclass(frozen=True)
class ProgramStats:
    """Per chip, for one call: matmul_flops counts every loop iteration, matmul_flops_once each loop body once
    (as cost_analysis does); collectives: op -> (count, bytes), each op's bytes the larger of its operand and
    result (a reduce-scatter moves its full-size operand, an all-gather its full-size result). XLA cannot see
    inside a Pallas kernel, so its FLOPs are in neither count; kernel_calls says how many ran."""

    matmul_flops: float
    matmul_flops_once: float
    collectives: dict[str, tuple[float, float]]
    kernel_calls: float = 0.0  # Pallas TPU kernels run (custom calls: their FLOPs are not in matmul_flops)

    @property
    def loop_factor(self) -> float:
        return self.matmul_flops / self.matmul_flops_once if self.matmul_flops_once else 1.0

    @property
    def collective_bytes(self) -> float:
        return sum(nbytes for _, nbytes in self.collectives.values())


def program_stats(hlo_text: str) -> ProgramStats:
    computations = _parse(hlo_text)
    times = _multipliers(computations)
    flops = flops_once = kernel_calls = 0.0
    collectives: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for name, computation in computations.items():
        factor = times.get(name, 0.0)
        if not factor:
            continue
        shapes = {inst.name: inst.type_text for inst in computation.instructions}
        for inst in computation.instructions:
            op_flops = _matmul_flops(inst, shapes)
            flops += factor * op_flops
            flops_once += op_flops
            if inst.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in inst.rest:
                kernel_calls += factor
            op = inst.opcode.removesuffix("-start")
            if op == "all-reduce" and name.startswith("all-reduce-scatter"):
                op = "reduce-scatter"  # XLA:TPU's reduce-scatter: a fusion around an all-reduce, moving 1/N out
            if op in _COLLECTIVES and not inst.opcode.endswith("-done"):
                operands = re.findall(r"%([\w.\-]+)", inst.rest.split("),")[0])
                operand_bytes = sum(_nbytes(shapes.get(o, "")) for o in operands)
                result_bytes = _nbytes(inst.type_text)
                if inst.opcode.endswith("-start"):  # (operands..., results...) tuples: the result is the larger
                    result_bytes = max((_DTYPE_BYTES[d] * math.prod(s) for d, s in _arrays(inst.type_text)),
                                       default=0)
                collectives[op][0] += factor
                collectives[op][1] += factor * max(operand_bytes, result_bytes)
    return ProgramStats(matmul_flops=flops, matmul_flops_once=flops_once,
                        collectives={op: (count, nbytes) for op, (count, nbytes) in sorted(collectives.items())},
                        kernel_calls=kernel_calls)
