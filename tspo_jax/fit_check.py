"""Will an experiment fit on a TPU slice, and how fast will its update be? Answered on a CPU host, in minutes.

    python -m tspo_jax.fit_check --gin_file=configs/experiments/search_r1_qwen2_5_7b.gin --topology v5p:2x2x2 \
        [--model_config 7b | /ckpt/Qwen2.5-7B] [--seq_len N] [--gin.UpdateSpec.micro_batch_size=8 …]

It builds the experiment's own jitted functions the way the trainer does (training.policy, training.update,
training.rollouts), from shapes only, and compiles them with libtpu for the topology's compile-only devices:
the update (one mini-batch: every micro-batch's forward + backward, the optimizer apply), the log-prob pass
(old policy and reference), the engine's append (prefill) and fused generate with the configured slots and
cache length, and the advantage step. No weights, data, tokenizer or retrieval service are read: the shapes
come from `--model_config` (a preset name or a Hugging Face config.json / directory), else the checkpoint's
config.json if it is on this machine, else `ModelSpec.expect_preset`.

It prints what the run holds on each chip between calls, one row per compiled function, the step's peak against
the chip's HBM, the update's FLOPs, predicted time and MFU (XLA's cost model; its loops counted, see fit/hlo.py)
and its collective traffic. The last line is `fits=1|0 peak_gib_per_chip=X hbm_gib_per_chip=Y`; exit code 1
when it does not fit, after lines naming the bindings that would help and the peak each would give. Exit code 2:
a bad configuration (named, as the trainer names it).

Sequences are the longest the trainer can pack (AgentConfig.max_context_tokens, bucketed as the trainer does)
unless `--seq_len` says otherwise. On a multi-host topology every host is a process of the run: it holds
prompts_per_step / hosts prompts, and its engine decodes on its own chips from a per-host copy of the policy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
import time
from collections.abc import Sequence

from tspo_jax.fit import tpu

tpu.prepare_compile_only_process()  # before anything imports JAX

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tspo_jax.fit.budget import GIB, FunctionMemory, Knob, bytes_per_device  # noqa: E402
from tspo_jax.fit.hlo import program_stats  # noqa: E402
from tspo_jax.models.qwen2 import PRESETS, Qwen2Config  # noqa: E402
from tspo_jax import sharding  # noqa: E402
from tspo_jax.training import gin_config, multihost  # noqa: E402
from tspo_jax.training.advantages import turn_advantages  # noqa: E402
from tspo_jax.training.batch import bucketed_length  # noqa: E402
from tspo_jax.training.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from tspo_jax.training.policy import make_mesh, policy_from_config  # noqa: E402
from tspo_jax.training.rollouts import build_engine, engine_slots  # noqa: E402
from tspo_jax.training.update import PolicyUpdate  # noqa: E402
from tspo_jax.algorithms import advantages as estimators  # noqa: E402

# Stand-ins for the paths an experiment file requires and the fit check never reads; flags override them.
PLACEHOLDERS = (
    "RUN_DIR = '/tmp/tspo_fit_check'",
    "MODEL_DIR = 'fit-check: shapes from --model_config or the preset'",
    "TRAIN_FILES = ['fit-check: not read']",
    "EVAL_FILES = []",
    "RetrievalSpec.index_dir = None",
    "RetrievalSpec.addresses = ['fit-check: not contacted']",
)


class FitCheckError(ValueError):
    """The configuration cannot be checked as given; the message names the culprit."""


# ----- the experiment's shapes ------------------------------------------------------------------------------
def model_config(spec, model_config_arg: str | None) -> tuple[Qwen2Config, str]:
    """The policy's Qwen2Config and where it came from."""
    if model_config_arg:
        if model_config_arg in PRESETS:
            return PRESETS[model_config_arg], f"preset {model_config_arg!r}"
        return Qwen2Config.from_hf(model_config_arg), model_config_arg
    if spec.checkpoint and pathlib.Path(spec.checkpoint, "config.json").is_file():
        return Qwen2Config.from_hf(spec.checkpoint), f"{spec.checkpoint}/config.json"
    if spec.expect_preset:
        return PRESETS[spec.expect_preset], f"preset {spec.expect_preset!r} (ModelSpec.expect_preset)"
    if spec.checkpoint is None:
        return PRESETS[spec.tiny_preset], f"preset {spec.tiny_preset!r} (ModelSpec.tiny_preset)"
    raise FitCheckError(f"ModelSpec.checkpoint = {spec.checkpoint!r} has no config.json on this machine and "
                        "ModelSpec.expect_preset is not set: give --model_config (a preset or a config.json)")


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """What one RL step of the experiment computes, per the trainer's rules (training/session.py)."""

    hosts: int
    trajectories_per_host: int
    micro_batches: int  # per mini-batch update
    micro_rows: int  # global rows of one micro-batch (all hosts)
    micro_per_host: int
    seq_len: int
    slots: int  # per host
    cache_len: int


