"""token_log_probs equals a log_softmax of the full logits (values, entropies and gradients), chunk by chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tspo_jax.models import logprobs
from tspo_jax.models.hf_io import load_hf_checkpoint
from tspo_jax.models.logprobs import token_log_probs
from tspo_jax.models.qwen2 import positions_from_mask


@pytest.fixture(scope="module")
def batch_and_model(tiny_qwen_checkpoint):
    _, model = load_hf_checkpoint(tiny_qwen_checkpoint(tied=False, num_kv_heads=2))
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 256, (3, 13)).astype(np.int32)
    mask = np.ones((3, 13), bool)
    mask[1, :4] = False  # left padding
    mask[2, 10:] = False  # right padding
    return model, jnp.asarray(tokens), jnp.asarray(mask)


def _full_logits_reference(model, tokens, mask):
    """log p and entropy from the whole f32[B, T, V] logits, aligned to the predicted token."""
    logits = model(tokens, positions_from_mask(mask), attention_mask=mask)[:, :-1]
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    valid = mask[:, 1:] & mask[:, :-1]
    pad = lambda x: jnp.pad(jnp.where(valid, x, 0.0), ((0, 0), (1, 0)))
    return pad(logp), pad(entropy)


@pytest.mark.parametrize("chunk_size", [4, 64])  # 12 predictions: three chunks, or one
# The CPU lowering of large vocabularies takes the softmax statistics 28 rows at a time; here forced onto the tiny
# vocabulary (chunks of 12 and 36 rows: a partial block only, and a full block plus a partial one).
@pytest.mark.parametrize("row_blocks", [False, True])
def test_log_probs_and_entropy_equal_log_softmax_of_the_full_logits(batch_and_model, chunk_size, row_blocks,
                                                                     monkeypatch, request):
    if row_blocks:
        # The chunk function's trace is cached by shape and reads the threshold when traced: no stale trace either way.
        monkeypatch.setattr(logprobs, "_CPU_STATS_MIN_BYTES", 0)
        jax.clear_caches()
        request.addfinalizer(jax.clear_caches)
    model, tokens, mask = batch_and_model
    logp, entropy = nnx.jit(lambda m, t, p, a: token_log_probs(m, t, p, a, chunk_size=chunk_size))(
        model, tokens, positions_from_mask(mask), mask)
    ref_logp, ref_entropy = _full_logits_reference(model, tokens, mask)
    assert logp.shape == entropy.shape == tokens.shape and logp.dtype == jnp.float32
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
    np.testing.assert_allclose(entropy, ref_entropy, atol=1e-5)
    assert np.all(np.asarray(logp)[:, 0] == 0) and np.all(np.asarray(logp)[~np.asarray(mask)] == 0)
    assert np.asarray(logp)[1, 4] == 0  # the first real token of a left-padded row has no context
    assert np.all(np.asarray(logp)[0, 1:] < 0)


# (log-prob term, entropy term) in the loss; a term that is absent is never differentiated (symbolic zero).
@pytest.mark.parametrize("use_logp,use_entropy", [(True, True), (True, False), (False, True)])
def test_gradients_through_chunked_log_probs_equal_those_through_the_full_logits(batch_and_model, use_logp,
                                                                                 use_entropy):
    model, tokens, mask = batch_and_model
    positions = positions_from_mask(mask)
    weights = jnp.linspace(-1.0, 1.0, tokens.size).reshape(tokens.shape)

    def objective(logp, entropy):
        return (jnp.sum(weights * logp) if use_logp else 0.0) + (0.1 * jnp.sum(entropy) if use_entropy else 0.0)

    def chunked(m):
        return objective(*token_log_probs(m, tokens, positions, mask, chunk_size=5))

    def full(m):
        return objective(*_full_logits_reference(m, tokens, mask))

    grads = nnx.to_flat_state(nnx.jit(nnx.grad(chunked))(model))
    ref = dict(nnx.to_flat_state(nnx.jit(nnx.grad(full))(model)))
    assert len(grads) == len(ref)
    for path, grad in grads:
        np.testing.assert_allclose(grad.get_value(), ref[path].get_value(), atol=2e-5, rtol=1e-4,
                                   err_msg=str(path))
    assert np.abs(ref[("lm_head",)].get_value()).max() > 0


def test_chunk_size_must_be_positive(batch_and_model):
    model, tokens, mask = batch_and_model
    with pytest.raises(ValueError, match="chunk_size"):
        token_log_probs(model, tokens, positions_from_mask(mask), mask, chunk_size=0)
