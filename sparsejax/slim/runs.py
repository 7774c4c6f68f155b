"""The trained model of a run directory, restored from its newest checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections

from sparsejax.data.sources import BatchSource
from sparsejax.errors import UserError
from sparsejax.models.base import GatedModel
from sparsejax.train.checkpoint import CHECKPOINT_DIR, Checkpointer
from sparsejax.train.loop import (
    CONFIG_FILE,
    build,
    check_format,
    evaluated_model,
    load_data,
    read_saved_config,
)
from sparsejax.train.phases import PhasePlan
from sparsejax.train.state import init_state


class NotARunError(UserError, ValueError):
    """A directory is not a run, or holds no checkpoint."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model a run trains: its name, classes, input shape and gate granularity."""

    model: str
    num_classes: int
    input_shape: tuple[int, ...]
    granularity: str


def run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config of the run in ``workdir`` (its ``config.json``), after checking that the
    directory is a run with at least one checkpoint."""
    workdir = Path(workdir)
    config_path = workdir / CONFIG_FILE
    if not config_path.exists():
        raise NotARunError(
            f"{workdir} is not a run directory: it has no {CONFIG_FILE} (pass the --workdir of a "
            "training run)"
        )
    checkpoints = workdir / CHECKPOINT_DIR
    if not checkpoints.is_dir() or not any(p.name.isdigit() for p in checkpoints.iterdir()):
        raise NotARunError(
            f"the run in {workdir} has no checkpoint under {checkpoints}; train it for at least "
            "one epoch first"
        )
    return ml_collections.ConfigDict(check_format(config_path, read_saved_config(config_path)))


def restore_model(
    workdir: str | Path, config: ml_collections.ConfigDict, data: BatchSource
) -> tuple[GatedModel, ModelSpec, int]:
    """The gated model of the run in ``workdir`` (with its ``config`` and dataset ``data``) at
    its newest checkpoint, the spec of its dense architecture and the checkpoint's step. The
    model is the network the run evaluated: the average of its parameters when it kept one
    (``ema_decay``), with the BatchNorm statistics of its trained model.

    The model and method are rebuilt from the config as the training loop builds them, so the
    checkpoint's train state has the template's structure.
    """
    workdir = Path(workdir)
    method, model, method_state = build(config, data)
    key = jax.random.key(config.seed)
    plan = PhasePlan(method.phases(), method.run.steps_per_epoch)
    graphdef, state = init_state(
        model, method_state, plan.optimizer(0), key, method.config.ema_decay
    )
    checkpointer = Checkpointer(workdir)
    try:
        restored = checkpointer.restore(lambda progress: plan.state_template(state, progress))
    finally:
        checkpointer.close()
    if restored is None:
        raise NotARunError(
            f"the run in {workdir} has no finished checkpoint under {workdir / CHECKPOINT_DIR}; "
            "rerun its training command to finish one"
        )
    state, _ = restored
    spec = ModelSpec(config.model, data.num_classes, tuple(data.image_shape), config.granularity)
    return evaluated_model(graphdef, state, method.config.ema_decay), spec, int(state.step)


def restore_run(workdir: str | Path) -> tuple[GatedModel, ModelSpec, int]:
    """:func:`restore_model` of the run in ``workdir``, with its config and dataset."""
    config = run_config(workdir)
    return restore_model(workdir, config, load_data(config))
