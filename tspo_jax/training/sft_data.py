"""SFT data (host side): demonstration JSONL files -> shuffled, process-sharded, checkpointable batches of the
exact token streams rollouts produce (tspo_jax.rollout.render), padded to a bucketed length.

Every demonstration is rendered once when the files are opened, so one the agent could not have produced (or
that does not fit the run's AgentConfig limits) stops the run before training, naming its file and line.
Rendering in the pipeline is lazy, so a large file is never held in memory as tokens.
"""

from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Sequence

import grain
import numpy as np

from tspo_jax.data.trajectories import Demonstration, JsonlTrajectorySource, TrajectoryDataError
from tspo_jax.rollout.agent import AgentConfig, ObservationCodec
from tspo_jax.rollout.prompts import build_prompt_messages
from tspo_jax.rollout.render import DemonstrationError, render_demonstration
from tspo_jax.rollout.tokenizer import encode_chat
from tspo_jax.training.batch import bucketed_length

log = logging.getLogger("tspo_jax.sft")


class DemonstrationRenderer:
    """Demonstration -> {"tokens": int32[T], "loss_mask": int32[T]} with the run's tokenizer, prompt template
    and agent limits (a picklable Grain map function)."""

    def __init__(self, tokenizer, *, template: str, agent: AgentConfig):
        self.tokenizer, self.template, self.agent = tokenizer, template, agent
        self._codec = ObservationCodec(tokenizer, agent)

    def __call__(self, demo: Demonstration) -> dict[str, np.ndarray]:
        if demo.prompt_messages:
            messages = [{"role": role, "content": content} for role, content in demo.prompt_messages]
        else:
            messages = build_prompt_messages(demo.question, self.template)
        rendered = render_demonstration(self._codec, encode_chat(self.tokenizer, messages), demo.turns)
        return {"tokens": rendered.tokens, "loss_mask": rendered.loss_mask}


def open_demonstrations(paths: Sequence[str | pathlib.Path], renderer: DemonstrationRenderer) -> list:
    """Opens and validates every file, rendering each demonstration once (TrajectoryDataError naming the file
    and line of the first one that cannot be rendered)."""
    if not paths:
        raise TrajectoryDataError("no demonstration files given (SFTExperiment.train_files)")
    sources = []
    for path in paths:
        source = JsonlTrajectorySource(path)
        started, longest = time.perf_counter(), 0
        for index in range(len(source)):
            try:
                longest = max(longest, len(renderer(source[index])["tokens"]))
            except DemonstrationError as error:
                raise TrajectoryDataError(f"{source.where(index)}: {error}") from None
        log.info("%s: %d demonstrations, longest %d tokens (checked in %.1fs)", path, len(source), longest,
                 time.perf_counter() - started)
        sources.append(source)
    return sources


class _PadToBucket:
    """A list of rendered rows -> this process's slice as right-padded [rows, L] arrays (a Grain batch_fn)."""

    def __init__(self, *, pad_id: int, min_length: int, max_length: int, start: int, stop: int):
        self.pad_id, self.min_length, self.max_length = pad_id, min_length, max_length
        self.start, self.stop = start, stop

    def __call__(self, rows: list[dict]) -> dict[str, np.ndarray]:
        length = bucketed_length(max(len(r["tokens"]) for r in rows), minimum=self.min_length,
                                 maximum=self.max_length)
        rows = rows[self.start:self.stop]
        tokens = np.full((len(rows), length), self.pad_id, np.int32)
        loss_mask = np.zeros((len(rows), length), np.int32)
        attention = np.zeros((len(rows), length), bool)
        for i, row in enumerate(rows):
            n = len(row["tokens"])
            tokens[i, :n], loss_mask[i, :n], attention[i, :n] = row["tokens"], row["loss_mask"], True
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
        return {"tokens": tokens, "positions": positions, "attention_mask": attention, "loss_mask": loss_mask}


def sft_batches(sources: Sequence, renderer: DemonstrationRenderer, *, batch_size: int, seed: int, pad_id: int,
                min_length: int, max_length: int, process_index: int = 0, process_count: int = 1
                ) -> grain.DatasetIterator:
    """An endless iterator of this process's batches: `batch_size // process_count` rendered demonstrations
    each, reshuffled every epoch from `seed`. `batch_size` is global; every process walks the same stream and
    takes its own rows, so the data does not depend on the number of hosts, and one iterator state (the
    checkpoint's) serves them all. All processes pad a batch to the same bucketed length."""
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of the process count {process_count}")
    per_process = batch_size // process_count
    dataset = grain.MapDataset.concatenate([grain.MapDataset.source(s) for s in sources])
    stream = dataset.seed(seed).shuffle().repeat(None).map(renderer).to_iter_dataset()
    pad = _PadToBucket(pad_id=pad_id, min_length=min_length, max_length=max_length,
                       start=process_index * per_process, stop=(process_index + 1) * per_process)
    return iter(stream.batch(batch_size, drop_remainder=True, batch_fn=pad))
