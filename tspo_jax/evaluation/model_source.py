"""What `--model` names, and its weights on the policy's mesh (host side set-up).

    RUN_DIR[:STEP]   a training run directory (local or gs://): its recorded config (operative_config.gin, else
                     config.gin) says which model, tokenizer, agent limits, prompt and data it trained with, and its
                     Orbax checkpoint STEP (default: the newest) holds the weights. Read only: a run still training
                     there is left alone.
    HF_DIR           a local Hugging Face directory (config.json, *.safetensors, tokenizer files): an exported
                     checkpoint, a published search agent (e.g. Search-R1's Qwen2.5 models) or a base model.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

from flax import nnx

from tspo_jax import run_files
from tspo_jax.checkpoint import CheckpointError, RunCheckpoints
from tspo_jax.training.errors import StartupError

RUN_CONFIGS = ("operative_config.gin", "config.gin")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """run_dir (an epath) and step (None = the newest checkpoint) for a training run; hf_dir for an HF directory."""

    text: str
    run_dir: object | None = None
    step: int | None = None
    hf_dir: pathlib.Path | None = None

    @property
    def is_run(self) -> bool:
        return self.run_dir is not None


def model_source(text: str) -> ModelSource:
    """Parses `--model`; fails naming it when it is neither a run directory nor an HF directory."""
    match = re.fullmatch(r"(.+):(\d+)", text)
    if match and not os.path.isdir(text):  # "gs://b/run:6" or "runs/x:6"; a directory really named "x:6" wins
        path_text, step = match.group(1), int(match.group(2))
    else:
        path_text, step = text, None
    try:
        path = run_files.run_path(path_text, what="--model")
        if any((path / name).is_file() for name in RUN_CONFIGS):
            return ModelSource(text=text, run_dir=path, step=step)
    except run_files.RunFilesError as error:
        raise StartupError(str(error)) from None
    if step is not None:
        raise StartupError(f"--model {text}: {path_text} is not a training run directory (it has no "
                           f"{' or '.join(RUN_CONFIGS)}), so it has no checkpoint step {step}")
    if run_files.is_remote(path_text):
        raise StartupError(f"--model {text} is not a training run directory (no {' or '.join(RUN_CONFIGS)}); a "
                           "Hugging Face directory must be on local disk")
    hf_dir = pathlib.Path(path_text).expanduser().absolute()
    if not hf_dir.exists():
        raise StartupError(f"--model {text}: {hf_dir} does not exist")
    if not (hf_dir / "config.json").is_file():
        raise StartupError(f"--model {text} is neither a training run directory ({' or '.join(RUN_CONFIGS)}) nor "
                           f"a Hugging Face model directory (config.json)")
    return ModelSource(text=text, hf_dir=hf_dir)


def run_checkpoints(source: ModelSource, directory: str | None) -> RunCheckpoints:
    """The run's checkpoints, read only (CheckpointSpec.directory `directory`, default RUN_DIR/checkpoints)."""
    return RunCheckpoints(directory or source.run_dir / "checkpoints", save_every=1, read_only=True)


def checkpoint_step(checkpoints: RunCheckpoints, source: ModelSource) -> int:
    """The committed step `--model` asks for (its newest when it names none)."""
    try:
        return checkpoints.committed_step(source.step)
    except CheckpointError as error:
        raise StartupError(f"--model {source.text}: {error}") from None


def load_params(policy, checkpoints: RunCheckpoints | None, step: int | None) -> nnx.State:
    """The policy's params on its mesh: checkpoint `step`'s (only the params subtree is read) or, without
    checkpoints, the HF directory's weights, each tensor read onto its shard."""
    if checkpoints is None:
        return nnx.state(policy.load())
    try:
        return checkpoints.restore_params(step, policy.abstract_params)
    except CheckpointError as error:
        raise StartupError(str(error)) from None
