"""The one place that tells gin what a config file may bind. Library modules stay gin-free; importing this
module registers their constructors and functions under short names (and `tspo_jax.`-qualified ones).

    train.num_steps = 200                         # tspo_jax.training.experiment.Experiment (gin name `train`)
    train.algorithm = @AlgorithmSpec()
    AlgorithmSpec.estimator = @tspo_advantages    # a function reference; its options are bound on it:
    tspo_advantages.alpha = 0.5
    LossConfig.kl_coef = 0.001
    AgentConfig.max_turns = 4
"""

from __future__ import annotations

import gin

from tspo_jax.algorithms import advantages, loss
from tspo_jax.data import demo, demonstrations
from tspo_jax import rewards
from tspo_jax.evaluation import spec as evaluation
from tspo_jax.rollout import agent, sampling
from tspo_jax.training import advantages as training_advantages
from tspo_jax.training import experiment, optimizer

_MODULE = "tspo_jax"


def _register(target, name: str | None = None):
    return gin.external_configurable(target, name=name, module=_MODULE)


# The run and its parts (trainer-side dataclasses).
train = _register(experiment.Experiment, "train")
sft = _register(experiment.SFTExperiment, "sft")
ModelSpec = _register(experiment.ModelSpec)
DataSpec = _register(experiment.DataSpec)
RetrievalSpec = _register(experiment.RetrievalSpec)
RolloutSpec = _register(experiment.RolloutSpec)
UpdateSpec = _register(experiment.UpdateSpec)
MeshSpec = _register(experiment.MeshSpec)
CheckpointSpec = _register(experiment.CheckpointSpec)
OptimizerSpec = _register(optimizer.OptimizerSpec)
AlgorithmSpec = _register(training_advantages.AlgorithmSpec)

# The demo world and its demonstrations (DataSpec.demo, sft.demo_demonstrations).
WorldConfig = _register(demo.WorldConfig)
DemonstrationConfig = _register(demonstrations.DemonstrationConfig)
MistakeRates = _register(demonstrations.MistakeRates)

# An evaluation (`python -m tspo_jax.evaluate`; configs/eval.gin).
evaluate = _register(evaluation.EvalSpec, "evaluate")

# Library configuration, bound where it is defined.
AgentConfig = _register(agent.AgentConfig)
SamplingConfig = _register(sampling.SamplingConfig)
ScoringConfig = _register(rewards.ScoringConfig)
LossConfig = _register(loss.LossConfig)

# Advantage estimators: referenced without a call (`@tspo_advantages`), options bound on them.
tspo_advantages = _register(advantages.tspo_advantages)
grpo_advantages = _register(advantages.grpo_advantages)
gtpo_advantages = _register(advantages.gtpo_advantages)
