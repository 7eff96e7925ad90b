"""Scanned layers (ModelSpec.scan_layers): one stacked Block run by lax.scan computes what the per-layer loop
computes, on both paths (teacher-forced with and without remat, gradients included, and the KV cache), and the
stacked parameters go through HF import/export and Orbax checkpoints unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from tspo_jax.checkpoint import RunCheckpoints
from tspo_jax.models.hf_io import export_hf_checkpoint, load_hf_checkpoint
from tspo_jax.models.logprobs import token_log_probs
from tspo_jax.models.qwen2 import KVCache


@pytest.fixture(scope="module")
def checkpoint(tiny_qwen_checkpoint):
    return tiny_qwen_checkpoint(num_layers=3, tied=False)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 500, (2, 24)), jnp.int32)
    mask = jnp.asarray(np.arange(24)[None, :] >= np.array([[0], [5]]))  # the second row left-padded
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    return tokens, positions, mask


def _logits_loss_and_grads(model, batch):
    graphdef, params = nnx.split(model)

    def loss(params):
        logp, entropy = token_log_probs(nnx.merge(graphdef, params), *batch, chunk_size=8)
        return logp.sum() + 0.1 * entropy.sum()

    @jax.jit
    def run(params):
        return nnx.merge(graphdef, params)(*batch), jax.value_and_grad(loss)(params)

    return run(params)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_match_the_layer_loop_forward_and_gradient(checkpoint, batch, remat):
    cfg, loop = load_hf_checkpoint(checkpoint, remat=remat)
    scan_cfg, scanned = load_hf_checkpoint(checkpoint, remat=remat, scan_layers=True)
    assert scanned.layers.mlp.up_kernel.get_value().shape == (3, cfg.hidden_size, cfg.intermediate_size)
    logits_loop, (loss_loop, grads_loop) = _logits_loss_and_grads(loop, batch)
    logits_scan, (loss_scan, grads_scan) = _logits_loss_and_grads(scanned, batch)
    np.testing.assert_allclose(logits_scan, logits_loop, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss_scan, loss_loop, rtol=1e-5)
    flat_loop = dict(nnx.to_flat_state(grads_loop))
    for path, value in nnx.to_flat_state(grads_scan):
        if path[0] != "layers":
            np.testing.assert_allclose(value.get_value(), flat_loop[path].get_value(), rtol=1e-4, atol=1e-6)
            continue
        for layer in range(cfg.num_layers):  # ("layers", "mlp", "up_kernel")[i] == ("layers", i, "mlp", ...)
            expected = flat_loop[("layers", layer, *path[1:])].get_value()
            np.testing.assert_allclose(value.get_value()[layer], expected, rtol=1e-4, atol=1e-6,
                                       err_msg=str(path))


def test_scanned_layers_fill_and_read_the_kv_cache_like_the_loop(checkpoint, batch):
    cfg, loop = load_hf_checkpoint(checkpoint)
    _, scanned = load_hf_checkpoint(checkpoint, scan_layers=True)
    tokens = batch[0]
    start = jnp.array([0, 3], jnp.int32)
    positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    outputs = []
    for model in (loop, scanned):
        graphdef, params = nnx.split(model)

        @jax.jit
        def prefill_then_decode(params):
            model = nnx.merge(graphdef, params)
            cache = KVCache.init(cfg, batch=2, max_len=40)
            logits, cache = model(tokens, positions, cache=cache, cache_start=start)
            next_logits, cache = model(tokens[:, :1], positions[:, -1:] + 1, cache=cache,
                                       cache_start=start + tokens.shape[1])
            return logits, next_logits, cache.k, cache.v

        outputs.append(prefill_then_decode(params))
    for got, want in zip(outputs[1], outputs[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_scanned_params_export_to_the_same_hf_tensors(checkpoint, tmp_path):
    cfg, scanned = load_hf_checkpoint(checkpoint, scan_layers=True)
    export_hf_checkpoint(scanned, cfg, tmp_path / "out")
    original = load_file(str(next(checkpoint.glob("*.safetensors"))))
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(exported) == set(original)
    for name, value in exported.items():
        np.testing.assert_array_equal(value, original[name].astype(value.dtype), err_msg=name)


def test_scanned_params_survive_an_orbax_checkpoint(checkpoint, tmp_path):
    _, scanned = load_hf_checkpoint(checkpoint, scan_layers=True)
    state = {"params": nnx.state(scanned)}
    checkpoints = RunCheckpoints(tmp_path / "ckpt", save_every=1, async_save=False)
    checkpoints.save(1, state, {"step": 1}, force=True)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    restored, _ = checkpoints.restore(1, abstract)
    checkpoints.close()
    for (path, want), (_, got) in zip(nnx.to_flat_state(state["params"]), nnx.to_flat_state(restored["params"])):
        np.testing.assert_array_equal(got.get_value(), want.get_value(), err_msg=str(path))
