"""The Pallas splash-attention kernel (what the update and the log-prob pass use on TPU) against the XLA path,
run here in Pallas interpret mode: forward and gradients, alone, sharded over a mesh, and inside the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tspo_jax import sharding
from tspo_jax.models import attention
from tspo_jax.models.logprobs import token_log_probs
from tspo_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM, causal_padding_mask, grouped_attention

LENGTH = 384  # three 128-blocks: the kernel skips blocks above the diagonal and masks the diagonal ones


def _inputs(batch, heads=4, kv_heads=2, dim=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, LENGTH, heads, dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, LENGTH, kv_heads, dim), jnp.float32)
    v = jax.random.normal(keys[2], (batch, LENGTH, kv_heads, dim), jnp.float32)
    pad = np.array([0, 37, 128, 5][:batch])  # left padding, one row padded across a whole block
    valid = jnp.asarray(np.arange(LENGTH)[None, :] >= pad[:, None])
    return q, k, v, valid


def _both(q, k, v, valid):
    """(kernel, XLA) outputs, each zeroed on padding positions (whose values neither path defines usefully)."""
    keep = valid[:, :, None, None]
    kernel = attention.splash_attention(q, k, v, valid)
    xla = grouped_attention(q, k, v, causal_padding_mask(valid))
    return jnp.where(keep, kernel, 0.0), jnp.where(keep, xla, 0.0)


def test_kernel_forward_and_gradients_match_xla():
    q, k, v, valid = _inputs(batch=2)
    kernel, xla = _both(q, k, v, valid)
    np.testing.assert_allclose(kernel, xla, atol=2e-5, rtol=2e-5)
    weights = jax.random.normal(jax.random.key(1), kernel.shape)

    def loss(path, q, k, v):
        out = path(q, k, v)
        return jnp.sum(jnp.where(valid[:, :, None, None], out, 0.0) * weights)

    grads_kernel = jax.grad(lambda *a: loss(lambda q, k, v: attention.splash_attention(q, k, v, valid), *a),
                            argnums=(0, 1, 2))(q, k, v)
    grads_xla = jax.grad(lambda *a: loss(lambda q, k, v: grouped_attention(q, k, v, causal_padding_mask(valid)), *a),
                         argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip("qkv", grads_kernel, grads_xla):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


def test_kernel_runs_per_shard_under_the_mesh_rules():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)  # rows over data x fsdp, heads over tensor
    q, k, v, valid = _inputs(batch=4)

    @jax.jit
    def run(q, k, v, valid):
        with sharding.activation_rules(mesh):
            return _both(q, k, v, valid)

    kernel, xla = run(q, k, v, valid)
    np.testing.assert_allclose(kernel, xla, atol=2e-5, rtol=2e-5)


def test_model_log_probs_and_gradients_with_the_kernel_match_xla():
    cfg = Qwen2Config.preset("tiny", num_layers=2)
    models = {choice: Qwen2ForCausalLM(cfg.replace(attention=choice), rngs=nnx.Rngs(0)) for choice in ("xla", "pallas")}
    tokens = jax.random.randint(jax.random.key(2), (2, LENGTH), 0, cfg.vocab_size)
    valid = jnp.asarray(np.arange(LENGTH)[None, :] >= np.array([[0], [50]]))
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)

    def loss_and_grads(model):
        graphdef, params = nnx.split(model)

        def loss(params):
            logp, _ = token_log_probs(nnx.merge(graphdef, params), tokens, positions, valid, chunk_size=128)
            return logp.sum(), logp

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, logp_xla), grads_xla = loss_and_grads(models["xla"])
    (_, logp_kernel), grads_kernel = loss_and_grads(models["pallas"])
    np.testing.assert_allclose(logp_kernel, logp_xla, atol=1e-4, rtol=1e-4)
    for (path, got), (_, want) in zip(nnx.to_flat_state(grads_kernel), nnx.to_flat_state(grads_xla)):
        np.testing.assert_allclose(got.get_value(), want.get_value(), atol=1e-4, rtol=1e-3, err_msg=str(path))


def test_the_choice_follows_the_platform_and_the_switch():
    assert not attention.use_kernel("auto", LENGTH)  # compiling for this CPU: the XLA path
    assert attention.use_kernel("pallas", LENGTH) and not attention.use_kernel("xla", LENGTH)
    with pytest.raises(ValueError, match="ModelSpec.attention = 'flash'"):
        attention.use_kernel("flash", LENGTH)
