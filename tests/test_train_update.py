"""The update side of a step on the real tiny model: scoring -> advantages -> gradient, for GRPO and TSPO;
gradient accumulation; the non-finite guard; the learning-rate schedule; trajectory packing."""

import numpy as np
import pytest
from flax import nnx

from tspo_jax import sharding
from tspo_jax.algorithms import grpo_advantages, tspo_advantages
from tspo_jax.algorithms.loss import LossConfig
from tspo_jax.models.hf_io import load_hf_checkpoint
from tspo_jax.rewards import score_trajectories
from tspo_jax.rollout.trajectory import Trajectory
from tspo_jax.training.advantages import AlgorithmSpec, compute_advantages
from tspo_jax.training.batch import bucketed_length, pack_trajectories
from tspo_jax.training.optimizer import OptimizerSpec, learning_rate_schedule, make_optimizer
from tspo_jax.training.session import NonFiniteGuard, NonFiniteUpdates
from tspo_jax.training.update import PolicyUpdate

GOLD = "Brevonia"
MAX_TURNS = 2  # K: one search turn and the final answer turn


def _trajectory(sample, *, first_observation, answer, rng):
    """prompt (6 tokens) | turn 1: a search (5) + its observation (4) | turn 2: an answer (5)."""
    tokens = rng.integers(3, 500, size=20).astype(np.int32)
    loss_mask = np.array([0] * 6 + [1] * 5 + [0] * 4 + [1] * 5, np.int32)
    turn_id = np.array([0] * 6 + [1] * 9 + [2] * 5, np.int32)
    logprobs = np.where(loss_mask == 1, -3.0, 0.0).astype(np.float32)
    return Trajectory(
        group_id="demo/train:0", sample_index=sample, golds=[GOLD], tokens=tokens, loss_mask=loss_mask,
        turn_id=turn_id, sampler_logprobs=logprobs,
        turn_texts=["<think> x </think> <search> river country </search>", f"<answer> {answer} </answer>"],
        queries=["river country", None], observations=[first_observation, None], stop_reason="answer",
        num_turns=2, search_failures=0)


def _all_wrong_group_with_near_misses():
    """Four wrong answers; two of them had the gold answer in their search results (FOLR at turn 0)."""
    rng = np.random.default_rng(0)
    hit = f"\n\n<information>Doc 1(Title: Drailnas (river)) The Drailnas is a river in {GOLD}. It is long.</information>\n\n"
    miss = "\n\n<information>Doc 1(Title: Salt) Salt is traded across the Grey Sea.</information>\n\n"
    return [_trajectory(0, first_observation=hit, answer="Caskara", rng=rng),
            _trajectory(1, first_observation=hit, answer="Lunaria", rng=rng),
            _trajectory(2, first_observation=miss, answer="Caskara", rng=rng),
            _trajectory(3, first_observation=miss, answer="Aldmark", rng=rng)]


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    _, model = load_hf_checkpoint(tiny_policy_dir)
    graphdef, params = nnx.split(model)
    return graphdef, params


def _policy_update(policy, *, micro_batch_size=2):
    """The jitted update with the policy-gradient term alone (no KL, no entropy bonus)."""
    import jax

    graphdef, params = policy
    spec = OptimizerSpec(learning_rate=1e-3, weight_decay=0.0)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return PolicyUpdate(graphdef, params, optimizer=make_optimizer(spec, 10), schedule=learning_rate_schedule(spec, 10),
                        loss_config=LossConfig(kl="none"), mesh=mesh, rules=None, micro_batch_size=micro_batch_size)


@pytest.fixture(scope="module")
def update(policy):
    return _policy_update(policy)


