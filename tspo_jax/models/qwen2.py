"""Qwen2.5 decoder-only transformer in Flax NNX (device-side, jitted by callers).

    embed -> [RMSNorm -> GQA attention (RoPE, q/k/v biases) -> + -> RMSNorm -> SwiGLU MLP -> +] x L -> RMSNorm -> logits

Two paths share the same blocks:
  * teacher-forced (training, scoring): `model(tokens, positions, attention_mask=mask) -> f32[B, T, V]`
  * KV cache (rollouts): `model(tokens, positions, cache=cache, cache_start=start) -> (f32[B, T, V], cache)`
    writes the chunk's keys/values at cache rows [start[b], start[b] + T) and lets token t of row b attend to every
    cache row j <= start[b] + t. Prefill, one-token decode and appending an observation mid-rollout are all this one
    call with fixed shapes, so a sampler compiles it once per chunk length.

Parameters are stored in `param_dtype` (fp32) and cast to `dtype` (bf16 on TPU) where used; normalisation, softmax
and logits are computed in fp32. Every parameter carries `logical_axes` metadata for tspo_jax.sharding.
Naming follows the Hugging Face module tree so tspo_jax.models.hf_io maps tensors one to one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Union

import jax
import jax.numpy as jnp
from flax import nnx

from tspo_jax import sharding
from tspo_jax.models import attention

DType = Union[str, jnp.dtype, type]


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    dtype: DType = "float32"  # compute dtype (bfloat16 on TPU)
    param_dtype: DType = "float32"  # storage dtype of the parameters (and of their optimizer state)
    remat: bool = False  # recompute each block in the backward pass instead of storing its activations
    # One stacked Block ([num_layers, ...] parameters) run by lax.scan instead of num_layers Blocks in a Python
    # loop: XLA compiles the block once (compile time and program size stop growing with depth).
    scan_layers: bool = False
    # Whole-sequence attention (training, log-probs): "auto" = the Pallas splash kernel when compiling for TPU,
    # XLA otherwise; "xla"; "pallas" (interpret mode off TPU). tspo_jax.models.attention.
    attention: str = "auto"
    initializer_range: float = 0.02

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Qwen2Config.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"Qwen2Config: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"Qwen2Config: head_dim={self.head_dim} must be even for rotary embeddings")
        if self.attention not in attention.CHOICES:
            raise ValueError(f"Qwen2Config: attention={self.attention!r} is not one of {attention.CHOICES}")

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> "Qwen2Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "Qwen2Config":
        """The published Qwen2.5 shapes ("0.5b", "1.5b", "3b", "7b") or "tiny" for tests."""
        if name not in PRESETS:
            raise ValueError(f"unknown Qwen2 preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf(cls, dir_or_dict: str | pathlib.Path | dict, **overrides: Any) -> "Qwen2Config":
        """Read a Hugging Face Qwen2 `config.json` (a checkpoint directory, the file itself, or its parsed dict)."""
        if isinstance(dir_or_dict, dict):
            source, hf = "config dict", dir_or_dict
        else:
            path = pathlib.Path(dir_or_dict)
            path = path / "config.json" if path.is_dir() else path
            source = str(path)
            if not path.is_file():
                raise FileNotFoundError(f"{source}: no such file (expected a Hugging Face checkpoint's config.json)")
            try:
                hf = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{source}: not valid JSON ({err})") from err
        return dataclasses.replace(_config_from_hf_dict(hf, source), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` contents transformers' Qwen2ForCausalLM needs to rebuild this model."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_dropout": 0.0,
            "initializer_range": self.initializer_range,
            "use_cache": True,
        }


PRESETS: dict[str, Qwen2Config] = {
    "tiny": Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, rope_theta=10_000.0, max_position_embeddings=2048),
    # The demo world's policy (tspo_jax.data.demo): its tokenizer has every demo word as one token.
    "demo": Qwen2Config(vocab_size=2048, hidden_size=96, intermediate_size=384, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=24, rope_theta=10_000.0, max_position_embeddings=2048),
    "0.5b": Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                        num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "1.5b": Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                        num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
    "3b": Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
                      num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
    "7b": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                      num_kv_heads=4, head_dim=128, tie_word_embeddings=False),
}


def _config_from_hf_dict(hf: dict, source: str) -> Qwen2Config:
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type != "qwen2" or (architectures and "Qwen2ForCausalLM" not in architectures):
        raise ValueError(f"{source}: unsupported model (model_type={model_type!r}, architectures={architectures}); "
                         "tspo_jax loads Qwen2ForCausalLM (model_type 'qwen2') checkpoints only")

    def need(key):
        if key not in hf:
            raise ValueError(f"{source}: missing required field {key!r}")
        return hf[key]

    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (Qwen2 uses 'silu')")
    if hf.get("use_sliding_window", False) or "sliding_attention" in (hf.get("layer_types") or []):
        raise ValueError(f"{source}: sliding-window attention (use_sliding_window/layer_types) is not supported")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"{source}: rope_type={rope_type!r} is not supported (only plain RoPE)")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta"))
    if rope_theta is None:
        raise ValueError(f"{source}: missing required field 'rope_theta' (or rope_parameters.rope_theta)")

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    head_dim = hf.get("head_dim") or hidden // heads
    try:
        return Qwen2Config(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err


# --- pure math ------------------------------------------------------------------------------------------------


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids for a left- (or right-) padded batch: bool[B, T] -> int32[B, T], 0 at the first real token."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x: [..., D] normalised in fp32, returned in x.dtype times scale: [D]."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


def rotary_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin: f32[B, T, head_dim // 2] for int32[B, T] positions (inverse frequencies theta^(-2i/head_dim))."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face/Qwen layout): x: [B, T, N, Dh], cos/sin: f32[B, T, Dh/2]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear(x: jax.Array, w: jax.Array, w_axes: tuple[str, str] | None = None) -> jax.Array:
    """x: [..., K] @ w: [K, N] -> [..., N]; w_axes: w's logical axes (for its gradient's sharding).

    Same math as `x @ w`; the hand-written backward forms the weight gradient as x^T @ dy over the flattened
    tokens. Left to itself XLA:CPU transposes the (larger) output gradient for that contraction, which made the
    transformer layers ~25% slower on CPU; TPUs fold either form into the matmul. That gradient is a partial sum
    over each device's rows; pinned to the weight's own (FSDP) sharding, XLA reduce-scatters it onto the shards
    instead of all-reducing the whole matrix to every device.
    """
    return x @ w


def _linear_fwd(x, w, w_axes):
    return x @ w, (x, w)


def _linear_bwd(w_axes, residuals, d_out):
    x, w = residuals
    d_w = x.reshape(-1, x.shape[-1]).T @ d_out.reshape(-1, d_out.shape[-1])
    if w_axes is not None:
        d_w = sharding.constrain(d_w, w_axes)
    return d_out @ w.T, d_w.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, elementwise. The backward is written out (with s = sigmoid(gate)):
    d gate = dy * up * s * (1 + gate * (1 - s)),  d up = dy * gate * s, so it is one fused pass."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, d_out):
    gate, up = residuals
    s = jax.nn.sigmoid(gate)
    return d_out * up * s * (1 + gate * (1 - s)), d_out * gate * s


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
    """bool[B, T] key validity -> bool[B, T, T]: query t sees valid keys s <= t."""
    length = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return causal[None] & attention_mask[:, None, :]


def cache_mask(cache_start: jax.Array, chunk_len: int, max_len: int) -> jax.Array:
    """int32[B] chunk offsets -> bool[B, T, S]: token t of row b sees cache rows j <= start[b] + t."""
    query_rows = cache_start[:, None] + jnp.arange(chunk_len)[None, :]
    return jnp.arange(max_len)[None, None, :] <= query_rows[:, :, None]


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention of q: [B, T, H, Dh] over k, v: [B, S, KV, Dh] under mask: bool[B, T, S] -> [B, T, H, Dh].

    The G = H / KV query heads sharing a KV head are stacked as one [G*T, Dh] block per (batch, KV head), so each
    KV head's keys meet all of its queries in one matmul without being repeated. Scores and softmax are fp32.
    """
    batch, length, heads, dim = q.shape
    kv_heads, keys = k.shape[2], k.shape[1]
    groups = heads // kv_heads
    q = (q * jnp.asarray(dim ** -0.5, q.dtype)).reshape(batch, length, kv_heads, groups, dim)
    q = q.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, groups * length, dim)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, Dh]
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(batch, kv_heads, groups, length, keys)
    # A finite floor (not -inf) keeps fully masked rows (left padding) finite instead of NaN.
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(batch, kv_heads, groups * length, keys)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(batch, kv_heads, groups, length, dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, dim)


