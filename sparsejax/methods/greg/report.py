"""What a GReg run has done so far: its phase, its coefficients, the channels it kept and the size
of the pruned network under GReg's counter. Reads the method's schedule state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from sparsejax.methods.base import MethodState
from sparsejax.methods.greg.accounting import greg_count, greg_kept_inputs
from sparsejax.methods.greg.schedule import FINETUNE, NOT_YET, REGULARISE, STABILISE
from sparsejax.models.base import Layer

PHASE_NAMES = {REGULARISE: "regularise", STABILISE: "stabilise", FINETUNE: "finetune"}


def kept_channels(
    state: MethodState, layer_names: Sequence[str], granularity: str
) -> dict[str, np.ndarray]:
    """``{layer name: indices of its kept output channels}`` for every layer GReg prunes by
    filters (all channels until pruning has happened): what slimming removes."""
    if granularity != "filter":
        raise ValueError(
            f"kept_channels needs filter granularity; this model was pruned by {granularity!r}"
        )
    return {
        name: np.flatnonzero(np.asarray(layer["mask"]) > 0)
        for name, layer in zip(layer_names, state["layers"])
    }


def greg_progress(state: MethodState, layer_names: Sequence[str]) -> dict[str, Any]:
    """Where the schedule is: ``phase`` (regularise | stabilise | finetune), the next step and
    its regularisation iteration (0 until pretraining is over), per-layer largest coefficient and
    finished flags, and the step at which the network was pruned (None before)."""
    iteration, reg_start = int(state["iteration"]), int(state["reg_start"])
    prune_step = int(state["prune_step"])
    layers = list(zip(layer_names, state["layers"]))
    return {
        "phase": PHASE_NAMES[int(state["phase"])],
        "iteration": iteration,
        "regularisation_iteration": iteration - reg_start,
        "max_penalty": {name: float(jnp.max(layer["penalty"])) for name, layer in layers},
        "finished": {name: bool(layer["finished"]) for name, layer in layers},
        "prune_step": None if prune_step == NOT_YET else prune_step,
    }


def pruned_size(
    layers: tuple[Layer, ...], state: MethodState, layer_names: Sequence[str], granularity: str
) -> dict[str, Any]:
    """Kernel weights and FLOPs under GReg's counter (:func:`.accounting.greg_count`)
    of the dense and of the masked network. Filters: the network with the masked channels
    removed, its ``speedup`` and kept ``widths`` per pruned layer; weights: the kept weights
    (unstructured sparsity saves no counted FLOPs)."""
    dense = greg_count(layers)
    masks = {
        name: np.asarray(layer["mask"]) for name, layer in zip(layer_names, state["layers"])
    }
    if granularity == "filter":
        kept_out = {name: int(np.sum(mask > 0)) for name, mask in masks.items()}
        pruned = greg_count(layers, kept_out, greg_kept_inputs(layers, kept_out))
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