def _update_arrays(update, params, trajectories, estimator):
    scores = score_trajectories([t.turn_texts for t in trajectories], [t.observations for t in trajectories],
                                [t.golds for t in trajectories])
    batch = pack_trajectories(trajectories, pad_id=0, min_length=32)
    advantages = compute_advantages(
        AlgorithmSpec(estimator=estimator), outcome=scores.outcome.reshape(1, 4), correct=scores.correct.reshape(1, 4),
        folr_turn=scores.folr_turn.reshape(1, 4), num_turns=np.full((1, 4), 2, np.int32), max_turns=MAX_TURNS,
        turn_id=batch.turn_id, loss_mask=batch.loss_mask.astype(np.int32))
    arrays = batch.replace(advantages=advantages.token).device_arrays()
    arrays["loss_mask"] = arrays["loss_mask"].astype(np.int32)
    arrays["old_logp"] = update.log_probs(params, batch.tokens, batch.positions, batch.attention_mask)
    arrays["ref_logp"] = arrays["old_logp"]  # the reference is the policy before training
    return scores, advantages, arrays


def test_grpo_gives_an_all_wrong_group_zero_gradient_and_tspo_with_near_misses_does_not(policy, update):
    import jax

    trajectories = _all_wrong_group_with_near_misses()
    _, params = policy
    grad_norms = {}
    for name, estimator in (("grpo", grpo_advantages), ("tspo", tspo_advantages)):
        params_copy = jax.tree.map(lambda x: x.copy(), params)
        scores, advantages, arrays = _update_arrays(update, params_copy, trajectories, estimator)
        assert not scores.correct.any() and list(scores.folr_turn) == [0, 0, -1, -1]
        _, _, result = update.update(params_copy, update.init_optimizer(params_copy), arrays)
        assert result.applied
        grad_norms[name] = result.metrics["grad_norm"]
        if name == "grpo":
            assert not advantages.token.any() and advantages.stats["frac_nonzero_advantage"] == 0.0
        else:
            assert advantages.stats["frac_nonzero_advantage"] == 1.0
            # Turns up to the first occurrence go up; trajectories that never saw the answer go down.
            assert advantages.turn[0, 0, 0] > 0 and advantages.turn[0, 1, 0] > 0
            assert (advantages.turn[0, 2:] < 0).all()
    assert grad_norms["grpo"] == 0.0
    assert grad_norms["tspo"] > 1e-4