def write_cache_rows(cache: jax.Array, chunk: jax.Array, layer: int, start: jax.Array) -> jax.Array:
    """cache: [L, B, S, KV, Dh]; chunk: [B, T, KV, Dh] written at rows start[b] .. start[b]+T-1 of layer `layer`.

    One scatter into the whole cache, so a donated cache is updated in place (no per-step copy of every layer).
    """
    batch, length = chunk.shape[:2]
    rows = start[:, None] + jnp.arange(length)[None, :]
    return cache.at[layer, jnp.arange(batch)[:, None], rows].set(chunk.astype(cache.dtype), mode="drop")


# --- KV cache -------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer: k, v: [num_layers, B, S, num_kv_heads, head_dim] (post-RoPE keys)."""

    k: jax.Array
    v: jax.Array

    logical_axes = ("layers", "batch", "cache_length", "act_kv_heads", "head_dim")

    @classmethod
    def init(cls, cfg: Qwen2Config, *, batch: int, max_len: int, dtype: DType | None = None) -> "KVCache":
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        dtype = cfg.dtype if dtype is None else jnp.dtype(dtype)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


# --- modules --------------------------------------------------------------------------------------------------


def _param(rngs: nnx.Rngs | None, shape, logical_axes, cfg: Qwen2Config, init: str, stacked: bool = False
           ) -> nnx.Param:
    """A parameter of `shape`; stacked: one per layer, [num_layers, *shape] on the "layers" axis."""
    if stacked:
        shape, logical_axes = (cfg.num_layers, *shape), ("layers", *logical_axes)
    if init == "normal":
        value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, cfg.param_dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, cfg.param_dtype)
    else:
        value = jnp.ones(shape, cfg.param_dtype)
    return nnx.Param(value, logical_axes=logical_axes)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: Qwen2Config, stacked: bool = False):
        self.eps = cfg.rms_norm_eps
        self.scale = _param(None, (cfg.hidden_size,), ("norm",), cfg, "ones", stacked)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class Attention(nnx.Module):
    """Grouped-query self-attention with q/k/v biases and rotary positions."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs, stacked: bool = False):
        self.cfg = cfg
        d, h, kv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_kernel = _param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), cfg, "normal", stacked)
        self.q_bias = _param(rngs, (h, dh), ("q_heads", "head_dim"), cfg, "zeros", stacked)
        self.k_kernel = _param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), cfg, "normal", stacked)
        self.k_bias = _param(rngs, (kv, dh), ("kv_heads", "head_dim"), cfg, "zeros", stacked)
        self.v_kernel = _param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), cfg, "normal", stacked)
        self.v_bias = _param(rngs, (kv, dh), ("kv_heads", "head_dim"), cfg, "zeros", stacked)
        self.o_kernel = _param(rngs, (h, dh, d), ("q_heads", "head_dim", "embed"), cfg, "normal", stacked)

    def _project(self, x, kernel, bias, axes):
        """x: [B, T, D] -> [B, T, heads, Dh] through a [D, heads, Dh] kernel and [heads, Dh] bias."""
        dt, (d, heads, dh) = self.cfg.dtype, kernel.shape
        kernel_axes = ("embed", axes.removeprefix("act_"))  # act_q_heads -> the kernel's q_heads
        y = linear(x, kernel[...].astype(dt).reshape(d, heads * dh), kernel_axes).reshape(*x.shape[:2], heads, dh)
        return sharding.constrain(y + bias[...].astype(dt), ("batch", "length", axes, "head_dim"))

    def __call__(self, x, cos, sin, mask, cache=None, layer=0, cache_start=None):
        """x: [B, T, D]; cos/sin: f32[B, T, Dh/2]; mask: bool[B, T, S] with S = T, or the cache length; or,
        without a cache, bool[B, T] key validity for the causal attention kernel (models/attention.py).

        cache: KVCache or None; this layer (`layer`) writes its chunk at rows cache_start[b].. and attends over
        the whole cache. Returns ([B, T, D], updated cache or None).
        """
        cfg = self.cfg
        q = apply_rotary(self._project(x, self.q_kernel, self.q_bias, "act_q_heads"), cos, sin)
        k = apply_rotary(self._project(x, self.k_kernel, self.k_bias, "act_kv_heads"), cos, sin)
        v = self._project(x, self.v_kernel, self.v_bias, "act_kv_heads")
        if cache is not None:
            cache = KVCache(k=write_cache_rows(cache.k, k, layer, cache_start),
                            v=write_cache_rows(cache.v, v, layer, cache_start))
            k, v = cache.k[layer].astype(cfg.dtype), cache.v[layer].astype(cfg.dtype)
        if cache is None and mask.ndim == 2:
            out = attention.splash_attention(q, k, v, mask)
        else:
            out = grouped_attention(q, k, v, mask)
        out = out.reshape(*x.shape[:2], cfg.num_heads * cfg.head_dim)
        o_kernel = self.o_kernel[...].astype(cfg.dtype).reshape(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
        return linear(out, o_kernel, ("q_heads", "embed")), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs, stacked: bool = False):
        self.dtype = cfg.dtype
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_kernel = _param(rngs, (d, f), ("embed", "mlp"), cfg, "normal", stacked)
        self.up_kernel = _param(rngs, (d, f), ("embed", "mlp"), cfg, "normal", stacked)
        self.down_kernel = _param(rngs, (f, d), ("mlp", "embed"), cfg, "normal", stacked)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = linear(x, self.gate_kernel[...].astype(self.dtype), ("embed", "mlp"))
        up = linear(x, self.up_kernel[...].astype(self.dtype), ("embed", "mlp"))
        hidden = sharding.constrain(swiglu(gate, up), ("batch", "length", "act_mlp"))
        return linear(hidden, self.down_kernel[...].astype(self.dtype), ("mlp", "embed"))


class Block(nnx.Module):
    """One decoder layer; stacked: every layer's parameters in one Block ([num_layers, ...] each), which
    `Qwen2ForCausalLM` runs with lax.scan, merging one layer's slice into a Block per step."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs, stacked: bool = False):
        self.input_layernorm = RMSNorm(cfg, stacked)
        self.self_attn = Attention(cfg, rngs, stacked)
        self.post_attention_layernorm = RMSNorm(cfg, stacked)
        self.mlp = MLP(cfg, rngs, stacked)

    def __call__(self, x, cos, sin, mask, cache=None, layer=0, cache_start=None):
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, cache_start)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return sharding.constrain(x, ("batch", "length", "act_embed")), cache


