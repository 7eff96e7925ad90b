"""Orbax checkpoints of a training run: params, optimizer state, step, RNG and the Grain iterator state.

A checkpoint is two Orbax items under `<run_dir>/checkpoints/<step>/`:
  state  the array pytree (`{"params", "opt_state", "rng"}`), saved asynchronously with its shardings;
  meta   a JSON dict (step, data iterator state, counters) that must travel with the arrays.
The directory may be local or gs:// (tspo_jax.run_files); on several processes every process saves and restores
its own shards into the same directory. Orbax only lists a step once its save has committed, so a run killed
mid-save (even by SIGKILL) resumes from the previous complete checkpoint. A committed checkpoint that no longer
restores (damaged files) is moved aside as `<step>.corrupt` with a message naming it, and the one before it is
used.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from tspo_jax import run_files

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required; the message names the checkpoint(s) tried."""


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live pytree: the restore target that places each array on the
    same devices as the live one."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RunCheckpoints:
    """The checkpoints of one run directory.

    save_every: save when `step % save_every == 0` (and whenever `save(..., force=True)`).
    max_to_keep: older checkpoints are deleted once this many newer ones have committed.
    read_only: only list and restore (evaluate, export): nothing in the directory is created or cleaned up, so a
      run that is still training there (its save in flight included) is left alone.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, max_to_keep: int = 3,
                 async_save: bool = True, read_only: bool = False):
        if save_every <= 0:
            raise ValueError(f"save_every must be positive, got {save_every}")
        self.directory = run_files.run_path(directory, what="the checkpoint directory")
        self.save_every = save_every
        if read_only:  # Orbax's read-only values, given explicitly (it warns about each one it has to change)
            options = ocp.CheckpointManagerOptions(read_only=True, max_to_keep=None, create=False,
                                                   save_interval_steps=0, cleanup_tmp_directories=False)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # a save interrupted by SIGKILL leaves a tmp dir; drop it on restart
            )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._preempted = threading.Event()

    @classmethod
    def for_run(cls, spec, run_dir) -> "RunCheckpoints":
        """A training or SFT run's checkpoints, as its CheckpointSpec `spec` says (RUN_DIR/checkpoints unless
        spec.directory)."""
        return cls(spec.directory or run_dir / "checkpoints", save_every=spec.save_every,
                   max_to_keep=spec.max_to_keep, async_save=spec.async_save)

    # ----- saving -----------------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        # Not on this process's SIGTERM alone: every process must save the same steps (the loop forces the save
        # once all processes agree to stop).
        return step % self.save_every == 0

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Starts an asynchronous save of `state` (array pytree) and `meta` (JSON-able) as `step`; True if saved."""
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False  # e.g. a SIGTERM save right after a periodic one
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
            force=True,
        )

    def wait(self) -> None:
        """Blocks until every started save has committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # ----- preemption -------------------------------------------------------------------------------------
    def install_sigterm_handler(self) -> None:
        """On SIGTERM (TPU maintenance, `kill`, the scheduler) the loop finishes its step, saves and exits. On
        several processes the loop asks every process after each step (tspo_jax.training.multihost.any_process),
        so a signal to any host stops all of them after the same step."""

        def on_sigterm(signum, frame):
            log.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
            self._preempted.set()

        signal.signal(signal.SIGTERM, on_sigterm)

    @property
    def preempted(self) -> bool:
        """This process received SIGTERM."""
        return self._preempted.is_set()

    # ----- restoring --------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed checkpoint steps, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def committed_step(self, step: int | None = None) -> int:
        """`step` if it is a committed checkpoint (None: the newest one); raises CheckpointError naming the
        directory and the steps it has otherwise."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (have {steps})")
        return step

    def step_path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores checkpoint `step` onto the shardings of `abstract_state` (None: as saved, on the default
        device); raises CheckpointError naming it."""
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
            )
        except Exception as e:  # Orbax/TensorStore raise many types for damaged files
            raise CheckpointError(
                f"checkpoint {self.step_path(step)} cannot be restored: {type(e).__name__}: {_first_line(e)}"
            ) from e
        meta = restored["meta"]
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise CheckpointError(f"checkpoint {self.step_path(step)}: meta item is missing or names another step")
        return restored["state"], meta

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the `params` subtree of checkpoint `step` (for export: no optimizer state in memory)."""
        target = {"params": abstract_params}
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                restored = checkpointer.restore(
                    self.step_path(step) / "state",
                    args=ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                                partial_restore=True))
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {self.step_path(step)} cannot be restored: {type(e).__name__}: {_first_line(e)}"
            ) from e
        return restored["params"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """The newest checkpoint that restores, or None when the run has none.

        Damaged newer checkpoints are moved aside (`<step>.corrupt`) with a warning naming each, once an older
        one has restored. If none restores, nothing is moved and CheckpointError names every one tried.
        """
        failures: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, abstract_state)
            except CheckpointError as e:
                log.warning("%s; trying the previous checkpoint", e)
                failures.append((step, str(e)))
                continue
            for damaged, _ in failures:
                self._set_aside(damaged)
            if failures:
                log.warning("resuming from the previous complete checkpoint %s", self.step_path(step))
            return step, state, meta
        if failures:
            raise CheckpointError(
                "no checkpoint in {} restores (none was changed):\n  {}".format(
                    self.directory, "\n  ".join(message for _, message in failures))
            )
        return None

    def _set_aside(self, step: int) -> None:
        # Out of Orbax's step naming so it is neither listed nor overwritten when the run reaches `step` again.
        if jax.process_index() == 0:
            path = self.step_path(step)
            target = path.with_name(f"{step}.corrupt")
            suffix = 1
            while target.exists():
                target = path.with_name(f"{step}.corrupt{suffix}")
                suffix += 1
            path.rename(target)
            log.warning("moved the damaged checkpoint aside to %s", target)
        self._manager.reload()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)
