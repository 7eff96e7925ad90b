"""What an evaluation runs with, as a frozen dataclass gin builds (gin name `evaluate`, registered in
tspo_jax/configurables.py). configs/eval.gin wires its parts to the same configurables a training run binds
(ModelSpec, RetrievalSpec, RolloutSpec → AgentConfig, ScoringConfig, MeshSpec), so a run directory's operative
config, parsed after it, sets them to exactly what the run trained with.
"""

from __future__ import annotations

import dataclasses

from tspo_jax.rewards import ScoringConfig
from tspo_jax.training.experiment import MeshSpec, ModelSpec, RetrievalSpec, RolloutSpec


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """model: dtypes (and, for a run directory, where its initial weights and tokenizer came from).
    retrieval: the service (top_k, deadlines; `--retrieval` / `--index` replace its addresses / index_dir).
    rollout: the agent's limits and texts and the prompt template (decoding is always greedy).
    scoring: the answer metric's options (EM is always reported). mesh: the devices the policy runs on.
    slots: concurrent decode slots (rounded up to a multiple of the mesh's batch shards); more slots, more
      examples decoded at once, more KV-cache memory.
    """

    model: ModelSpec = ModelSpec()
    retrieval: RetrievalSpec = RetrievalSpec()
    rollout: RolloutSpec = RolloutSpec()
    scoring: ScoringConfig = ScoringConfig()
    mesh: MeshSpec = MeshSpec()
    slots: int = 64

    def __post_init__(self):
        if not isinstance(self.slots, int) or isinstance(self.slots, bool) or self.slots < 1:
            raise ValueError(f"evaluate.slots must be a positive int, got {self.slots!r}")