def test_accumulating_micro_batches_equals_one_big_batch(policy, update):
    import jax

    _, params = policy
    trajectories = _all_wrong_group_with_near_misses()
    results = {}
    for micro, update in ((2, update), (4, _policy_update(policy, micro_batch_size=4))):
        _, _, arrays = _update_arrays(update, params, trajectories, tspo_advantages)
        params_copy = jax.tree.map(lambda x: x.copy(), params)
        new_params, _, result = update.update(params_copy, update.init_optimizer(params_copy), arrays)
        results[micro] = (result.metrics, jax.tree.leaves(new_params))
    for name in ("loss", "policy_loss", "grad_norm", "entropy", "clip_fraction"):
        np.testing.assert_allclose(results[2][0][name], results[4][0][name], rtol=1e-5, atol=1e-7, err_msg=name)
    # Adam's first step moves each parameter by about ±lr = 1e-3 (g / |g|), which amplifies rounding where g ~ 0:
    # agree to a thousandth of a step.
    for a, b in zip(results[2][1], results[4][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_an_on_policy_update_takes_its_own_log_probs_as_old_with_ratio_one_and_the_same_gradient(policy, update):
    """The step's only update needs no separate old-policy pass: the params are those that sampled. Old log-probs
    are the update's own under a stop-gradient (without it the PPO term's gradient would vanish)."""
    import jax

    _, params = policy
    _, _, arrays = _update_arrays(update, params, _all_wrong_group_with_near_misses(), tspo_advantages)
    results = {}
    for on_policy in (False, True):
        given = {name: value for name, value in arrays.items() if not (on_policy and name == "old_logp")}
        params_copy = jax.tree.map(lambda x: x.copy(), params)
        new_params, _, result = update.update(params_copy, update.init_optimizer(params_copy), given,
                                              on_policy=on_policy)
        results[on_policy] = result.metrics, [np.asarray(x) for x in jax.tree.leaves(new_params)]
    (on_policy, on_policy_params), (given_old, given_old_params) = results[True], results[False]
    assert on_policy["ratio_min"] == on_policy["ratio_max"] == 1.0
    assert on_policy["grad_norm"] > 1e-4
    for name in ("loss", "policy_loss", "grad_norm", "ratio_mean", "clip_fraction"):
        np.testing.assert_allclose(on_policy[name], given_old[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(on_policy_params, given_old_params):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # Adam's first step: see the test above
    without_old = {name: value for name, value in arrays.items() if name != "old_logp"}
    with pytest.raises(KeyError, match=r"needs \['old_logp'\].*only with on_policy=True"):
        update.update(params, None, without_old)


def test_a_non_finite_update_changes_nothing_and_reports_it(policy, update):
    import jax

    _, params = policy
    _, _, arrays = _update_arrays(update, params, _all_wrong_group_with_near_misses(), tspo_advantages)
    arrays["advantages"][0, 7] = np.nan  # on a policy token
    params_copy = jax.tree.map(lambda x: x.copy(), params)
    opt_state = update.init_optimizer(params_copy)
    expected = [np.asarray(x) for x in jax.tree.leaves((params_copy, opt_state))]
    new_params, new_opt_state, result = update.update(params_copy, opt_state, arrays)
    assert not result.applied and not np.isfinite(result.metrics["loss"])
    for got, want in zip(jax.tree.leaves((new_params, new_opt_state)), expected):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_too_many_non_finite_updates_in_a_row_stop_the_run():
    guard = NonFiniteGuard(3)
    for applied in (False, False, True, False, False):  # a good update resets the count
        guard.record(applied, {}, "ckpts")
    with pytest.raises(NonFiniteUpdates, match=r"3 non-finite updates in a row .*max_nonfinite_in_a_row=3.*ckpts"):
        guard.record(False, {}, "ckpts")


def test_the_learning_rate_warms_up_linearly_then_decays_to_the_floor():
    spec = OptimizerSpec(learning_rate=1e-3, warmup_steps=4, schedule="cosine", min_learning_rate=1e-4)
    schedule = learning_rate_schedule(spec, total_updates=10)
    rates = [float(schedule(i)) for i in range(10)]
    np.testing.assert_allclose(rates[:4], [2.5e-4, 5e-4, 7.5e-4, 1e-3], rtol=1e-6)
    assert all(a >= b for a, b in zip(rates[3:], rates[4:]))
    np.testing.assert_allclose(rates[-1], 1e-4, rtol=1e-5)
    constant = learning_rate_schedule(OptimizerSpec(learning_rate=1e-6), total_updates=10)
    assert float(constant(0)) == float(constant(9)) == pytest.approx(1e-6)


def test_packing_right_pads_to_a_power_of_two_and_keeps_every_token_aligned():
    rng = np.random.default_rng(1)
    trajectories = [_trajectory(i, first_observation=None, answer="x", rng=rng) for i in range(3)]
    trajectories[1] = Trajectory(**{**trajectories[1].__dict__, "tokens": trajectories[1].tokens[:14],
                                    "loss_mask": trajectories[1].loss_mask[:14], "turn_id": trajectories[1].turn_id[:14],
                                    "sampler_logprobs": trajectories[1].sampler_logprobs[:14]})
    batch = pack_trajectories(trajectories, pad_id=0, min_length=16, max_length=100)
    assert batch.shape == (3, 32)
    for row, t in enumerate(trajectories):
        n = len(t.tokens)
        np.testing.assert_array_equal(batch.tokens[row, :n], t.tokens)
        np.testing.assert_array_equal(batch.loss_mask[row, :n], t.loss_mask)
        np.testing.assert_array_equal(batch.turn_id[row, :n], t.turn_id)
        assert batch.attention_mask[row].sum() == n and not batch.loss_mask[row, n:].any()
    assert bucketed_length(700, minimum=768, maximum=768) == 768
    with pytest.raises(ValueError, match="exceeds the maximum context of 100"):
        bucketed_length(130, minimum=16, maximum=100)