def step_shapes(exp, hosts: int, seq_len: int | None) -> StepShapes:
    if exp.prompts_per_step % hosts:
        raise FitCheckError(f"train.prompts_per_step={exp.prompts_per_step} cannot be split over the topology's "
                            f"{hosts} hosts")
    per_host = exp.prompts_per_step // hosts * exp.samples_per_prompt
    mini = per_host // exp.update.mini_batches
    micro = exp.update.micro_batch_size or mini
    if mini % micro:
        raise FitCheckError(f"UpdateSpec.micro_batch_size={micro} does not divide the {mini} trajectories each of "
                            f"the {hosts} hosts holds per mini-batch")
    max_context = exp.rollout.agent.max_context_tokens
    length = seq_len or bucketed_length(max_context, minimum=exp.update.min_sequence_length, maximum=max_context)
    return StepShapes(hosts=hosts, trajectories_per_host=per_host, micro_batches=mini // micro,
                      micro_rows=micro * hosts, micro_per_host=micro, seq_len=length, slots=0, cache_len=max_context)


# ----- compile -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    """Everything the fit check measured (bytes per chip)."""

    topology: tpu.Topology
    cfg: Qwen2Config
    cfg_source: str
    shapes: StepShapes
    held: dict[str, int]  # long-lived buffers per chip
    functions: list[FunctionMemory]
    update_stats: object  # fit.hlo.ProgramStats of the update
    update_cost: dict
    model_flops_per_update: float
    mesh_shape: dict

    def as_dict(self) -> dict:
        return {"topology": self.topology.name, "chips": self.topology.num_chips, "hosts": self.topology.num_hosts,
                "devices": len(self.topology.devices), "shapes": dataclasses.asdict(self.shapes),
                "mesh": self.mesh_shape, "held_bytes": self.held,
                "functions": [dataclasses.asdict(f) | {"peak": f.peak, "step_peak": f.step_peak}
                              for f in self.functions],
                "peak_function": self.peak.name, "peak_bytes": self.peak.step_peak,
                "hbm_bytes": self.hbm_per_device, "fits": self.fits,
                "update": None if not self.update_stats.matmul_flops else {
                           "model_flops_per_chip": self.model_flops_per_update / len(self.topology.devices),
                           "matmul_flops_per_chip": self.update_stats.matmul_flops,
                           "matmul_flops_once_per_chip": self.update_stats.matmul_flops_once,
                           "cost_analysis_flops": float(self.update_cost.get("flops", 0.0)),
                           "attention_kernel_calls": self.update_stats.kernel_calls,
                           "attention_kernel_flops_per_chip": self.kernel_flops,
                           "predicted_s": self.update_predicted_s, "mfu": self.update_mfu,
                           "collectives": {op: {"count": c, "bytes": b}
                                           for op, (c, b) in self.update_stats.collectives.items()}}}

    @property
    def peak(self) -> FunctionMemory:
        return max(self.functions, key=lambda f: f.step_peak)

    @property
    def hbm_per_device(self) -> float:
        return self.topology.chip.hbm_gib * GIB / self.topology.devices_per_chip

    @property
    def fits(self) -> bool:
        return self.peak.step_peak <= self.hbm_per_device

    @property
    def peak_flops_per_device(self) -> float:
        return self.topology.chip.bf16_tflops * 1e12 / self.topology.devices_per_chip

    @property
    def kernel_flops(self) -> float:
        """FLOPs per chip inside the attention kernel, which XLA's cost model cannot see: the causal attention of
        the model FLOPs, plus its recomputed forward under remat."""
        if not self.update_stats.kernel_calls:
            return 0.0
        s, cfg = self.shapes, self.cfg
        tokens = s.micro_batches * s.micro_rows * s.seq_len
        attention = 6.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * s.seq_len * tokens
        return attention * (4 / 3 if cfg.remat else 1.0) / len(self.topology.devices)

    @property
    def flops_counted(self) -> bool:
        """Whether the compiled FLOPs found cover the model's (they must: the program computes at least those);
        when they do not, some matmuls hide in a form fit/hlo.py does not read, and no time is predicted."""
        per_device = self.model_flops_per_update / len(self.topology.devices)
        return self.update_stats.matmul_flops + self.kernel_flops >= 0.95 * per_device

    @property
    def update_predicted_s(self) -> float | None:
        """XLA's cost model (its loops counted) plus the attention kernel's FLOPs at peak."""
        if not self.flops_counted:
            return None
        optimal = float(self.update_cost.get("optimal_seconds", 0.0) or 0.0)
        kernel_s = self.kernel_flops / self.peak_flops_per_device
        if optimal > 0:
            return optimal * self.update_stats.loop_factor + kernel_s
        return self.update_stats.matmul_flops / self.peak_flops_per_device + kernel_s

    @property
    def update_mfu(self) -> float | None:
        if self.update_predicted_s is None:
            return None
        per_device = self.model_flops_per_update / len(self.topology.devices)
        return per_device / (self.update_predicted_s * self.peak_flops_per_device)


