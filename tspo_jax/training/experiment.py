"""What a training run is, as plain frozen dataclasses that gin builds (tspo_jax/configurables.py registers them).

Constructing an `Experiment` does no work: it only checks values, so the CLI builds it right after parsing the
gin files and every bad value is reported before a model, a service or a data file is touched. Each check's
message names the binding (`DataSpec.train_files`, `train.prompts_per_step`, …).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from tspo_jax import run_files
from tspo_jax.algorithms.loss import LossConfig
from tspo_jax.data.demo import WorldConfig
from tspo_jax.data.demonstrations import DemonstrationConfig
from tspo_jax.models.qwen2 import PRESETS
from tspo_jax.rewards import ScoringConfig
from tspo_jax.rollout.agent import AgentConfig
from tspo_jax.rollout.prompts import PROMPT_TEMPLATE
from tspo_jax.rollout.sampling import SamplingConfig
from tspo_jax.training.advantages import AlgorithmSpec
from tspo_jax.training.optimizer import OptimizerSpec


def _positive(owner: str, **values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The policy (and, frozen, the reference model).

    checkpoint: a Hugging Face Qwen2/Qwen2.5 directory (config.json + *.safetensors). None: the run makes a tiny
      random one (`tiny_preset`, our own init, exported with our HF exporter) with the demo world's tokenizer
      (training.bootstrap.demo_tokenizer) in `<run_dir>/tiny_model`.
    tokenizer: a Hugging Face tokenizer directory; None: the checkpoint directory.
    dtype / param_dtype: compute and storage dtypes ("bfloat16" compute on TPU, fp32 parameters).
    remat: recompute each block in the backward pass. logprob_chunk_size: positions per vocabulary block.
    scan_layers: hold the blocks' parameters stacked ([layers, ...]) and run them with lax.scan, so XLA compiles
      one block instead of every layer (much shorter TPU compiles, smaller programs); HF import/export and
      checkpoints follow (a checkpoint restores into the layout it was saved from).
    attention: whole-sequence attention in the update and the log-prob pass: "auto" (the Pallas splash kernel on
      TPU, XLA elsewhere), "xla", or "pallas" (off TPU: interpret mode, for checking only).
    expect_preset: when set ("3b", "7b", …), the checkpoint's config must have that preset's shape.
    """

    checkpoint: str | None = None
    tokenizer: str | None = None
    tiny_preset: str = "demo"
    expect_preset: str | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = False
    attention: str = "auto"
    logprob_chunk_size: int = 512

    def __post_init__(self):
        if self.tokenizer is not None and self.checkpoint is None:
            raise ValueError("ModelSpec.tokenizer is set but ModelSpec.checkpoint is not: the tiny model makes "
                             "its own tokenizer; give both or neither")
        _positive("ModelSpec", logprob_chunk_size=self.logprob_chunk_size)
        if self.attention not in ("auto", "xla", "pallas"):
            raise ValueError(f"ModelSpec.attention must be 'auto', 'xla' or 'pallas', got {self.attention!r}")
        for name in ("tiny_preset", "expect_preset"):
            value = getattr(self, name)
            if value is not None and value not in PRESETS:
                raise ValueError(f"ModelSpec.{name} = {value!r} is not one of {sorted(PRESETS)}")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """train_files / eval_files: Search-R1 .parquet or plain .jsonl QA files (SPEC §6).
    demo: generate the bundled demo world in `<run_dir>/demo_data` and use its train/test splits (and corpus).
    use_dataset_prompt: prompt with the dataset's own chat messages (Search-R1 parquet) instead of the rollout's
      template around the question. eval_limit_per_source: cap on eval prompts per file (None = all)."""

    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    demo: bool = False
    demo_train_world: WorldConfig | None = None
    demo_test_world: WorldConfig | None = None
    demo_seed: int = 0
    use_dataset_prompt: bool = False
    eval_limit_per_source: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "train_files", tuple(self.train_files))
        object.__setattr__(self, "eval_files", tuple(self.eval_files))
        if self.demo and (self.train_files or self.eval_files):
            raise ValueError("DataSpec.demo = True makes its own files; leave DataSpec.train_files/eval_files empty")
        if self.eval_limit_per_source is not None:
            _positive("DataSpec", eval_limit_per_source=self.eval_limit_per_source)


