"""Orbax checkpoints of a run: the train state plus a small JSON record of its progress.

One checkpoint per epoch (and one when the run is preempted); the newest ``max_to_keep`` and the
one with the lowest test error are kept. A run restarted with the same working directory resumes
from the newest one; restoring onto a different number of devices works, because the state is
restored with the shardings of the current run's template. A checkpoint that cannot be restored raises
:class:`CheckpointError` naming the directory: a run never silently starts again from scratch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from sparsejax.errors import UserError

CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "eval/err"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint exists but does not fit this run, or cannot be read."""


class Checkpointer:
    """Save and restore ``(TrainState, progress dict)`` pairs under ``workdir/checkpoints``."""

    def __init__(self, workdir: str | Path, *, max_to_keep: int = 2):
        self.directory = (Path(workdir) / CHECKPOINT_DIR).absolute()
        preservation = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(max_to_keep),
                checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preservation, enable_async_checkpointing=False, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, progress: dict, metrics: dict | None = None) -> None:
        """Save ``step``, replacing an earlier checkpoint of the same step (a run stopped at the
        end of an epoch saves before its evaluation; the resumed run saves again after it)."""
        if step in self._manager.all_steps():
            self._manager.delete(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
            ),
            metrics=metrics,
            force=True,
        )
        self._manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """Whether the job was told to stop (multi-host preemption notice, synced across hosts)."""
        return self._manager.reached_preemption(step)

    def restore(self, template_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """The checkpoint of ``step`` (None: the newest), shaped like ``template_state``; None if
        there is none."""
        step = self.latest_step() if step is None else step
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
