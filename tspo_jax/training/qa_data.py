"""The question-answer files of a run (host side): the configured Search-R1 parquet / JSONL files, or the bundled
demo world written into the run's local directory. Shared by the RL trainer, SFT's evaluation and `evaluate`."""

from __future__ import annotations

import dataclasses
import pathlib

from tspo_jax.data import QADataError, open_sources
from tspo_jax.training import bootstrap, multihost
from tspo_jax.training.errors import StartupError


@dataclasses.dataclass(frozen=True)
class QAData:
    """train_sources / eval_sources: Grain random-access sources (tspo_jax.data). demo_paths: the demo world's
    files by role ("corpus", "train", "test") when DataSpec.demo, else None."""

    train_sources: list
    eval_sources: list
    demo_paths: dict[str, pathlib.Path] | None

    def train_examples(self) -> list:
        return [source[i] for source in self.train_sources for i in range(len(source))]


def open_qa_data(spec, *, local_dir: pathlib.Path, require_train: bool = True, eval_only: bool = False,
                 top_k: int | None = None) -> QAData:
    """Opens DataSpec `spec`'s files (writing the demo world first when `spec.demo`), failing with a
    StartupError that names the file. eval_only: leave the training files alone (evaluating a finished run, on
    a machine that may not have them). top_k: the retrieval's, for the demo world's recall@k ceiling."""
    if spec.demo:
        with multihost.process_zero_first("demo data"):
            demo_paths = bootstrap.demo_data(local_dir / "demo_data", seed=spec.demo_seed,
                                             train_world=spec.demo_train_world, test_world=spec.demo_test_world,
                                             recall_k=top_k)
        train_files, eval_files = [demo_paths["train"]], [demo_paths["test"]]
    else:
        demo_paths = None
        train_files, eval_files = list(spec.train_files), list(spec.eval_files)
    try:
        train_sources = open_sources(train_files) if (train_files or require_train) and not eval_only else []
        eval_sources = open_sources(eval_files) if eval_files else []
    except QADataError as error:
        raise StartupError(f"data: {error}") from None
    return QAData(train_sources=train_sources, eval_sources=eval_sources, demo_paths=demo_paths)