@dataclasses.dataclass(frozen=True)
class RetrievalSpec:
    """addresses: running retrieval services ("host:port", several = client-side round robin).
    index_dir: otherwise, start a service on a free loopback port over this index for the run's duration.
    With DataSpec.demo and neither, the demo corpus is indexed with `demo_backend` and served.
    top_k: documents per search. deadline_s / max_attempts / backoff_s: the client's retry policy.
    wait_for_service_s: how long start-up waits for `addresses` to answer Health (0 = must answer now)."""

    addresses: tuple[str, ...] = ()
    index_dir: str | None = None
    demo_backend: Literal["dense", "bm25"] = "dense"
    top_k: int = 3
    deadline_s: float = 5.0
    max_attempts: int = 4
    backoff_s: float = 0.1
    wait_for_service_s: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "addresses", tuple(self.addresses))
        if self.addresses and self.index_dir:
            raise ValueError("set RetrievalSpec.addresses (running services) or RetrievalSpec.index_dir (start one), "
                             "not both")
        _positive("RetrievalSpec", top_k=self.top_k, max_attempts=self.max_attempts)
        if self.demo_backend not in ("dense", "bm25"):
            raise ValueError(f"RetrievalSpec.demo_backend must be 'dense' or 'bm25', got {self.demo_backend!r}")


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """agent: turn limits and texts (AgentConfig). sampling: the training sampler (eval is always greedy).
    slots: concurrent decode slots (None = every trajectory of a step at once). prompt_template: the user message
    around each question (`{question}`); the one place the instruction text is bound."""

    agent: AgentConfig = AgentConfig()
    sampling: SamplingConfig = SamplingConfig()
    slots: int | None = None
    prompt_template: str = PROMPT_TEMPLATE

    def __post_init__(self):
        if self.slots is not None:
            _positive("RolloutSpec", slots=self.slots)
        if "{question}" not in self.prompt_template:
            raise ValueError("RolloutSpec.prompt_template has no {question} placeholder")

    @property
    def max_turns_per_trajectory(self) -> int:
        """K of the advantage arrays: max_turns searching turns plus the final, no-search turn."""
        return self.agent.max_turns + 1


