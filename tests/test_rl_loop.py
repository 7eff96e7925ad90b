"""The RL loop's invariants on real trainer steps: the searching policy (a warmed-up demo-preset model that
searches and sometimes answers right), the demo world, a real dense retrieval server on loopback. Each step is
watched from outside, by wrapping the session's own calls (rollout, train_on, the jitted update and log-prob
passes) to keep what they were given:

- the old policy is fixed for a step: every mini-batch of every epoch trains on the same old log-probs, which are
  the sampler's; the step's first update has ratio exactly 1 and later ones do not (so they are not recomputed);
- the reference stays the initial model (transformers' PyTorch Qwen2 on the checkpoint gives its log-probs) while
  the policy moves away from it, and the KL to it grows from 0;
- GRPO and GTPO (query-similarity shaping through a dense service's own Embed) train on the advantages a NumPy
  reference computes from the step's own scored trajectories;
- one update per step runs no old-policy pass (only the reference's) and has ratio exactly 1;
- a hung retrieval service (SIGSTOP past the client deadline) turns the step's searches into "search failed"
  observations counted in rollout/failed_searches (GTPO's shaping, which cannot embed, into rollout/failed_embeds),
  the step finishes, and after SIGCONT the next step searches and embeds again.
"""

import collections
import os
import signal

import numpy as np
import pytest

from retrieval_service.client import RetrievalClient
from retrieval_service.process import RetrievalServer
from tspo_jax import metrics as names
from tspo_jax.rewards import query_similarity_shaping, score_trajectories
from tspo_jax.rollout import prompts as texts
from tspo_jax.train import Trainer, load_experiment
from tspo_jax.training.gin_config import split_gin_flags
from tests.fixtures.demo_world import SEARCHING_QUESTIONS, searching_run_flags
from tests.test_advantages import reference_grpo, reference_gtpo

SAMPLES = 4  # tiny_run_flags' samples per prompt
MAX_TURNS = 3  # searching_run_flags: two turns, then the final one


class StepRecorder:
    """Keeps what the trainer's own calls were given in each step (wrapping the session's methods)."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.steps = trainer, []
        session = trainer.session
        rollout, train_on, update, log_probs = (session.agent.rollout, session.train_on, session.update.update,
                                                session.update.log_probs)

        def recorded_rollout(*args, **kwargs):
            trajectories, metrics = rollout(*args, **kwargs)
            self.current["trajectories"] = trajectories
            return trajectories, metrics

        def recorded_train_on(batch, old_logp, ref_logp, order_seed):
            self.current.update(batch=batch, old_logp=old_logp, ref_logp=ref_logp)
            return train_on(batch, old_logp, ref_logp, order_seed)

        def recorded_update(params, opt_state, arrays, **options):
            params, opt_state, result = update(params, opt_state, arrays, **options)
            self.current["updates"].append({"arrays": arrays, "metrics": result.metrics, **options})
            return params, opt_state, result

        def recorded_log_probs(params, *arrays):
            self.current["passes"].append("reference" if params is session.reference_params else "policy")
            return log_probs(params, *arrays)

        session.agent.rollout, session.train_on = recorded_rollout, recorded_train_on
        session.update.update, session.update.log_probs = recorded_update, recorded_log_probs

    def step(self) -> dict:
        self.current = {"updates": [], "passes": []}
        self.current["metrics"] = self.trainer.step(len(self.steps) + 1)
        self.steps.append(self.current)
        return self.current


def _trainer(args) -> Trainer:
    flags, rest = split_gin_flags(args)
    assert rest == []
    return Trainer(load_experiment(flags))


def _row_keys(tokens: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in tokens]


def _expected_token_advantages(turn_advantages: np.ndarray, batch) -> np.ndarray:
    """[G, N, K] turn advantages -> [B, T] on the packed batch: turn k's on its generated tokens (turn_id k + 1)."""
    rows = turn_advantages.shape[0] * turn_advantages.shape[1]
    expected = np.zeros(batch.shape)
    flat = turn_advantages.reshape(rows, -1)
    for row in range(rows):
        generated = batch.loss_mask[row] == 1
        expected[row, generated] = flat[row, batch.turn_id[row, generated] - 1]
    return expected


def _scores(trainer, trajectories):
    return score_trajectories([t.turn_texts for t in trajectories], [t.observations for t in trajectories],
                              [t.golds for t in trajectories], config=trainer.exp.scoring)


@pytest.fixture(scope="module")
def dense_service(demo_dense_index):
    """A service on the index the searching policy was warmed up with (this module's own: a test stops it)."""
    with RetrievalServer(demo_dense_index) as server:
        yield server


# --- several updates per step: GRPO, 2 mini-batches x 2 epochs ------------------------------------------------------

