"""Orbax checkpoints of a run: the train state plus a small JSON record of its progress, each
sealed with a content digest (:mod:`sparsejax.train.digest`).

One checkpoint per epoch (and one when the run is preempted); the newest ``max_to_keep`` and the
one with the lowest test error are kept. A run restarted with the same working directory resumes
from the newest checkpoint that verifies; restoring onto a different number of devices works,
because the state is restored with the shardings of the current run's template.

The digest is computed after Orbax has finished writing a checkpoint, in a background thread
that overlaps with the next training steps; it is the last thing written, so a checkpoint
without one was never finished. Before a checkpoint is read every process verifies it, and they
agree. One that fails (damaged, truncated, unfinished) is never used: the training engine moves
it aside to ``checkpoints/corrupt-STEP`` and resumes from the next newest one, as if the bad one
had never been written (from the start when only unfinished ones are left); read-only users
(slimming, replay) skip it with a warning. A checkpoint
that verifies but does not fit the run (another configuration or version) raises
:class:`CheckpointError`: a run never silently starts again from scratch.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from sparsejax.errors import UserError, warn, written_under
from sparsejax.train.digest import DIGEST_FILE, UNFINISHED, verify_digest, write_digest

CHECKPOINT_DIR = "checkpoints"
CORRUPT_PREFIX = "corrupt-"
SEALED_MARKER = "sparsejax_sealed"
"""A file in the checkpoint directory of every run whose checkpoints carry digests; a run without
it was written before they existed."""
BEST_METRIC = "eval/err"


class CheckpointError(UserError, RuntimeError):
    """No checkpoint of a run can be used: none verifies, or one does not fit this run."""


def _agreed(reason: str | None) -> str | None:
    """``reason`` when every process found the checkpoint good (None) or this one did not; on
    many processes, a checkpoint is good only when all of them verified it."""
    if jax.process_count() == 1:
        return reason
    good = multihost_utils.process_allgather(np.int32(reason is None))
    if reason is None and not np.all(good):
        return f"process(es) {np.flatnonzero(np.asarray(good) == 0).tolist()} could not verify it"
    return reason


class Checkpointer:
    """Save and restore ``(TrainState, progress dict)`` pairs under ``workdir/checkpoints``.

    ``set_aside``: move checkpoints that fail verification to ``checkpoints/corrupt-STEP`` (the
    training engine, which holds the run's lock); otherwise they are only skipped.
    """

    def __init__(self, workdir: str | Path, *, max_to_keep: int = 2, set_aside: bool = False):
        self.directory = (Path(workdir) / CHECKPOINT_DIR).absolute()
        self.set_aside = set_aside
        self._digest_thread: threading.Thread | None = None
        self._digest_error: BaseException | None = None
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

    def step_directory(self, step: int) -> Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, progress: dict, metrics: dict | None = None) -> None:
        """Save ``step``, replacing an earlier checkpoint of the same step (a run stopped at the
        end of an epoch saves before its evaluation; the resumed run saves again after it), and
        start sealing it with its digest in the background."""
        self.wait_for_digest()
        if jax.process_index() == 0:
            (self.directory / SEALED_MARKER).touch()
        with written_under(self.directory):
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
        if jax.process_index() == 0:
            self._digest_thread = threading.Thread(
                target=self._seal, args=(self.step_directory(step),), name="checkpoint-digest"
            )
            self._digest_thread.start()

    def _seal(self, directory: Path) -> None:
        try:
            with written_under(directory):
                write_digest(directory)
        except BaseException as error:  # re-raised by wait_for_digest in the saving thread
            self._digest_error = error

    def wait_for_digest(self) -> None:
        """Block until the newest checkpoint is sealed; raise what went wrong sealing it."""
        if self._digest_thread is not None:
            self._digest_thread.join()
            self._digest_thread = None
        if self._digest_error is not None:
            error, self._digest_error = self._digest_error, None
            raise error

    def reached_preemption(self, step: int) -> bool:
        """Whether the job was told to stop (multi-host preemption notice, synced across hosts)."""
        return self._manager.reached_preemption(step)

    def restore(
        self, template_state: Any | Callable[[dict], Any], at_most: int | None = None
    ) -> tuple[Any, dict] | None:
        """The newest checkpoint that verifies (of a step at most ``at_most``, when given),
        shaped like ``template_state`` (or like ``template_state(progress)`` of the
        checkpoint's progress record, when the state's shape depends on it, e.g. on the
        phase's optimizer); None if the run has none, or only checkpoints whose save did not
        finish (as if they had never been written).

        Raises :class:`CheckpointError` when checkpoints exist but none verifies and some are
        damaged, or when one that verifies does not fit ``template_state``."""
        self.wait_for_digest()
        candidates = sorted(
            (step for step in self.all_steps() if at_most is None or step <= at_most),
            reverse=True,
        )
        if not candidates:
            return None
        predating = not (self.directory / SEALED_MARKER).exists()
        if predating and self.set_aside:
            self._seal_predating(candidates)
        elif predating:
            warn(f"the checkpoints in {self.directory} predate digests: read without verification")
        rejected = []
        for candidate in candidates:
            reason = verify_digest(self.step_directory(candidate))
            if predating and reason == UNFINISHED:
                reason = None
            reason = _agreed(reason)
            if reason is None:
                self._warn_rejected(rejected)
                return self._read(candidate, template_state)
            rejected.append((reason, self._reject(candidate, reason)))
        if all(reason == UNFINISHED for reason, _ in rejected):
            self._warn_rejected(rejected)
            return None
        advice = (
            f"delete {self.directory} to start the run again, or use another --workdir"
            if self.set_aside
            else f"train the run again (delete {self.directory} first) to get one that can be read"
        )
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: "
            f"{'; '.join(what for _, what in rejected)}; {advice}"
        )

    def _seal_predating(self, steps: list[int]) -> None:
        """Seal, as they are, the checkpoints of a run written before digests existed (by Orbax's
        atomic save: as trustworthy as they ever were), and mark the run as sealed."""
        if jax.process_index() == 0:
            for step in steps:
                if not (self.step_directory(step) / DIGEST_FILE).exists():
                    write_digest(self.step_directory(step))
            (self.directory / SEALED_MARKER).touch()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("sparsejax sealed old checkpoints")
        warn(f"sealed {len(steps)} checkpoint(s) in {self.directory} that predate digests, as found")

    def _reject(self, step: int, reason: str) -> str:
        """What is wrong with ``step``, which failed verification; moved aside when asked."""
        what = f"checkpoint {step} failed verification: {reason}"
        if not self.set_aside:
            return f"{what}; skipped"
        if jax.process_index() == 0:
            target = self.directory / f"{CORRUPT_PREFIX}{step}"
            if target.exists():
                shutil.rmtree(target)
            self.step_directory(step).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"sparsejax set aside checkpoint {step}")
        self._manager.reload()
        return f"{what}; moved to {self.directory / f'{CORRUPT_PREFIX}{step}'}"

    @staticmethod
    def _warn_rejected(rejected: list[tuple[str, str]]) -> None:
        """One warning line for each checkpoint passed over on the way to the one used (when
        none is used, the error lists them instead)."""
        for _, what in rejected:
            warn(what)

    def _read(self, step: int, template_state: Any | Callable[[dict], Any]) -> tuple[Any, dict]:
        try:
            if callable(template_state):
                progress = self._manager.restore(
                    step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())
                )["progress"]
                template_state = template_state(progress)
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_state)
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()
                ),
            )
        except Exception as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} is intact but does not fit "
                f"this run ({type(error).__name__}: {first_line}); it was written by another "
                "configuration or version of sparsejax: use a new --workdir, or delete "
                f"{self.directory} to start again"
            ) from error
        return restored["state"], restored["progress"]

    def close(self) -> None:
        try:
            self.wait_for_digest()
        finally:
            self._manager.close()
