"""Orbax checkpoints of a run: the train state plus a small JSON record of its progress.

One checkpoint per epoch; the newest ``max_to_keep`` are kept. A run restarted with the same
working directory resumes from the newest one. A checkpoint that cannot be restored raises
:class:`CheckpointError` naming the directory: a run never silently starts again from scratch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint exists but does not fit this run, or cannot be read."""


class Checkpointer:
    """Save and restore ``(TrainState, progress dict)`` pairs under ``workdir/checkpoints``."""

    def __init__(self, workdir: str | Path, *, max_to_keep: int = 2):
        self.directory = (Path(workdir) / CHECKPOINT_DIR).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, progress: dict) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
            ),
        )
        self._manager.wait_until_finished()

    def restore(self, template_state: Any) -> tuple[Any, dict] | None:
        """The newest checkpoint, shaped like ``template_state``; None if there is none."""
        step = self.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_state)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()
                ),
            )
        except Exception as error:
            raise CheckpointError(
                f"cannot restore the checkpoint at step {step} in {self.directory}: {error}. "
                "It was written by a different configuration or is damaged; use a new --workdir "
                "or delete that directory to start again."
            ) from error
        return restored["state"], restored["progress"]

    def close(self) -> None:
        self._manager.close()