@pytest.fixture(scope="module")
def grpo_steps(tmp_path_factory, demo_world, dense_service, searching_policy):
    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    trainer = _trainer(searching_run_flags(run_dir, demo_world, dense_service.address, searching_policy,
                                           "--gin_file=configs/algorithms/grpo.gin", "--gin.UpdateSpec.epochs=2",
                                           "--gin.OptimizerSpec.learning_rate=1e-5", "--gin.train.num_steps=3"))
    recorder = StepRecorder(trainer)
    try:
        for _ in range(3):
            recorder.step()
    finally:
        trainer.session.close()
    return trainer, recorder.steps


def test_every_mini_batch_and_epoch_of_a_step_trains_on_the_sampler_s_fixed_old_log_probs(grpo_steps):
    _, steps = grpo_steps
    for number, step in enumerate(steps, start=1):
        batch, old_logp = step["batch"], step["old_logp"]
        assert step["passes"] == ["policy", "reference"]  # one old-policy pass per step, before any update
        generated = batch.loss_mask == 1
        # The old policy is the one that sampled: its log-probs are the sampler's own (computed independently,
        # token by token with the engine's KV cache).
        np.testing.assert_allclose(old_logp[generated], batch.sampler_logprobs[generated], atol=1e-4, rtol=0)
        rows = collections.defaultdict(list)
        for index, key in enumerate(_row_keys(batch.tokens)):
            rows[key].append(index)
        updates = step["updates"]
        assert len(updates) == 4 and not any(u.get("on_policy") for u in updates)
        for epoch in (updates[:2], updates[2:]):
            # Each epoch trains on every trajectory exactly once ...
            seen = collections.Counter(key for u in epoch for key in _row_keys(u["arrays"]["tokens"]))
            assert seen == collections.Counter(_row_keys(batch.tokens)), f"step {number}"
        for u in updates:
            # ... always with the old log-probs of the step's start, bit for bit.
            for key, part_old in zip(_row_keys(u["arrays"]["tokens"]), u["arrays"]["old_logp"]):
                assert any(np.array_equal(part_old, old_logp[i]) for i in rows[key]), f"step {number}"
        ratios = [(u["metrics"]["ratio_min"], u["metrics"]["ratio_max"]) for u in updates]
        assert ratios[0] == (1.0, 1.0), f"step {number}: the first update runs on the params that sampled"
        assert all(r != (1.0, 1.0) for r in ratios[1:]), f"step {number}: later updates see a policy that moved"


def _torch_log_probs(model_dir, tokens: np.ndarray) -> np.ndarray:
    """log p(token_t | tokens_<t) under the checkpoint, by transformers' PyTorch Qwen2 (fp32); position 0 -> 0."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens.astype(np.int64))).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, torch.from_numpy(tokens[:, 1:, None].astype(np.int64)))
    return np.concatenate([np.zeros((tokens.shape[0], 1)), logp[..., 0].numpy()], axis=1)


def test_the_reference_stays_the_initial_model_while_the_policy_moves_away(grpo_steps, searching_policy):
    _, steps = grpo_steps
    for number, step in enumerate(steps, start=1):
        batch = step["batch"]
        generated = batch.loss_mask == 1
        initial = _torch_log_probs(searching_policy["model"], batch.tokens)
        np.testing.assert_allclose(step["ref_logp"][generated], initial[generated], atol=1e-4, rtol=0,
                                   err_msg=f"step {number}")
        drift = np.abs(step["old_logp"][generated] - initial[generated]).max()
        if number == 1:
            assert drift < 1e-4  # the policy starts as the reference ...
        else:
            assert drift > 1e-2, drift  # ... and leaves it: a reference that followed it would too
    kls = [u["metrics"]["kl"] for step in steps for u in step["updates"]]
    assert kls[0] < 1e-7  # the first update: policy == reference
    assert all(kl > 0 for kl in kls[1:]), kls  # every later update: the policy has left the reference


def test_grpo_trains_on_the_estimator_applied_to_the_step_s_own_scores(grpo_steps):
    trainer, steps = grpo_steps
    for number, step in enumerate(steps, start=1):
        trajectories, batch = step["trajectories"], step["batch"]
        outcome = _scores(trainer, trajectories).outcome.reshape(SEARCHING_QUESTIONS, SAMPLES)
        trajectory = reference_grpo(outcome, np.ones(outcome.shape, bool))
        turn = np.repeat(trajectory[..., None], MAX_TURNS, axis=-1)  # every turn of a trajectory
        np.testing.assert_allclose(batch.advantages, _expected_token_advantages(turn, batch), atol=1e-5, rtol=0,
                                   err_msg=f"step {number}")
    assert any(step["batch"].advantages.any() for step in steps), ("no step had a group with mixed rewards",
                                                                    [step["metrics"][names.EM] for step in steps])


# --- one update per step: GTPO with shaping against a dense service; the hung service -------------------------------

@pytest.fixture(scope="module")
def gtpo_trainer(tmp_path_factory, demo_world, dense_service, searching_policy):
    run_dir = tmp_path_factory.mktemp("gtpo") / "run"
    trainer = _trainer(searching_run_flags(run_dir, demo_world, dense_service.address, searching_policy,
                                           "--gin_file=configs/algorithms/gtpo.gin",
                                           "--gin.AlgorithmSpec.gtpo_shaping_beta=0.5",
                                           "--gin.UpdateSpec.mini_batches=1", "--gin.RetrievalSpec.deadline_s=1.0",
                                           "--gin.OptimizerSpec.learning_rate=1e-5", "--gin.train.num_steps=10"))
    recorder = StepRecorder(trainer)
    yield trainer, recorder
    trainer.session.close()


def _gtpo_expected(trainer, trajectories, client):
    """GTPO's turn advantages from the step's trajectories: scores, then the shaping from the service's own
    embeddings of every trajectory's queries, then the NumPy reference estimator."""
    scores = _scores(trainer, trajectories)
    queries = [[q for q in t.queries if q] for t in trajectories]
    vectors = client.embed([q for qs in queries for q in qs])
    embeddings, start = [], 0
    for qs in queries:
        embeddings.append(vectors[start:start + len(qs)])
        start += len(qs)
    correct = scores.correct.reshape(SEARCHING_QUESTIONS, SAMPLES)
    shaping = query_similarity_shaping(embeddings, correct, beta=0.5)
    num_turns = np.array([t.num_turns for t in trajectories]).reshape(correct.shape)
    outcome = scores.outcome.reshape(correct.shape)
    return shaping, reference_gtpo(outcome, num_turns, shaping, np.ones(correct.shape, bool), max_turns=MAX_TURNS)