@dataclasses.dataclass(frozen=True)
class UpdateSpec:
    """How one step's trajectories update the policy (PPO-style).

    mini_batches: optimizer updates per step; the step's B = prompts × n trajectories are split into this many
      mini-batches (in a seeded random order; on several processes each draws from its own trajectories).
      micro_batch_size: trajectories per forward/backward pass, per process; a mini-batch's gradients are
      accumulated over its micro-batches (None = the whole mini-batch at once).
    epochs: passes over the step's trajectories. max_nonfinite_in_a_row: a non-finite loss or gradient skips
      that update; this many skipped updates in a row stop the run.
    min_sequence_length: trajectories are padded to a power of two at least this long (each distinct length is
      one compilation; set it to AgentConfig.max_context_tokens for a single shape).
    """

    mini_batches: int = 1
    micro_batch_size: int | None = None
    epochs: int = 1
    max_nonfinite_in_a_row: int = 3
    min_sequence_length: int = 256

    def __post_init__(self):
        _positive("UpdateSpec", mini_batches=self.mini_batches, epochs=self.epochs,
                  max_nonfinite_in_a_row=self.max_nonfinite_in_a_row, min_sequence_length=self.min_sequence_length)
        if self.micro_batch_size is not None:
            _positive("UpdateSpec", micro_batch_size=self.micro_batch_size)

    @property
    def old_policy_pass(self) -> bool:
        """Whether a step computes the old policy's log-probs in a forward pass of their own. Only the first
        update of a step runs on the params that sampled; with one update per step (one mini-batch, one epoch)
        the update's own log-probs are the old ones (ratio exactly 1) and the pass would be pure cost."""
        return self.mini_batches * self.epochs > 1


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Device mesh ("data", "fsdp", "tensor") over the first `num_devices` devices (None = all); one size may
    be -1 (all remaining devices). rules: overrides of tspo_jax.sharding.DEFAULT_RULES as (logical_axis,
    mesh_axes) pairs."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: tuple = ()
    num_devices: int | None = None

    def __post_init__(self):
        if self.num_devices is not None:
            _positive("MeshSpec", num_devices=self.num_devices)


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """save_every: steps between checkpoints (the last step and SIGTERM always save). directory: default
    `<run_dir>/checkpoints` (use gs://… on pods)."""

    save_every: int = 10
    max_to_keep: int = 3
    async_save: bool = True
    directory: str | None = None

    def __post_init__(self):
        _positive("CheckpointSpec", save_every=self.save_every, max_to_keep=self.max_to_keep)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One training run (gin name `train`).

    run_dir: checkpoints, metrics.jsonl, tensorboard/, config.gin and operative_config.gin go here; a local
      directory or gs://bucket/path (tspo_jax.run_files).
    local_dir: files that need a local POSIX path (demo data and its index, the tiny model being built, the
      retrieval service log): None = run_dir when it is local, ~/.cache/tspo_jax/runs/<bucket>/<path> when not.
    num_steps: RL steps. prompts_per_step: prompts per step (global, all processes). samples_per_prompt: n.
    eval_every: greedy eval on the eval files every this many steps and after the last step (0 = never).
      eval_at_start: also evaluate the initial policy.
    """

    run_dir: str
    num_steps: int
    prompts_per_step: int
    samples_per_prompt: int = 5
    seed: int = 0
    model: ModelSpec = ModelSpec()
    data: DataSpec = dataclasses.field(default_factory=lambda: DataSpec(demo=True))
    retrieval: RetrievalSpec = RetrievalSpec()
    rollout: RolloutSpec = RolloutSpec()
    scoring: ScoringConfig = ScoringConfig()
    algorithm: AlgorithmSpec | None = None
    loss: LossConfig = LossConfig()
    optimizer: OptimizerSpec = OptimizerSpec()
    update: UpdateSpec = UpdateSpec()
    mesh: MeshSpec = MeshSpec()
    checkpoints: CheckpointSpec = CheckpointSpec()
    eval_every: int = 0
    eval_at_start: bool = False
    local_dir: str | None = None

    def __post_init__(self):
        if self.algorithm is None:
            raise ValueError("train.algorithm is not set: include configs/algorithms/tspo.gin (or grpo.gin, gtpo.gin)")
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ValueError(f"train.run_dir must be a non-empty path, got {self.run_dir!r}")
        self._check_locations()
        _positive("train", num_steps=self.num_steps, prompts_per_step=self.prompts_per_step,
                  samples_per_prompt=self.samples_per_prompt)
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every must be >= 0, got {self.eval_every}")
        if not self.data.demo and not self.data.train_files:
            raise ValueError("DataSpec.train_files is empty (or set DataSpec.demo = True for the bundled demo data)")
        if not (self.data.demo or self.retrieval.addresses or self.retrieval.index_dir):
            raise ValueError("no retrieval service: set RetrievalSpec.addresses (running services) or "
                             "RetrievalSpec.index_dir (an index to serve)")
        trajectories = self.prompts_per_step * self.samples_per_prompt
        if trajectories % self.update.mini_batches:
            raise ValueError(f"UpdateSpec.mini_batches={self.update.mini_batches} does not divide the "
                             f"{trajectories} trajectories of a step (train.prompts_per_step × samples_per_prompt)")
        mini = trajectories // self.update.mini_batches
        if self.update.micro_batch_size is not None and mini % self.update.micro_batch_size:
            raise ValueError(f"UpdateSpec.micro_batch_size={self.update.micro_batch_size} does not divide a "
                             f"mini-batch of {mini} trajectories")

    def _check_locations(self) -> None:
        """RUN_DIR and the checkpoint directory may be gs:// URLs; what is read from local disk may not."""
        local = [("ModelSpec.checkpoint", self.model.checkpoint), ("ModelSpec.tokenizer", self.model.tokenizer),
                 ("RetrievalSpec.index_dir", self.retrieval.index_dir), ("train.local_dir", self.local_dir)]
        local += [("DataSpec.train_files", f) for f in self.data.train_files]
        local += [("DataSpec.eval_files", f) for f in self.data.eval_files]
        try:
            run_files.check_supported(self.run_dir, what="train.run_dir (RUN_DIR)")
            if self.checkpoints.directory:
                run_files.check_supported(self.checkpoints.directory, what="CheckpointSpec.directory")
            for what, url in local:
                run_files.require_local(url, what=what)
        except run_files.RunFilesError as error:
            raise ValueError(str(error)) from None


