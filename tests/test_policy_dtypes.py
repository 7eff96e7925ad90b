"""Where the policy's bytes go when it computes in bf16 over fp32 master weights: the frozen reference is held
in bf16 and the engine decodes from a bf16 copy refreshed from the params, and neither changes a number, because
the model casts every weight to the compute dtype where it is used."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tspo_jax import sharding
from tspo_jax.models.logprobs import token_log_probs
from tspo_jax.rollout.engine import Engine
from tspo_jax.rollout.sampling import SamplingConfig
from tspo_jax.training.experiment import ModelSpec
from tspo_jax.models.qwen2 import Qwen2Config
from tspo_jax.training.policy import policy_from_config


@pytest.fixture(scope="module")
def policy(tiny_qwen_checkpoint):
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
    spec = ModelSpec(checkpoint="unused", dtype="bfloat16", param_dtype="float32")
    model_dir = tiny_qwen_checkpoint(vocab_size=512)
    return policy_from_config(spec, Qwen2Config.from_hf(model_dir), mesh, sharding.normalize_rules(None, mesh),
                              model_dir=model_dir)


def _tokens():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, 500, (8, 32)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (8, 32))
    return tokens, positions, jnp.ones((8, 32), bool)


def test_the_reference_is_held_in_bf16_and_scores_like_fp32_copies(policy):
    master, reference = policy.load(), policy.load_reference()
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(reference))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(master))} == {jnp.dtype(jnp.float32)}
    held = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(reference)))
    assert held * 2 == sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(master)))
    for model in (master, reference):
        assert model.cfg.dtype == jnp.bfloat16
    logp_master, _ = jax.jit(lambda *a: token_log_probs(master, *a))(*_tokens())
    logp_reference, _ = jax.jit(lambda *a: token_log_probs(reference, *a))(*_tokens())
    np.testing.assert_array_equal(logp_reference, logp_master)


def test_the_engine_decodes_from_a_bf16_copy_with_the_same_tokens(policy):
    master = policy.load()
    engine = Engine(policy.abstract_model, max_concurrent_decodes=8, max_cache_len=64,
                    sampling=SamplingConfig(temperature=0.0), mesh=policy.mesh, rules=policy.rules)
    params = nnx.state(master)
    copy = engine.load_params(params)
    assert {leaf.dtype for leaf in jax.tree.leaves(copy)} == {jnp.dtype(jnp.bfloat16)}
    for leaf, target in zip(jax.tree.leaves(copy), jax.tree.leaves(engine.abstract_params())):
        assert leaf.sharding.is_equivalent_to(target.sharding, leaf.ndim) and leaf.dtype == target.dtype
    # The same decode from the fp32 arrays themselves (the engine's functions take either dtype).
    results = []
    for weights in (copy, params):
        state = engine.init_decode_state()
        prompts = [np.arange(3, 3 + n) for n in (5, 9, 12, 7, 3, 16, 4, 8)]
        state, first = engine.append(weights, state, list(range(8)), prompts, fresh=[True] * 8,
                                     budgets=[10] * 8, seeds=list(range(8)))
        state, out = engine.generate(weights, state, num_steps=10)
        results.append(np.concatenate([np.asarray(first.tokens), np.asarray(out.tokens)]))
    np.testing.assert_array_equal(results[0], results[1])
    # A bf16 policy needs no copy: the engine takes its arrays as they are.
    assert all(a is b for a, b in zip(jax.tree.leaves(engine.load_params(copy)), jax.tree.leaves(copy)))