def _block_without_cache(block: Block, x, cos, sin, mask):
    return block(x, cos, sin, mask)[0]


class Qwen2ForCausalLM(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg, "normal")
        self.layers = (Block(cfg, rngs, stacked=True) if cfg.scan_layers else
                       nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)]))
        self.norm = RMSNorm(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else _param(
            rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg, "normal")

    def __call__(self, tokens: jax.Array, positions: jax.Array, attention_mask: jax.Array | None = None, *,
                 cache: KVCache | None = None, cache_start: jax.Array | None = None):
        """tokens, positions: int32[B, T].

        Without a cache: attention_mask bool[B, T] (None = all valid) -> logits f32[B, T, V].
        With a cache: cache_start int32[B] -> (logits f32[B, T, V], updated KVCache); see the module docstring.
        """
        if cache is None:
            return self.logits(self.hidden_states(tokens, positions, attention_mask))
        if attention_mask is not None:
            raise ValueError("Qwen2ForCausalLM: the cache path takes no attention_mask; token t of row b attends "
                             "to cache rows <= cache_start[b] + t (right-pad prompts and start at their lengths)")
        hidden, cache = self.hidden_states_with_cache(tokens, positions, cache, cache_start)
        return self.logits(hidden), cache

    def _embed(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.cfg.dtype)
        return sharding.constrain(x, ("batch", "length", "act_embed"))

    def hidden_states(self, tokens: jax.Array, positions: jax.Array,
                      attention_mask: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states [B, T, D] in cfg.dtype (teacher-forced path)."""
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, dtype=bool)
        valid = attention_mask.astype(bool)
        mask = valid if attention.use_kernel(self.cfg.attention, tokens.shape[1]) else causal_padding_mask(valid)
        cos, sin = rotary_angles(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = self._embed(tokens)
        if self.cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def layer(x, params):
                return _block_without_cache(nnx.merge(graphdef, params), x, cos, sin, mask), None

            x, _ = jax.lax.scan(jax.checkpoint(layer) if self.cfg.remat else layer, x, stacked)
            return self.norm(x)
        block_fn = nnx.remat(_block_without_cache) if self.cfg.remat else _block_without_cache
        for block in self.layers:
            x = block_fn(block, x, cos, sin, mask)
        return self.norm(x)

    def hidden_states_with_cache(self, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                                 cache_start: jax.Array) -> tuple[jax.Array, KVCache]:
        """Cache path: final-normed hidden states [B, T, D] and the cache with this chunk written in."""
        if cache_start is None:
            raise ValueError("Qwen2ForCausalLM: cache_start (int32[B]) is required with a cache")
        if cache.k.shape[0] != self.cfg.num_layers or cache.batch != tokens.shape[0]:
            raise ValueError(f"Qwen2ForCausalLM: KVCache of shape {cache.k.shape} does not fit "
                             f"{self.cfg.num_layers} layers and a batch of {tokens.shape[0]}")
        cache_start = jnp.asarray(cache_start, jnp.int32).reshape(tokens.shape[0])
        mask = cache_mask(cache_start, tokens.shape[1], cache.max_len)
        cos, sin = rotary_angles(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = self._embed(tokens)
        if self.cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def layer(carry, params):  # the cache rides in the carry, so each layer's write stays in place
                x, cache, index = carry
                x, cache = nnx.merge(graphdef, params)(x, cos, sin, mask, cache, index, cache_start)
                return (x, cache, index + 1), None

            (x, cache, _), _ = jax.lax.scan(layer, (x, cache, jnp.int32(0)), stacked)
            return self.norm(x), cache
        for layer, block in enumerate(self.layers):
            x, cache = block(x, cos, sin, mask, cache, layer, cache_start)
        return self.norm(x), cache

    def output_embedding(self) -> jax.Array:
        """The [D, V] output projection in cfg.dtype (the transposed input embedding when tied)."""
        if self.lm_head is None:
            return self.embed_tokens[...].astype(self.cfg.dtype).T
        return self.lm_head[...].astype(self.cfg.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, T, D] -> f32[B, T, V], accumulated in fp32 whatever the compute dtype."""
        if self.lm_head is None and hidden.shape[0] * hidden.shape[1] == 1:
            # A single row (batch-1 decode) against the tied [V, D] embedding: XLA:CPU would fuse the transposed
            # embedding into a naive elementwise loop (~40% slower than a GEMV); contracting the embedding's own
            # minor axis keeps it a library matrix-vector product.
            embedding = self.embed_tokens[...].astype(self.cfg.dtype)
            logits = jax.lax.dot_general(embedding, hidden.reshape(1, -1), (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32).reshape(1, 1, -1)
        else:
            logits = jnp.einsum("btd,dv->btv", hidden, self.output_embedding(), preferred_element_type=jnp.float32)
        return sharding.constrain(logits, ("batch", "length", "act_vocab"))
