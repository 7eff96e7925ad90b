"""The agent loop on the real engine: a tiny HF checkpoint, the tiny tokenizer, a real BM25 retrieval server."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retrieval_service.client import RetrievalClient
from tspo_jax.models.hf_io import load_hf_checkpoint
from tspo_jax.models.logprobs import token_log_probs
from tspo_jax.rollout import prompts as texts
from tspo_jax.rollout.agent import AgentConfig, RolloutPrompt, SearchAgent, client_retriever
from tspo_jax.rollout.engine import Engine
from tspo_jax.rollout.sampling import SamplingConfig
from tspo_jax.rollout.stops import STOP_STRINGS, compile_stop_table
from tspo_jax.rollout.tokenizer import encode_chat, load_tokenizer, stop_token_ids, token_bytes

VOCAB = 512
CONFIG = AgentConfig(max_turns=2, max_turn_tokens=12, max_obs_tokens=200, max_context_tokens=640,
                     decode_steps_per_call=8)


@contextlib.contextmanager
def backend_compilations():
    """Collects the XLA compilations that happen inside the block (JAX reports each through jax.monitoring)."""
    compiled = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def rollout(tiny_qwen_checkpoint, tiny_tokenizer_dir, bm25_retrieval_server):
    _, model = load_hf_checkpoint(tiny_qwen_checkpoint(vocab_size=VOCAB))
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    engine = Engine(model, max_concurrent_decodes=2, max_cache_len=CONFIG.max_context_tokens,
                    stop_table=compile_stop_table(STOP_STRINGS, token_bytes(tokenizer, VOCAB)),
                    eos_ids=stop_token_ids(tokenizer), sampling=SamplingConfig(temperature=1.0))
    params = engine.load_params(nnx.state(model))
    questions = ["What is the capital of France?", "Who wrote Hamlet?"]
    prompts = [RolloutPrompt(group_id=f"q{i}", prompt_tokens=encode_chat(tokenizer, texts.build_prompt_messages(q)),
                             golds=["x"]) for i, q in enumerate(questions)]
    with RetrievalClient(bm25_retrieval_server.address) as client:
        agent = SearchAgent(engine, tokenizer, client_retriever(client, top_k=2), CONFIG)
        first = agent.rollout(params, prompts, num_samples=2, seed=3)
        with backend_compilations() as compiled:
            again = agent.rollout(params, prompts, num_samples=2, seed=3)
    return model, prompts, first, again, compiled


def test_sampler_logprobs_of_multi_turn_trajectories_equal_teacher_forced_logprobs(rollout):
    model, prompts, (trajectories, metrics), _, _ = rollout
    assert metrics.trajectories == 4 and metrics.tokens_generated == sum(int(t.loss_mask.sum()) for t in trajectories)
    assert all(t.num_turns >= 2 for t in trajectories)  # every one went through at least one append
    width = max(len(t.tokens) for t in trajectories)
    batch = np.zeros((len(trajectories), width), np.int32)
    mask = np.zeros((len(trajectories), width), bool)
    for row, trajectory in enumerate(trajectories):
        batch[row, : len(trajectory.tokens)] = trajectory.tokens
        mask[row, : len(trajectory.tokens)] = True
    positions = jnp.broadcast_to(jnp.arange(width), batch.shape)
    teacher = np.asarray(nnx.jit(token_log_probs)(model, jnp.asarray(batch), positions, jnp.asarray(mask))[0])
    for row, trajectory in enumerate(trajectories):
        generated = trajectory.loss_mask == 1
        np.testing.assert_allclose(trajectory.sampler_logprobs[generated], teacher[row, : len(generated)][generated],
                                   atol=1e-4, rtol=0)


def test_trajectories_carry_prompt_turns_and_observations_in_order(rollout):
    _, prompts, (trajectories, metrics), _, _ = rollout
    assert [(t.group_id, t.sample_index) for t in trajectories] == [("q0", 0), ("q0", 1), ("q1", 0), ("q1", 1)]
    for trajectory in trajectories:
        prompt = prompts[int(trajectory.group_id[1:])].prompt_tokens
        assert trajectory.tokens[: len(prompt)].tolist() == prompt.tolist()
        assert 1 <= trajectory.num_turns <= CONFIG.max_turns + 1
        assert len(trajectory.tokens) <= CONFIG.max_context_tokens
        for k in range(trajectory.num_turns):
            turn = trajectory.turn_id == k + 1
            assert trajectory.loss_mask[turn].sum() <= CONFIG.max_turn_tokens
            if trajectory.observations[k] is not None:
                assert (trajectory.loss_mask[turn] == 0).sum() > 0
    assert metrics.as_dict()["rollout/turns_per_trajectory"] == np.mean([t.num_turns for t in trajectories])


def test_rollouts_repeat_exactly_with_the_same_seed(rollout):
    _, _, (first, _), (again, _), _ = rollout
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.sampler_logprobs, b.sampler_logprobs)
    assert any(not np.array_equal(first[0].tokens, t.tokens) for t in first[1:])  # samples do differ


def test_a_second_rollout_of_the_same_shapes_compiles_nothing(rollout):
    *_, compiled = rollout
    # Every program the engine runs (the empty decode state included) is compiled once per engine and reused.
    assert compiled == []
