"""What a GReg run has done so far: its phase, its coefficients, the channels it kept and the size
of the pruned network under GReg's counter. Reads the schedule state attached to the model."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from sparsejax.methods.greg.schedule import (
    FINETUNE,
    NOT_YET,
    REGULARISE,
    STABILISE,
    GRegState,
)
from sparsejax.models.base import GatedModel
from sparsejax.methods.greg.accounting import greg_count, greg_kept_inputs

STATE_ATTRIBUTE = "greg"
"""Name of the :class:`GRegState` module attached to the model (and its key in model_state)."""

PHASE_NAMES = {REGULARISE: "regularise", STABILISE: "stabilise", FINETUNE: "finetune"}


def _state_of(model: GatedModel) -> GRegState:
    state = getattr(model, STATE_ATTRIBUTE, None)
    if not isinstance(state, GRegState):
        raise TypeError(
            f"{type(model).__name__} has no GReg state; build it with a GReg method "
            "(prepare_model attaches it)"
        )
    return state


def kept_channels(model: GatedModel) -> dict[str, np.ndarray]:
    """``{layer name: indices of its kept output channels}`` for every layer GReg prunes by
    filters (all channels until pruning has happened): what slimming removes."""
    state = _state_of(model)
    if state.granularity != "filter":
        raise ValueError(
            f"kept_channels needs filter granularity; this model was pruned by {state.granularity!r}"
        )
    return {
        name: np.flatnonzero(np.asarray(mask[...]) > 0)
        for name, mask in zip(state.layer_names, state.mask)
    }


def greg_progress(model: GatedModel) -> dict[str, Any]:
    """Where the schedule is: ``phase`` (regularise | stabilise | finetune), the next step and
    its regularisation iteration (0 until pretraining is over), per-layer largest coefficient and
    finished flags, and the step at which the network was pruned (None before)."""
    state = _state_of(model)
    iteration, reg_start = int(state.iteration[...]), int(state.reg_start[...])
    prune_step = int(state.prune_step[...])
    return {
        "phase": PHASE_NAMES[int(state.phase[...])],
        "iteration": iteration,
        "regularisation_iteration": iteration - reg_start,
        "max_penalty": {
            name: float(jnp.max(p[...])) for name, p in zip(state.layer_names, state.penalty)
        },
        "finished": {name: bool(f[...]) for name, f in zip(state.layer_names, state.finished)},
        "prune_step": None if prune_step == NOT_YET else prune_step,
    }


def pruned_size(model: GatedModel) -> dict[str, Any]:
    """Kernel weights and FLOPs under GReg's counter (:func:`.accounting.greg_count`) of the
    dense and of the masked network. Filters: the network with the masked channels removed, its
    ``speedup`` and kept ``widths`` per pruned layer; weights: the kept weights (unstructured
    sparsity saves no counted FLOPs)."""
    state = _state_of(model)
    dense = greg_count(model.layers)
    masks = {name: np.asarray(mask[...]) for name, mask in zip(state.layer_names, state.mask)}
    if state.granularity == "filter":
        kept_out = {name: int(np.sum(mask > 0)) for name, mask in masks.items()}
        pruned = greg_count(model.layers, kept_out, greg_kept_inputs(model.layers, kept_out))
        return {
            "dense_weights": dense.weights,
            "weights": pruned.weights,
            "dense_flops": dense.flops,
            "flops": pruned.flops,
            "speedup": dense.flops / pruned.flops,
            "widths": kept_out,
        }
    removed = sum(int(np.sum(mask == 0)) for mask in masks.values())
    return {
        "dense_weights": dense.weights,
        "weights": dense.weights - removed,
        "sparsity": 100.0 * removed / dense.weights,
    }
