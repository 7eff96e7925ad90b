"""The whole loop learns: from a small SFT'd policy on an easy 1-hop world (the `searching_policy` fixture: it
searches every question and answers about half of them right), a few TSPO steps on the same questions raise the
train reward.

The test is built to fail when the learning signal is wrong: with the advantages' sign flipped the policy moves
toward the wrong river and the reward falls; if each token took its advantage from another turn (e.g. the answer
turn from the one after it, which does not exist), the answer turn would not learn and the reward would not rise.
"""

import numpy as np
import pytest

from retrieval_service.process import RetrievalServer
from tspo_jax import metrics as names
from tspo_jax.train import Trainer, load_experiment
from tspo_jax.training.gin_config import split_gin_flags
from tests.fixtures.demo_world import searching_run_flags

STEPS = 8


@pytest.fixture(scope="module")
def dense_service(demo_dense_index):
    with RetrievalServer(demo_dense_index) as server:
        yield server.address


def test_a_few_rl_steps_raise_the_train_reward_of_a_half_right_policy(tmp_path, demo_world, dense_service,
                                                                      searching_policy):
    run_dir = tmp_path / "run"
    flags, rest = split_gin_flags(searching_run_flags(
        run_dir, demo_world, dense_service, searching_policy, "--gin_file=configs/algorithms/tspo.gin",
        f"--gin.train.num_steps={STEPS}", "--gin.train.samples_per_prompt=8", "--gin.LossConfig.entropy_coef=0.0",
        "--gin.UpdateSpec.mini_batches=1", "--gin.OptimizerSpec.learning_rate=2e-4"))
    assert rest == []
    Trainer(load_experiment(flags)).run()
    rows = names.read_jsonl(run_dir / "metrics.jsonl")
    reward = [row["reward/mean"] for row in rows if "reward/mean" in row]
    assert len(reward) == STEPS
    first, last = np.mean(reward[:2]), np.mean(reward[-2:])
    assert 0.15 <= first <= 0.85, reward  # mixed groups to learn from
    assert last >= first + 0.2, reward
