"""Training metrics: one console line per step (step, rate, ETA, reward), TensorBoard event files and a JSONL log.

Host-side only. `<run_dir>/metrics.jsonl` holds one JSON object per training step (`{"step": N, name: value…}`)
and one per eval (`{"step": N, "eval/<data_source>/em": …}`); floats are written with Python's round-trip repr,
so a resumed run's rows are byte-comparable with an uninterrupted run's. On resume, rows after the restored step
are dropped (those steps run again) and TensorBoard is told to purge them too. The run directory may be gs://
(tspo_jax.run_files): GCS objects cannot be appended to, so there the whole log is rewritten after each row
(one object write of a few MB at most, next to steps of minutes), and tensorboardX writes the events with its own
GCS writer.

The metric names (issue 6 item 5) are the constants below, so the trainer, the tests and dashboards agree.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping

from etils import epath

from tspo_jax import run_files

# Rewards and scoring.
REWARD = "reward/mean"
EM = "reward/em"
FOLR_HIT_RATE = "reward/folr_hit_rate"
# Group composition (SPEC §4) and the share TSPO exists to raise.
GROUPS_MIXED = "groups/mixed"
GROUPS_ALL_WRONG = "groups/all_wrong"
GROUPS_ALL_CORRECT = "groups/all_correct"
GROUPS_NONZERO_ADVANTAGE = "groups/nonzero_advantage"
# Rollouts.
TURNS = "rollout/turns_per_trajectory"
SEARCHES = "rollout/searches_per_trajectory"
SEARCH_FAILURES = "rollout/failed_searches"
EMBED_FAILURES = "rollout/failed_embeds"  # GTPO shaping's queries the service did not embed
VALID_ACTION_RATE = "rollout/valid_action_rate"
RESPONSE_LENGTH = "rollout/response_length_mean"
RESPONSE_LENGTH_MAX = "rollout/response_length_max"
# Update.
POLICY_LOSS = "loss/policy"
KL = "loss/kl"
ENTROPY = "loss/entropy"
CLIP_FRACTION = "loss/clip_fraction"
GRAD_NORM = "optim/grad_norm"
LEARNING_RATE = "optim/learning_rate"
SKIPPED_UPDATES = "optim/skipped_updates"
# Time per phase, seconds (never bit-reproducible, so excluded from resume comparisons).
TIME_ROLLOUT = "time/rollout"
TIME_RETRIEVAL = "time/retrieval"
TIME_SCORING = "time/scoring"
TIME_LOGPROBS = "time/logprobs"
TIME_UPDATE = "time/update"
TIME_STEP = "time/step"
TIMING_PREFIXES = ("time/", "throughput/")


def eval_em_name(data_source: str) -> str:
    return f"eval/{data_source}/em"


def reproducible(row: Mapping[str, float]) -> dict[str, float]:
    """The part of a metrics row that a resumed run must reproduce exactly (everything but timings)."""
    return {k: v for k, v in row.items() if not k.startswith(TIMING_PREFIXES)}


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    text = epath.Path(path).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class ProgressLine:
    """`step 12/200 | 0.41 step/s | ETA 7m38s | reward 0.312 | em 0.250 | loss -0.0012` once per step, to stdout."""

    def __init__(self, total_steps: int, *, start_step: int = 0, stream=None):
        self.total_steps = total_steps
        self._start_step = start_step
        self._start_time = time.monotonic()
        self._stream = stream or sys.stdout

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        done = step - self._start_step
        elapsed = time.monotonic() - self._start_time
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - step) / rate if rate > 0 else math.inf
        parts = [f"step {step}/{self.total_steps}", f"{rate:.3g} step/s", f"ETA {format_duration(eta)}"]
        for label, name in (("reward", REWARD), ("em", EM), ("folr", FOLR_HIT_RATE),
                            ("nonzero-adv", GROUPS_NONZERO_ADVANTAGE), ("loss", POLICY_LOSS), ("kl", KL),
                            ("nll", "sft/nll"), ("eval-em", "eval/em")):
            if name in metrics:
                parts.append(f"{label} {metrics[name]:.4g}")
        print(" | ".join(parts), file=self._stream, flush=True)


def format_duration(seconds: float) -> str:
    """"1h02m", "3m07s" or "?" (not finite): the ETA of a progress line."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class MetricsLog:
    """The JSONL log and TensorBoard writer of one run directory (write only from process 0).

    run_dir: a local directory or gs:// URL. resume_step: the step the run restarts from; rows logged after it
    by the interrupted run are dropped.
    """

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int = 0, tensorboard: bool = True):
        from tensorboardX import SummaryWriter  # host-side dependency, imported where it is used

        self.run_dir = run_files.run_path(run_dir, what="RUN_DIR")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.tensorboard_dir = self.run_dir / "tensorboard"
        self._remote = run_files.is_remote(self.run_dir)
        self._lines = self._rows_up_to(resume_step)
        if self._remote:
            self.jsonl_path.write_text("".join(self._lines))
            self._jsonl = None
        else:
            tmp = self.jsonl_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(self._lines))
            os.replace(tmp, self.jsonl_path)
            self._jsonl = open(self.jsonl_path, "a")
        self._tb = (SummaryWriter(os.fspath(self.tensorboard_dir), purge_step=resume_step + 1 if resume_step else None)
                    if tensorboard else None)

    def _rows_up_to(self, step: int) -> list[str]:
        if not self.jsonl_path.exists():
            return []
        kept = []
        for line in self.jsonl_path.read_text().splitlines(keepends=True):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut short by SIGKILL can only be the last one
            if row["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        return kept

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": int(step)}
        row.update({name: _plain(value) for name, value in metrics.items()})
        line = json.dumps(row) + "\n"
        if self._remote:
            self._lines.append(line)
            self.jsonl_path.write_text("".join(self._lines))  # a GCS object is replaced whole, never torn
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        if self._tb is not None:
            for name, value in row.items():
                if name != "step" and value is not None and math.isfinite(value):
                    self._tb.add_scalar(name, value, global_step=step)

    def rows(self) -> list[dict]:
        """Every row logged so far (this run's and, on resume, the kept earlier ones), as dicts."""
        if self._jsonl is not None:
            self._jsonl.flush()
        return read_jsonl(self.jsonl_path)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value) -> float | int | None:
    """A JSON number; NaN/Inf become None (JSON has no NaN) so a skipped update still logs a valid row."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None
