"""A run's network at any step, not only at its checkpoints.

The newest checkpoint at or before the first asked step is restored and the run's own training
steps are replayed from it. A step's minibatch and noise are pure functions of the seed and the
step, so the replayed states are the states the run went through (bit for bit on the same
devices): e.g. the network right before and right after a pruning step inside an epoch. Steps
that the run took several per dispatch (:mod:`sparsejax.train.dispatch`) are replayed one at a
time: the same bits where XLA compiles the scanned step as it compiles the single one (checked
on the CPU for the MLP and the LM).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections

from sparsejax.methods.base import MethodState
from sparsejax.models.base import GatedModel
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.loop import evaluate, set_up
from sparsejax.train.phases import PHASE_STARTS
from sparsejax.train.sharding import local_copy
from sparsejax.train.state import merge_model
from sparsejax.train.step import make_eval_step


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The network of a run after ``step`` updates (its raw parameters), with the test error
    (percent) and mean test loss the run reports for it (of the parameter average when the run
    averages, ``config.ema_decay``) and the method's state."""

    step: int
    err: float
    loss: float
    model: GatedModel
    method_state: MethodState


def replay(
    config: ml_collections.ConfigDict, workdir: str | Path, steps: Sequence[int]
) -> list[Snapshot]:
    """Snapshots of the run of ``config`` in ``workdir`` after each of ``steps`` updates (in
    increasing order), replayed from the newest checkpoint that verifies at or before the first
    of them (or from the run's initial state; a larger ``config.keep_checkpoints`` shortens the
    replay).

    Raises ValueError when a step lies outside the run's ``epochs``."""
    setup = set_up(config)
    steps = sorted(steps)
    last = setup.plan.planned_epochs([0]) * setup.steps_per_epoch
    if not steps or steps[0] < 0 or steps[-1] > last:
        raise ValueError(f"steps must lie in [0, {last}] (the run's epochs), got {steps}")
    state, step, progress = setup.initial_state, 0, {"epoch": 0, PHASE_STARTS: [0]}
    checkpointer = Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
    try:
        restored = checkpointer.restore(setup.state_template, at_most=steps[0])
    finally:
        checkpointer.close()
    if restored is not None:
        state, progress = restored
        step = int(local_copy(state.step))
    phase, state, progress = setup.advance(state, progress, _quiet)

    eval_step = make_eval_step(setup.graphdef, setup.config.ema_decay)
    snapshots = []
    for target in steps:
        for images, labels in setup.inputs.train_batches(step, target):
            if step // setup.steps_per_epoch != progress["epoch"]:  # the next epoch begins
                progress = {**progress, "epoch": step // setup.steps_per_epoch}
                phase, state, progress = setup.advance(state, progress, _quiet)
            if phase is None:
                raise ValueError(f"the run ends before step {target}")
            state, _ = setup.train_step(phase)(state, images, labels)
            step += 1
        evaluation = evaluate(eval_step, state, setup.inputs)
        params, model_state, method_state = jax.device_get(
            local_copy((state.params, state.model_state, state.method_state))
        )
        model = merge_model(setup.graphdef, params, model_state)  # host copies: steps donate
        snapshots.append(
            Snapshot(target, evaluation["err"], evaluation["loss"], model, method_state)
        )
    return snapshots


def _quiet(message: str) -> None:
    """Phase announcements are not shown while replaying."""
