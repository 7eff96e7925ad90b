"""Causal self-attention over a whole sequence (training, the log-prob pass) with JAX's Pallas TPU kernel.

The XLA path (`qwen2.grouped_attention`) materialises f32 scores [B, KV, G*T, T]: at T = 4608 on Qwen2.5-7B that is
2.4 GB per sequence in the forward pass alone. Splash attention (jax.experimental.pallas.ops.tpu.splash_attention)
streams K/V blocks through VMEM with an online softmax and never holds them, forward or backward, and skips the
blocks above the causal diagonal. Padding is expressed with segment ids (real tokens 1, padding 0), so a real
token sees exactly what the XLA path's causal_padding_mask lets it see.

`use_kernel(choice, length)` decides per call: "xla" never, "pallas" always (on a CPU it runs in Pallas interpret
mode: slow, for checking the kernel against the XLA path), "auto" when compiling for TPU and the length tiles.
Under a mesh the kernel runs per shard (`shard_map`): rows split like the batch, heads like the heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from tspo_jax import sharding

CHOICES = ("auto", "xla", "pallas")
_TPU_BLOCK = 128  # the kernel's smallest tile along the sequence on TPU


def compile_platform() -> str:
    """The platform being compiled for: the active mesh's devices (the fit check's compile-only TPUs on a CPU
    host), else JAX's default backend."""
    active = sharding.active_rules()
    return active[0].devices.flat[0].platform if active is not None else jax.default_backend()


def use_kernel(choice: str, length: int) -> bool:
    if choice not in CHOICES:
        raise ValueError(f"ModelSpec.attention = {choice!r} is not one of {CHOICES}")
    if choice == "xla":
        return False
    tiles = length % _TPU_BLOCK == 0
    if choice == "auto":
        return compile_platform() == "tpu" and tiles
    if compile_platform() == "tpu" and not tiles:
        raise ValueError(f"ModelSpec.attention = 'pallas': sequences of {length} tokens do not tile into blocks of "
                         f"{_TPU_BLOCK} (keep UpdateSpec.min_sequence_length a multiple of {_TPU_BLOCK})")
    return True


def _block(length: int) -> int:
    """The largest power-of-two block (<= 512) that divides the length."""
    block = 512
    while length % block:
        block //= 2
    return block


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = _block(length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local_attention(q, k, v, valid, *, interpret: bool):
    """One shard: q [b, H, T, Dh], k / v [b, KV, T, Dh], valid bool[b, T] -> [b, H, T, Dh]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    kernel = _kernel(q.shape[1], q.shape[2], interpret)
    segments = valid.astype(jnp.int32)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, SegmentIds(q=s, kv=s)))(q, k, v, segments)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """Causal grouped-query attention: q [B, T, H, Dh] (unscaled), k / v [B, T, KV, Dh], valid bool[B, T]
    (False = padding) -> [B, T, H, Dh], what grouped_attention gives under causal_padding_mask(valid) on every
    real token (padding positions differ and are never used)."""
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q * scale, k, v))  # [B, heads, T, Dh]
    interpret = compile_platform() != "tpu"
    run = functools.partial(_local_attention, interpret=interpret)
    active = sharding.active_rules()
    if active is not None:
        mesh, rules = active
        rows = sharding.logical_to_spec(("batch",), rules)[0]
        q_heads = sharding.logical_to_spec(("act_q_heads",), rules)[0]
        kv_heads = sharding.logical_to_spec(("act_kv_heads",), rules)[0]
        if q_heads != kv_heads:
            raise ValueError(f"the attention kernel needs query and KV heads split alike, but the rules give "
                             f"act_q_heads -> {q_heads!r} and act_kv_heads -> {kv_heads!r}; use "
                             "ModelSpec.attention = 'xla' or the same rule for both")
        heads = PartitionSpec(rows, q_heads, None, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(heads, heads, heads, PartitionSpec(rows, None)),
                            out_specs=heads, check_vma=False)
    return run(q, k, v, valid).transpose(0, 2, 1, 3)