@dataclasses.dataclass(frozen=True)
class SFTExperiment:
    """A supervised warm start (gin name `sft`; `python -m tspo_jax.sft`): next-token cross-entropy on the
    policy's own tokens of demonstrated trajectories (SPEC §9), rendered with the same tokenizer, prompt
    template, agent limits and loss mask as the RL run it prepares, so its checkpoint is an RL starting point.

    run_dir: checkpoints, metrics.jsonl, tensorboard/, configs and the final HF export (`<run_dir>/hf`, a valid
      `ModelSpec.checkpoint` of an RL run). train_files: demonstration JSONL files (tspo_jax.data.trajectories).
      demo_demonstrations: with no train_files, write this many demonstrations of the demo world (drawn with
      `demonstrations`, a DemonstrationConfig) to `<local_dir>/demonstrations.jsonl` and train on them.
    num_steps: optimizer steps. batch_size: demonstrations per step (global). micro_batch_size: per forward/
      backward pass, per process (None = the whole batch). min_sequence_length: rows are padded to a power of
      two at least this long.
    eval_every: greedy evaluation with the RL agent every this many steps and after the last (0 = never), on
      `eval_data` (a DataSpec: its eval files, or the demo world's test split) against `retrieval`.
    """

    run_dir: str
    num_steps: int
    batch_size: int
    train_files: tuple[str, ...] = ()
    demo_demonstrations: int = 0
    demonstrations: DemonstrationConfig = DemonstrationConfig()
    seed: int = 0
    model: ModelSpec = ModelSpec()
    rollout: RolloutSpec = RolloutSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    mesh: MeshSpec = MeshSpec()
    checkpoints: CheckpointSpec = CheckpointSpec()
    micro_batch_size: int | None = None
    min_sequence_length: int = 128
    eval_every: int = 0
    eval_at_start: bool = False
    eval_data: DataSpec | None = None
    retrieval: RetrievalSpec = RetrievalSpec()
    scoring: ScoringConfig = ScoringConfig()
    local_dir: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "train_files", tuple(self.train_files))
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ValueError(f"sft.run_dir must be a non-empty path, got {self.run_dir!r}")
        _positive("sft", num_steps=self.num_steps, batch_size=self.batch_size,
                  min_sequence_length=self.min_sequence_length)
        if bool(self.train_files) == bool(self.demo_demonstrations):
            raise ValueError("set exactly one of sft.train_files (demonstration JSONL files) and "
                             "sft.demo_demonstrations (write that many demo-world demonstrations)")
        if self.demo_demonstrations < 0:
            raise ValueError(f"sft.demo_demonstrations must be >= 0, got {self.demo_demonstrations}")
        if self.micro_batch_size is not None:
            _positive("sft", micro_batch_size=self.micro_batch_size)
            if self.batch_size % self.micro_batch_size:
                raise ValueError(f"sft.micro_batch_size={self.micro_batch_size} does not divide sft.batch_size="
                                 f"{self.batch_size}")
        if self.eval_every < 0:
            raise ValueError(f"sft.eval_every must be >= 0, got {self.eval_every}")
        if (self.eval_every or self.eval_at_start) and self.eval_data is None:
            raise ValueError("sft.eval_every / eval_at_start need sft.eval_data (a DataSpec with eval files or "
                             "DataSpec.demo = True)")
        if self.eval_data is not None and not (self.eval_data.demo or self.eval_data.eval_files):
            raise ValueError("sft.eval_data has no eval files (DataSpec.eval_files, or DataSpec.demo = True)")
        try:
            run_files.check_supported(self.run_dir, what="sft.run_dir (RUN_DIR)")
            for what, url in [("ModelSpec.checkpoint", self.model.checkpoint), ("sft.local_dir", self.local_dir),
                              ("RetrievalSpec.index_dir", self.retrieval.index_dir)] + [
                    ("sft.train_files", f) for f in self.train_files]:
                run_files.require_local(url, what=what)
        except run_files.RunFilesError as error:
            raise ValueError(str(error)) from None
