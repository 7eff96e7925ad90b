"""Per-token log-probabilities and entropies of a sequence under the model (device-side, differentiable).

Used by the trainer for the policy (with gradients), the old policy and the reference model. The vocabulary
projection is done one chunk of positions at a time and rematerialised in the backward pass, so at most a
f32[B * chunk_size, V] block of logits exists at once (V = 151,936 on Qwen2.5), not the full f32[B, T, V].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from tspo_jax import sharding
from tspo_jax.models.qwen2 import Qwen2ForCausalLM


# Rows per block of the CPU softmax statistics: XLA:CPU materialises e^(z - m) before summing it, so over a whole
# [N, V] chunk that is a fresh 1.2 GB scratch every step; 28 rows keep it ~17 MB (a 4x512 fwd+bwd of the 0.5B shape:
# 11.15 -> 10.09 s). Below _CPU_STATS_MIN_BYTES of logits the loop costs more than the scratch (a [24576, 512] chunk:
# 21 ms fused, 54 ms in row blocks), so small vocabularies keep the one fused reduction.
_CPU_STATS_ROWS = 28
_CPU_STATS_MIN_BYTES = 256 * 2**20


def _softmax_stats(logits, targets):
    """logits: f32[N, V], targets: int32[N] -> (log_norm, mean_logit, target_logits), each f32[N].

    log_norm = logsumexp(z); mean_logit = sum_v p_v z_v; one exp per logit gives both sums.
    """
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnormalised = jnp.exp(logits - top)
    partition = jnp.sum(unnormalised, axis=-1)
    log_norm = top[..., 0] + jnp.log(partition)
    mean_logit = jnp.sum(unnormalised * logits, axis=-1) / partition
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_norm, mean_logit, target_logits


def _softmax_stats_by_row_blocks(logits, targets):
    """_softmax_stats a few rows at a time (the same sums, up to float rounding order): the CPU lowering."""
    def one_row(row):  # lax.map vmaps this over _CPU_STATS_ROWS rows at a time
        logits_row, target = row
        return tuple(stat[0] for stat in _softmax_stats(logits_row[None], target[None]))

    return jax.lax.map(one_row, (logits, targets), batch_size=_CPU_STATS_ROWS)


def _log_probs_and_residuals(hidden, targets, output_embedding):
    logits = jnp.einsum("nd,dv->nv", hidden, output_embedding, preferred_element_type=jnp.float32)
    if logits.size * logits.dtype.itemsize < _CPU_STATS_MIN_BYTES:
        log_norm, mean_logit, target_logits = _softmax_stats(logits, targets)
    else:
        log_norm, mean_logit, target_logits = jax.lax.platform_dependent(
            logits, targets, cpu=_softmax_stats_by_row_blocks, default=_softmax_stats)
    return (target_logits - log_norm, log_norm - mean_logit), (logits, log_norm, mean_logit)


@jax.custom_vjp
def _chunk_log_probs(hidden: jax.Array, targets: jax.Array, output_embedding: jax.Array):
    """hidden: [N, D] (a chunk's positions of every row, flattened) predicting targets: int32[N] through
    output_embedding: [D, V].

    Returns (log p(target), entropy), each f32[N], from the fp32 logits z:
      log p(y) = z_y - logsumexp(z),   entropy = logsumexp(z) - sum_v p_v z_v.
    """
    return _log_probs_and_residuals(hidden, targets, output_embedding)[0]


def _chunk_log_probs_fwd(hidden, targets, output_embedding):
    hidden, targets, output_embedding = hidden.value, targets.value, output_embedding.value  # CustomVJPPrimal
    outputs, (logits, log_norm, mean_logit) = _log_probs_and_residuals(hidden, targets, output_embedding)
    return outputs, (hidden, targets, output_embedding, logits, log_norm, mean_logit)


def _chunk_log_probs_bwd(residuals, cotangents):
    """The gradient w.r.t. the logits in one elementwise pass, then the two matmuls back through the projection.

    d log p(y) / dz_v = [v = y] - p_v,   d entropy / dz_v = -p_v (z_v - sum_u p_u z_u).
    Written by hand so there is no [N, V] scatter (the transpose of take_along_axis), and the entropy term is
    skipped entirely when nothing differentiates the entropy (symbolic-zero cotangent, the usual training case).
    The logits are rank 2 throughout so XLA writes d_logits over the dead logits in place: one fewer
    [N, V] temporary (1.2 GB at N = 2044 on Qwen2.5's vocabulary), which cut the vocabulary fwd+bwd on CPU
    from 8.6 to 6.8 s, most of it the kernel zeroing fresh pages.
    """
    hidden, targets, output_embedding, logits, log_norm, mean_logit = residuals
    d_logp, d_entropy = cotangents
    probs = jnp.exp(logits - log_norm[..., None])
    d_logits = jnp.zeros_like(logits)
    if not isinstance(d_logp, SymbolicZero):
        is_target = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
        d_logits = d_logp[..., None] * (is_target - probs)
    if not isinstance(d_entropy, SymbolicZero):
        d_logits = d_logits - d_entropy[..., None] * probs * (logits - mean_logit[..., None])
    d_logits = d_logits.astype(hidden.dtype)
    f32 = jnp.float32  # accumulate over the vocabulary / the chunk's tokens in fp32 whatever the compute dtype
    d_hidden = jnp.einsum("nv,dv->nd", d_logits, output_embedding, preferred_element_type=f32)
    # Each device's rows give a partial sum; on the embedding's shards XLA reduce-scatters it (models/qwen2.linear).
    d_embedding = sharding.constrain(jnp.einsum("nd,nv->dv", hidden, d_logits, preferred_element_type=f32),
                                     ("embed", "vocab"))
    return d_hidden.astype(hidden.dtype), None, d_embedding.astype(output_embedding.dtype)


_chunk_log_probs.defvjp(_chunk_log_probs_fwd, _chunk_log_probs_bwd, symbolic_zeros=True)


def token_log_probs(model: Qwen2ForCausalLM, tokens: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                    *, chunk_size: int = 512) -> tuple[jax.Array, jax.Array]:
    """logp, entropy: f32[B, T], aligned to the token itself.

    logp[b, t] = log p(tokens[b, t] | tokens[b, :t]) and entropy[b, t] is the entropy of that predictive
    distribution. Both are 0 where there is no prediction: at t = 0, and wherever tokens[b, t] or tokens[b, t-1]
    is padding (attention_mask False), which includes the first real token of a left-padded row.

    tokens, positions: int32[B, T]; attention_mask: bool[B, T]; chunk_size: positions per vocabulary block.
    """
    if chunk_size < 1:
        raise ValueError(f"token_log_probs: chunk_size must be >= 1, got {chunk_size}")
    attention_mask = attention_mask.astype(bool)
    hidden = model.hidden_states(tokens, positions, attention_mask)[:, :-1]  # predicts tokens[:, 1:]
    targets = tokens[:, 1:]
    batch, steps, dim = hidden.shape
    chunk = min(chunk_size, steps)
    num_chunks = -(-steps // chunk)
    pad = num_chunks * chunk - steps
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [num_chunks, B * chunk, ...]: lax.map runs the chunks one after another.
    hidden = hidden.reshape(batch, num_chunks, chunk, dim).swapaxes(0, 1).reshape(num_chunks, batch * chunk, dim)
    targets = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1).reshape(num_chunks, batch * chunk)

    output_embedding = model.output_embedding()
    if num_chunks == 1:  # nothing to save by recomputing: the one block of logits is alive either way
        logp, entropy = _chunk_log_probs(hidden[0], targets[0], output_embedding)
        logp, entropy = logp[None], entropy[None]
    else:
        per_chunk = jax.checkpoint(_chunk_log_probs)
        logp, entropy = jax.lax.map(lambda xs: per_chunk(xs[0], xs[1], output_embedding), (hidden, targets))

    def align(values):  # [num_chunks, B * chunk] -> [B, T], 0 where nothing is predicted
        values = values.reshape(num_chunks, batch, chunk).swapaxes(0, 1).reshape(batch, num_chunks * chunk)
        values = values[:, :steps]
        values = jnp.pad(values, ((0, 0), (1, 0)))
        valid = attention_mask & jnp.pad(attention_mask[:, :-1], ((0, 0), (1, 0)))
        return jnp.where(valid, values, 0.0)

    return align(logp), align(entropy)
