"""`python -m tspo_jax.fit_check` compiles the tiny experiment's real functions for TPU topologies (libtpu's
compile-only devices, on this CPU host) and reports bytes per chip that agree with counts made from shapes."""

import json

import numpy as np
import pytest

from tspo_jax.models.qwen2 import PRESETS

pytest.importorskip("libtpu", reason="the fit check compiles with libtpu (requirements-dev.txt installs it)")

from tspo_jax import fit_check  # noqa: E402

TINY = PRESETS["tiny"]
# Short sequences and contexts keep each compile small; the shapes are what the test counts.
SMALL = ["--gin_file=configs/experiments/tiny_cpu.gin", "--model_config=tiny",
         "--gin.AgentConfig.max_context_tokens=256", "--gin.UpdateSpec.min_sequence_length=256", "--quiet"]


def run(tmp_path, capsys, *args):
    out = tmp_path / "report.json"
    code = fit_check.main([*SMALL, *args, f"--json={out}"])
    return code, capsys.readouterr().out, json.loads(out.read_text()) if out.exists() else None


def param_bytes_per_device(fsdp: int, itemsize: int) -> int:
    """Qwen2's parameters by hand, under the default rules: every matrix splits its model dimension over fsdp;
    biases and norm scales are replicated (tensor = 1)."""
    c = TINY
    d, f, h, kv, dh, v, layers = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                  c.vocab_size, c.num_layers)
    matrices = v * d + layers * (d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f)
    replicated = layers * (h * dh + 2 * kv * dh + 2 * d) + d
    return (matrices // fsdp + replicated) * itemsize


def decode_state_bytes_per_device(slots: int, cache_len: int, devices: int, itemsize: int = 4) -> int:
    """K and V [layers, slots, S, kv_heads, head_dim] in the compute dtype plus the per-slot vectors (5 int32,
    a uint32 key pair, an active flag), slots split over the host's devices."""
    c = TINY
    per_slot = 2 * c.num_layers * cache_len * c.num_kv_heads * c.head_dim * itemsize + 5 * 4 + 2 * 4 + 1
    return slots // devices * per_slot


def test_single_host_topology_counts_params_and_kv_cache_as_shapes_say(tmp_path, capsys):
    code, out, report = run(tmp_path, capsys, "--topology=v5p:2x2x1")
    assert code == 0, out
    assert out.rstrip().splitlines()[-1] == (f"fits=1 peak_gib_per_chip={report['peak_bytes'] / 2**30:.2f} "
                                             "hbm_gib_per_chip=95.00")
    held = report["held_bytes"]
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert held["policy params"] == param_bytes_per_device(fsdp=4, itemsize=4)
    assert held["reference"] == held["policy params"]  # tiny_cpu computes in fp32: the reference is fp32 too
    assert held["engine params"] == 0  # fp32 compute: the engine decodes from the policy's own arrays
    assert held["optimizer state"] >= 2 * held["policy params"]  # Adam's two moments, and counters
    slots = 8 * 5  # prompts x samples, one slot per trajectory
    assert report["shapes"]["slots"] == slots
    assert held["KV cache + decode state"] == decode_state_bytes_per_device(slots, 256, devices=4)
    names = [f["name"] for f in report["functions"]]
    assert names == ["update", "logprobs.policy", "logprobs.reference", "engine.append", "engine.generate",
                     "advantages"]
    update = report["functions"][0]
    # The update's arguments are the params, the optimizer state and one mini-batch (7 fields of 40 rows x 256
    # tokens, 4 bytes each but the bool attention mask, the rows split over the 4 devices). XLA:TPU lays small
    # arrays out in (8, 128) tiles, so its buffers are at least the logical bytes (a tiny model's much more).
    minibatch = (6 * 4 + 1) * 40 * 256 // 4
    assert update["argument"] >= held["policy params"] + held["optimizer state"] + minibatch
    assert update["alias"] >= held["policy params"] + held["optimizer state"]  # donated, updated in place
    generate = next(f for f in report["functions"] if f["name"] == "engine.generate")
    assert generate["argument"] >= held["KV cache + decode state"] + held["policy params"]
    assert report["peak_bytes"] == max(f["step_peak"] for f in report["functions"])
    # The compiled FLOPs (loops counted, the attention kernel's added: XLA cannot see inside it) are the model's
    # 6 per weight per token and causal attention (the last position predicts nothing, so a little less).
    update = report["update"]
    assert update["attention_kernel_calls"] == 2 * TINY.num_layers  # forward and backward, per layer
    compiled = update["matmul_flops_per_chip"] + update["attention_kernel_flops_per_chip"]
    assert 0.95 * update["model_flops_per_chip"] <= compiled <= 1.5 * update["model_flops_per_chip"]


def test_multi_host_topology_gives_each_host_an_engine_copy_on_its_own_chips(tmp_path, capsys):
    code, out, report = run(tmp_path, capsys, "--topology=v5p:2x2x2", "--gin.UpdateSpec.micro_batch_size=4",
                            "--gin.ModelSpec.dtype='bfloat16'")
    assert code == 0, out
    assert report["hosts"] == 2 and report["mesh"]["fsdp"] == 8
    held = report["held_bytes"]
    assert held["policy params"] == param_bytes_per_device(fsdp=8, itemsize=4)  # fp32 master weights
    assert held["reference"] == param_bytes_per_device(fsdp=8, itemsize=2)  # frozen: held in the bf16 compute dtype
    # Each host samples from its own whole bf16 copy, FSDP-split over its 4 chips only.
    assert held["engine params"] == param_bytes_per_device(fsdp=4, itemsize=2)
    slots = 8 * 5 // 2  # each host rolls out half of the step's trajectories
    assert report["shapes"]["slots"] == slots
    assert held["KV cache + decode state"] == decode_state_bytes_per_device(slots, 256, devices=4, itemsize=2)
    assert report["shapes"]["micro_rows"] == 8  # 4 rows per host, both hosts in one global micro-batch


def test_a_config_too_big_for_the_chip_exits_1_and_names_the_knob(tmp_path, capsys):
    # 65,536 slots x 4,096 positions of the tiny model's fp32 cache: ~34 GiB per v5e chip of 16.
    code, out, report = run(tmp_path, capsys, "--topology=v5e:2x2", "--seq_len=256",
                            "--gin.RolloutSpec.slots=65536", "--gin.AgentConfig.max_context_tokens=4096")
    assert code == 1, out
    lines = out.rstrip().splitlines()
    assert lines[-1].startswith("fits=0 ") and lines[-1].endswith("hbm_gib_per_chip=16.00")
    assert report["peak_function"] == "engine.generate"
    expected = decode_state_bytes_per_device(65536, 4096, devices=4)
    assert report["held_bytes"]["KV cache + decode state"] == expected
    advice = "\n".join(lines[lines.index(next(l for l in lines if l.startswith("does not fit"))):])
    assert "--gin.RolloutSpec.slots=" in advice  # the knob that shrinks the cache


def test_bad_topology_and_missing_shapes_are_named(tmp_path, capsys):
    assert fit_check.main([*SMALL, "--topology=v5p-8"]) == 2
    assert "expected GENERATION:SHAPE" in capsys.readouterr().err
    assert fit_check.main(["--gin_file=configs/experiments/search_r1_qwen2_5_3b.gin", "--topology=v5p:2x2x1",
                           "--gin.ModelSpec.expect_preset=None", "--quiet"]) == 2
    assert "give --model_config" in capsys.readouterr().err


def test_memory_accounting_counts_the_largest_shard():
    import jax
    import jax.numpy as jnp
    from tspo_jax.fit.budget import bytes_per_device

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(4), ("x",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tree = {"a": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=split),
            "b": jax.ShapeDtypeStruct((5,), jnp.bfloat16, sharding=whole)}
    assert bytes_per_device(tree) == 2 * 3 * 4 + 5 * 2


def test_program_stats_count_every_loop_iteration_and_the_collectives():
    """A scan of 3 batched matmul steps compiled for v5p:2x2x1: XLA's cost analysis counts the body once; the
    loop-aware count is exactly 3 bodies of 2*B*M*N*K per chip, and the all-gathered operand is counted."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from tspo_jax.fit import tpu
    from tspo_jax.fit.hlo import program_stats

    mesh = jax.sharding.Mesh(np.array(tpu.topology("v5p:2x2x1").devices), ("x",))
    batch, m, k, n, steps = 8, 256, 512, 384, 3  # the batch is split over the 4 chips

    def f(x, w):
        def body(acc, x_step):
            return acc + jnp.einsum("bmk,bkn->bmn", x_step, w), None
        return jax.lax.scan(body, jnp.zeros((batch, m, n), jnp.float32), x)[0]

    rows = NamedSharding(mesh, P(None, "x"))
    compiled = jax.jit(f, out_shardings=NamedSharding(mesh, P("x"))).lower(
        jax.ShapeDtypeStruct((steps, batch, m, k), jnp.bfloat16, sharding=rows),
        jax.ShapeDtypeStruct((batch, k, n), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, None, "x")))
    ).compile()
    stats = program_stats(compiled.as_text())
    per_chip_step = 2 * (batch // 4) * m * k * n
    assert stats.matmul_flops == steps * per_chip_step
    assert stats.matmul_flops_once == per_chip_step
    assert compiled.cost_analysis()["flops"] < 1.5 * per_chip_step  # XLA's own count: the body once
    assert stats.collectives  # w's n-split must be gathered to multiply by every row's k