def test_gtpo_with_shaping_trains_on_the_estimator_applied_to_the_step_s_scores_and_embeddings(gtpo_trainer,
                                                                                            dense_service):
    trainer, recorder = gtpo_trainer
    with RetrievalClient(dense_service.address) as client:
        for _ in range(4):  # until a group has right and wrong answers, so the shaping is not all 0
            step = recorder.step()
            shaping, expected = _gtpo_expected(trainer, step["trajectories"], client)
            np.testing.assert_allclose(step["batch"].advantages, _expected_token_advantages(expected, step["batch"]),
                                       atol=1e-5, rtol=0)
            if shaping.any():
                break
    assert shaping.any(), ("no step had a group with right and wrong answers",
                           [step["metrics"][names.EM] for step in recorder.steps])


def test_one_update_per_step_runs_no_old_policy_pass_and_has_ratio_exactly_one(gtpo_trainer):
    trainer, recorder = gtpo_trainer
    step = recorder.step()
    assert step["passes"] == ["reference"] and step["old_logp"] is None
    [update] = step["updates"]
    assert update["on_policy"] and "old_logp" not in update["arrays"]
    assert update["metrics"]["ratio_min"] == update["metrics"]["ratio_max"] == 1.0
    assert step["metrics"]["loss/ratio_min"] == step["metrics"]["loss/ratio_max"] == 1.0
    assert update["metrics"]["grad_norm"] > 0


def test_a_hung_retrieval_service_fails_the_searches_not_the_step_and_the_next_step_searches(gtpo_trainer,
                                                                                          dense_service):
    _, recorder = gtpo_trainer
    os.kill(dense_service.pid, signal.SIGSTOP)  # hung, not dead: calls hang until the client's 1 s deadline
    try:
        hung = recorder.step()
    finally:
        os.kill(dense_service.pid, signal.SIGCONT)
    metrics = hung["metrics"]
    searches = metrics[names.SEARCHES] * metrics["rollout/trajectories"]
    assert searches > 0 and metrics[names.SEARCH_FAILURES] == searches
    for trajectory in hung["trajectories"]:
        for query, observation in zip(trajectory.queries, trajectory.observations):
            if query is not None:
                assert observation.startswith(texts.SEARCH_FAILED_TEXT)
    # GTPO's shaping could not embed the queries either: that step trains without it, counted, and goes on.
    assert metrics[names.EMBED_FAILURES] > 0 and len(hung["updates"]) == 1

    after = recorder.step()
    assert after["metrics"][names.SEARCHES] > 0 and after["metrics"][names.SEARCH_FAILURES] == 0
    assert after["metrics"][names.EMBED_FAILURES] == 0
    for trajectory in after["trajectories"]:
        for query, observation in zip(trajectory.queries, trajectory.observations):
            if query is not None:
                assert observation.startswith('\n\n<information>Doc 1(Title: "')