def model_flops(cfg: Qwen2Config, tokens: int, seq_len: int) -> float:
    """Training FLOPs of `tokens` tokens in rows of seq_len (the usual MFU numerator): 6 per weight of every
    matmul (the vocabulary projection included) and 6·L·H·Dh·T per token for causal attention (QKᵀ and PV over
    T/2 keys on average, forward and the two backward matmuls)."""
    d, f, h, kv, dh, layers = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                               cfg.head_dim, cfg.num_layers)
    matmul_weights = layers * (d * (h + 2 * kv) * dh + h * dh * d + 3 * d * f) + d * cfg.vocab_size
    return tokens * (6.0 * matmul_weights + 6.0 * layers * h * dh * seq_len)


_OUT_OF_HBM = re.compile(r"required for (?:HLO )?(\w[\w ]*?) \(([\d.]+)([KMGT])\) exceeds available HBM "
                         r"\(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _compile(name: str, lowered, held_around: int, log) -> tuple[FunctionMemory, object | None]:
    """Compile and measure; a function XLA refuses for want of HBM is recorded with the bytes XLA says it
    needs (as temporaries: XLA reports only that total) instead of stopping the check."""
    log(f"compiling {name} …")
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        match = _OUT_OF_HBM.search(str(error))
        if "RESOURCE_EXHAUSTED" not in str(error) or not match:
            raise
        seconds = time.perf_counter() - start
        log(f"{name}: XLA ran out of HBM after {seconds:.1f} s: {str(error).splitlines()[0]}")
        needed = int(float(match.group(2)) * _UNITS[match.group(3)])
        return FunctionMemory(name=name, argument=0, output=0, alias=0, temp=needed, code=0, compile_s=seconds,
                              held_around=held_around, out_of_hbm=True), None
    seconds = time.perf_counter() - start
    log(f"compiled {name} in {seconds:.1f} s")
    return FunctionMemory.of(name, compiled, seconds, held_around), compiled


def build_update(exp, topology: tpu.Topology, cfg: Qwen2Config, shapes: StepShapes):
    """The trainer's PolicyModel and PolicyUpdate for the experiment on the topology's devices (shapes only)."""
    try:
        mesh, rules = make_mesh(exp.mesh, devices=topology.devices)
    except ValueError as error:
        raise FitCheckError(f"MeshSpec on {topology.name}'s {len(topology.devices)} devices: {error}") from None
    policy = policy_from_config(exp.model, cfg, mesh, rules)
    total_updates = exp.num_steps * exp.update.mini_batches * exp.update.epochs
    try:
        update = PolicyUpdate(policy.graphdef, policy.abstract_params,
                              optimizer=make_optimizer(exp.optimizer, total_updates),
                              schedule=learning_rate_schedule(exp.optimizer, total_updates), loss_config=exp.loss,
                              mesh=mesh, rules=rules, micro_batch_size=shapes.micro_per_host,
                              logprob_chunk_size=exp.model.logprob_chunk_size, processes=topology.num_hosts)
    except ValueError as error:
        raise FitCheckError(f"UpdateSpec / MeshSpec: {error}") from None
    return policy, update


def load_experiment(flags: gin_config.GinFlags):
    """The Experiment of gin flags, with stand-ins for the paths the fit check never reads."""
    from tspo_jax import configurables

    return gin_config.build(flags, configurables.train,
                            defaults=[gin_config.Binding(text, "the fit check's stand-in") for text in PLACEHOLDERS])


def run_fit_check(exp, topology: tpu.Topology, cfg: Qwen2Config, cfg_source: str, *, seq_len: int | None = None,
                  log=lambda message: None) -> Report:
    """Compile the experiment's functions for `topology` and account for their memory (see the module doc)."""
    hosts = topology.num_hosts
    shapes = step_shapes(exp, hosts, seq_len)
    policy, update = build_update(exp, topology, cfg, shapes)
    mesh, rules = policy.mesh, policy.rules
    if hosts > 1:  # each host's engine runs on its own chips (training.multihost.HostReplicas)
        engine_mesh = multihost.host_mesh(0, exp.mesh.tensor, devices=topology.one_host().devices)
        engine_rules = sharding.normalize_rules(exp.mesh.rules or None, engine_mesh)
    else:
        engine_mesh, engine_rules = mesh, rules
    slots = engine_slots(exp.rollout.slots or shapes.trajectories_per_host, engine_mesh, engine_rules)
    shapes = dataclasses.replace(shapes, slots=slots)
    try:
        engine = build_engine(policy, exp.rollout, slots=slots, sampling=exp.rollout.sampling, mesh=engine_mesh,
                              rules=engine_rules)
    except ValueError as error:
        raise FitCheckError(f"RolloutSpec.slots / MeshSpec: {error}") from None

    params = bytes_per_device(policy.abstract_params)
    optimizer = bytes_per_device(update.abstract_optimizer_state(policy.abstract_params))
    reference_state = policy.abstract_state(policy.cfg.dtype)
    reference = bytes_per_device(reference_state) if update.uses_reference else 0
    engine_copy = hosts > 1 or jnp.dtype(exp.model.param_dtype) != jnp.dtype(exp.model.dtype)
    engine_params = bytes_per_device(engine.abstract_params()) if engine_copy else 0
    held = {"policy params": params, "optimizer state": optimizer, "reference": reference,
            "engine params": engine_params, "KV cache + decode state": bytes_per_device(engine.abstract_decode_state())}
    persistent = params + optimizer + reference + engine_params

    functions = []
    update_memory, update_compiled = _compile(
        "update", update.lower_update(policy.abstract_params, shapes.micro_batches, shapes.micro_rows,
                                      shapes.seq_len), persistent - params - optimizer, log)
    functions.append(update_memory)
    functions.append(_compile("logprobs.policy", update.lower_log_probs(policy.abstract_params, shapes.micro_rows,
                                                                        shapes.seq_len),
                              persistent - params, log)[0])
    if update.uses_reference:
        functions.append(_compile("logprobs.reference", update.lower_log_probs(reference_state, shapes.micro_rows,
                                                                               shapes.seq_len),
                                  persistent - reference, log)[0])
    # The engine's arguments are its params (the policy's own arrays when there is no copy) and the decode state.
    around_engine = persistent - (engine_params if engine_copy else params)
    for name, lowered in engine.lower(decode_steps=exp.rollout.agent.decode_steps_per_call).items():
        functions.append(_compile(f"engine.{name}", lowered, around_engine, log)[0])
    functions.append(_compile("advantages", _lower_advantages(exp, shapes, topology), persistent, log)[0])

    cost = update_compiled.cost_analysis() if update_compiled is not None else {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    tokens = shapes.micro_batches * shapes.micro_rows * shapes.seq_len
    return Report(topology=topology, cfg=policy.cfg, cfg_source=cfg_source, shapes=shapes, held=held,
                  functions=functions, update_stats=program_stats(update_compiled.as_text() if update_compiled else ""),
                  update_cost=cost,
                  model_flops_per_update=model_flops(cfg, tokens, shapes.seq_len), mesh_shape=dict(mesh.shape))


def _lower_advantages(exp, shapes: StepShapes, topology: tpu.Topology):
    """The advantage step of one host's trajectories (the trainer runs it on the host's first device)."""
    device = jax.sharding.SingleDeviceSharding(topology.host_devices(0)[0])
    groups, samples = shapes.trajectories_per_host // exp.samples_per_prompt, exp.samples_per_prompt
    turns = exp.rollout.max_turns_per_trajectory
    rows = shapes.trajectories_per_host

    def step(outcome, correct, folr_turn, num_turns, turn_id, loss_mask):
        turn = turn_advantages(exp.algorithm, outcome=outcome, correct=correct, folr_turn=folr_turn,
                               num_turns=num_turns, max_turns=turns,
                               shaping=jnp.zeros_like(outcome) if exp.algorithm.name == "gtpo" else None)
        return estimators.token_advantages(turn.reshape(rows, turns), turn_id, loss_mask)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=device)

    grid = (groups, samples)
    return jax.jit(step).lower(spec(grid, jnp.float32), spec(grid, jnp.bool_), spec(grid, jnp.int32),
                               spec(grid, jnp.int32), spec((rows, shapes.seq_len), jnp.int32),
                               spec((rows, shapes.seq_len), jnp.int32))


# ----- what would help ---------------------------------------------------------------------------------------
def knobs(report: Report, exp) -> list[Knob]:
    """Bindings that lower the peak function's step peak. Each is halved until the estimate fits (at most 6
    times); estimates scale the parts a knob drives linearly (the cache with the slots, activations with the
    rows), so they are a guide: run the fit check again with the binding to see the compiled figure."""
    peak, shapes, cfg, held = report.peak, report.shapes, report.cfg, report.held
    limit = report.hbm_per_device
    shards = int(np.prod([report.mesh_shape[a] for a in ("data", "fsdp")]))
    out = []

    def halving(binding, value, estimate, why, allowed=lambda v: True):
        """The first halving of `value` whose estimate fits (else the smallest tried)."""
        best = None
        for k in range(1, 7):
            candidate = value // 2**k
            if candidate < 1 or value % 2**k or not allowed(candidate):
                break
            best = Knob(binding, candidate, int(estimate(2.0**-k)), why)
            if best.peak_after <= limit:
                break
        if best is not None:
            out.append(best)

    if peak.name in ("update", "logprobs.policy", "logprobs.reference"):
        own = {"update": held["policy params"] + held["optimizer state"], "logprobs.reference": held["reference"]}
        inputs = max(peak.argument - own.get(peak.name, held["policy params"]), 0)
        halving("UpdateSpec.micro_batch_size", shapes.micro_per_host,
                lambda f: peak.step_peak - (1 - f) * (peak.temp + inputs),
                "activations and logits scale with the rows of a micro-batch",
                allowed=lambda micro: micro * shapes.hosts % shards == 0)
        chunk = exp.model.logprob_chunk_size
        rows_per_device = max(shapes.micro_rows // shards, 1)
        block = rows_per_device * min(chunk, shapes.seq_len) * cfg.vocab_size * 4
        blocks = 2 if peak.name == "update" else 1  # the update also holds the logits' gradient
        halving("ModelSpec.logprob_chunk_size", min(chunk, shapes.seq_len),
                lambda f: peak.step_peak - (1 - f) * min(blocks * block, peak.temp),
                f"f32[{rows_per_device} rows x chunk, {cfg.vocab_size}] logits blocks per chip",
                allowed=lambda c: c >= 64)
        if peak.name == "update" and not exp.model.remat:
            out.append(Knob("ModelSpec.remat", True, int(peak.step_peak - peak.temp * (1 - 2 / cfg.num_layers)),
                            "keep one block's activations instead of every block's"))
    if peak.name.startswith("engine."):
        kv = held["KV cache + decode state"]
        halving("RolloutSpec.slots", shapes.slots, lambda f: peak.step_peak - (1 - f) * (kv + peak.temp),
                "the KV cache and decode temporaries scale with the slots", allowed=lambda s: s % shards == 0)
        halving("AgentConfig.max_context_tokens", shapes.cache_len,
                lambda f: peak.step_peak - (1 - f) * (kv + peak.temp),
                "the KV cache scales with the positions per slot (and caps the trajectories)",
                allowed=lambda n: n >= 256)
    sharded = held["policy params"] + held["optimizer state"] + held["reference"]
    out.append(Knob("MeshSpec", f"a slice with {2 * report.topology.num_chips} chips",
                    int(peak.step_peak - sharded / 2), "params, optimizer state and reference are FSDP-sharded"))
    return sorted((k for k in out if k.peak_after < 0.99 * peak.step_peak), key=lambda k: k.peak_after)


# ----- printing ----------------------------------------------------------------------------------------------
def format_report(report: Report, exp, gin_files: Sequence[str]) -> list[str]:
    t, s, cfg = report.topology, report.shapes, report.cfg

    def gib(value: float) -> str:
        return f"{value / GIB:8.2f}"

    lines = [
        f"fit check: {' '.join(gin_files)} on {t.name} ({t.num_chips} chips, {len(t.devices)} devices, "
        f"{t.num_hosts} host(s), {t.chip.hbm_gib:g} GiB HBM and {t.chip.bf16_tflops:g} bf16 TFLOP/s per chip)",
        f"model: {cfg_summary(cfg)} from {report.cfg_source}",
        f"mesh: {' '.join(f'{k}={v}' for k, v in report.mesh_shape.items())}; update: {s.micro_batches} "
        f"micro-batch(es) of {s.micro_rows} rows x {s.seq_len} tokens per mini-batch; engine: {s.slots} slots x "
        f"{s.cache_len} positions per host, {exp.rollout.agent.decode_steps_per_call} decode steps per call",
        "",
        "held between calls               GiB per chip",
    ]
    notes = {"reference": f"({cfg.dtype.name})", "policy params": f"({cfg.param_dtype.name})",
             "engine params": (f"({cfg.dtype.name} copy)" if report.held["engine params"] else
                               "(none: decodes from the policy's own arrays)"),
             "KV cache + decode state": "(during rollouts only)"}
    for name, value in report.held.items():
        lines.append(f"  {name:<30}{gib(value)}  {notes.get(name, '')}".rstrip())
    lines += ["", f"{'function':<20}{'args':>8}{'out':>8}{'alias':>8}{'temp':>8}{'code':>8}{'peak':>8}"
                  f"{'+held':>8}{'step':>8}{'compile_s':>11}"]
    for f in report.functions:
        lines.append(f"{f.name:<20}{gib(f.argument)}{gib(f.output)}{gib(f.alias)}{gib(f.temp)}{gib(f.code)}"
                     f"{gib(f.peak)}{gib(f.held_around)}{gib(f.step_peak)}{f.compile_s:11.1f}"
                     + ("  XLA: out of HBM (temp = all it needs)" if f.out_of_hbm else ""))
    lines.append(f"(GiB per chip; step = held around the call + its own peak; total compile "
                 f"{sum(f.compile_s for f in report.functions):.0f} s)")
    stats, cost = report.update_stats, report.update_cost
    peak_flops = t.chip.bf16_tflops * 1e12 / t.devices_per_chip
    updates = exp.update.mini_batches * exp.update.epochs
    if not stats.matmul_flops:
        return lines + ["", "update: not compiled (out of HBM), so no FLOPs or time to report"]
    lines += [
        "",
        f"update (one mini-batch): model FLOPs {report.model_flops_per_update / len(t.devices):.3e} per chip; "
        f"compiled matmul FLOPs {stats.matmul_flops:.3e} per chip counting loops "
        f"({stats.matmul_flops_once:.3e} with each loop body once, as XLA's cost analysis counts: "
        f"{float(cost.get('flops', 0.0)):.3e})"
        + (f" + {report.kernel_flops:.3e} in {stats.kernel_calls:g} attention-kernel calls" if stats.kernel_calls
           else ""),
        (f"  predicted {report.update_predicted_s:.3f} s per update ("
         + ("XLA cost model x loop trip counts" if float(cost.get("optimal_seconds", 0) or 0) > 0 else
            "matmul FLOPs at peak") + (" + the kernel's FLOPs at peak" if stats.kernel_calls else "")
         + f"), MFU {100 * report.update_mfu:.1f}% "
         f"(all compiled FLOPs at peak: {(stats.matmul_flops + report.kernel_flops) / peak_flops:.3f} s)")
        if report.flops_counted else
        "  no time or MFU predicted: the compiled matmuls found fall short of the model's FLOPs (some are in a form "
        "tspo_jax/fit/hlo.py does not read on this chip)",
        "  collectives per update per chip: " + (", ".join(
            f"{op} {nbytes / GIB:.3f} GiB ({count:g} ops)" for op, (count, nbytes) in stats.collectives.items())
            or "none") + f"; per step ({updates} updates): {stats.collective_bytes * updates / GIB:.1f} GiB",
    ]
    return lines


def cfg_summary(cfg: Qwen2Config) -> str:
    params = sum(int(np.prod(v)) for v in _param_shapes(cfg))
    return (f"Qwen2 {params / 1e9:.2f}B params ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab "
            f"{cfg.vocab_size}), {cfg.dtype.name} compute, {cfg.param_dtype.name} params, remat={cfg.remat}, "
            f"scan_layers={cfg.scan_layers}, attention={cfg.attention}")


def _param_shapes(cfg: Qwen2Config):
    from flax import nnx
    from tspo_jax.models.qwen2 import Qwen2ForCausalLM

    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    return [leaf.shape for leaf in jax.tree.leaves(nnx.state(abstract))]


# ----- CLI ---------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]):
    flags, rest = gin_config.split_gin_flags(argv)
    parser = argparse.ArgumentParser(prog="python -m tspo_jax.fit_check", description=__doc__.split("\n\n")[0],
                                     epilog="gin flags as for tspo_jax.train: --gin_file F, --gin.NAME=VALUE, …")
    parser.add_argument("--topology", required=True, help="e.g. v5p:2x2x1, v5e:4x4, v6e:2x4, v5p:2x2x2")
    parser.add_argument("--model_config", help="a preset (0.5b, 1.5b, 3b, 7b, tiny) or a HF config.json / directory")
    parser.add_argument("--seq_len", type=int,
                        help="tokens per trajectory row (default: the longest the trainer packs)")
    parser.add_argument("--json", help="also write the measurements (bytes per chip, seconds) to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return flags, parser.parse_args(rest)


def main(argv: Sequence[str] | None = None) -> int:
    flags, args = parse_args(sys.argv[1:] if argv is None else argv)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    try:
        exp = load_experiment(flags)
        cfg, source = model_config(exp.model, args.model_config)
        topology = tpu.topology(args.topology)
        report = run_fit_check(exp, topology, cfg, source, seq_len=args.seq_len, log=log)
    except (gin_config.GinConfigError, FitCheckError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in format_report(report, exp, flags.files):
        print(line)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    peak = report.peak
    if not report.fits:
        print(f"\ndoes not fit: {peak.name} needs {peak.step_peak / GIB:.2f} GiB per chip of "
              f"{report.hbm_per_device / GIB:.2f}; what would help (estimates):")
        for knob in knobs(report, exp):
            change = (f"--gin.{knob.binding}={knob.value!r}" if knob.binding != "MeshSpec" else
                      f"{knob.binding}: {knob.value}")
            print(f"  {change}: ~{knob.peak_after / GIB:.2f} GiB per chip ({knob.why})")
    print(f"fits={int(report.fits)} peak_gib_per_chip={peak.step_peak / GIB:.2f} "
          f"hbm_gib_per_chip={report.hbm_per_device / GIB:.2f}", flush=True)
    return 0 if report.fits else 1


if __name__ == "__main__":
    sys.exit(main())
