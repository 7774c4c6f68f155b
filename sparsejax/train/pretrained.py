"""Start a model from the network weights of another run (a pretrained network to prune).

A method names the run (:meth:`~sparsejax.methods.base.Method.pretrained_run`, e.g. GReg's
``config.pretrained``); :func:`~sparsejax.train.loop.build` loads its weights into the built
model before the method prepares it. Reading the run's checkpoints is the engine's job, as it
owns their layout (:mod:`sparsejax.train.checkpoint`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sparsejax.errors import ConfigError, UserError, warn
from sparsejax.gates.base import GateParam
from sparsejax.train.checkpoint import CHECKPOINT_DIR
from sparsejax.train.digest import verify_digest

STATE_ITEM = "state"
"""The checkpoint item holding the train state (:meth:`.checkpoint.Checkpointer.save`)."""


def _key_name(entry: Any) -> Any:
    return getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))


def _lookup(tree: Any, path: tuple) -> Any:
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key, tree.get(str(key)))
    return tree


class PretrainedRunNotFoundError(UserError, FileNotFoundError):
    """``config.pretrained`` names a directory without a checkpoint."""


def _copy_into(state: nnx.State, saved: Any, what: str, source: Path) -> nnx.State:
    def restored(keypath, leaf):
        path = tuple(_key_name(entry) for entry in keypath)
        value = _lookup(saved, path)
        if value is None or np.shape(value) != np.shape(leaf):
            found = "missing" if value is None else f"shaped {np.shape(value)}"
            raise ConfigError(
                f"the checkpoint in {source} does not fit this model: {what} "
                f"{'/'.join(map(str, path[:-1]))} is {found}, the model has {np.shape(leaf)}; "
                "config.pretrained must name a run of the same model and dataset"
            )
        return jax.numpy.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(restored, state)


def load_network_weights(model: nnx.Module, workdir: str | Path) -> int:
    """Copy the network weights (parameters other than gate parameters) and BatchNorm
    statistics of the newest checkpoint that verifies of the run in ``workdir`` into ``model``;
    its optimizer state, gates and step are not used. Returns the step of that checkpoint."""
    directory = Path(workdir).absolute() / CHECKPOINT_DIR
    steps = []
    if directory.is_dir():
        steps = sorted(
            (
                int(path.name)
                for path in directory.iterdir()
                if path.name.isdigit() and (path / STATE_ITEM).is_dir()
            ),
            reverse=True,
        )
    for step in steps:
        reason = verify_digest(directory / str(step))
        if reason is None:
            break
        warn(f"config.pretrained: checkpoint {step} in {directory} failed verification: {reason}")
    else:
        raise PretrainedRunNotFoundError(
            f"config.pretrained={str(workdir)!r}: no checkpoint in {directory} verifies; give "
            "the --workdir of a finished run of the same model"
        )
    source = directory / str(step) / STATE_ITEM
    saved = ocp.PyTreeCheckpointer().restore(source)
    weights = nnx.state(model, nnx.All(nnx.Param, nnx.Not(GateParam)))
    statistics = nnx.state(model, nnx.BatchStat)
    nnx.update(model, _copy_into(weights, saved["params"]["net"], "weight", source))
    nnx.update(model, _copy_into(statistics, saved["model_state"], "statistic", source))
    return step
