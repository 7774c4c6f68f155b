"""What a GReg run has done so far: its phase, its coefficients, the channels it kept and the size
of the pruned network under GReg's counter. Reads the method's schedule state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from sparsejax.methods.base import MethodState
from sparsejax.methods.greg.accounting import greg_count
from sparsejax.methods.greg.schedule import FINETUNE, NOT_YET, REGULARISE, STABILISE
from sparsejax.models.base import GatedModel, Layer
from sparsejax.structure.accounting import count_network, kept_units
from sparsejax.structure.report import weight_report

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


def pruned_size(layers: tuple[Layer, ...], state: MethodState) -> dict[str, Any]:
    """Kernel weights of the dense network and of the one whose masked weights are removed
    (weight granularity: unstructured sparsity saves no counted FLOPs), under GReg's counter
    (:func:`.accounting.greg_count`). Filters, pruned through a traced model's unit slots, are
    counted by :func:`traced_pruned_size` or :func:`slot_pruned_size`."""
    dense = greg_count(layers)
    removed = sum(int(np.sum(np.asarray(layer["mask"]) == 0)) for layer in state["layers"])
    return {
        "dense_weights": dense.weights,
        "weights": dense.weights - removed,
        "sparsity": 100.0 * removed / dense.weights,
    }


def traced_pruned_size(
    layers: tuple[Layer, ...], state: MethodState, slot_names: Sequence[str]
) -> dict[str, Any]:
    """GReg's counter (:func:`.accounting.greg_count`) of a traced network pruned by gate slot
    units (:func:`_filter_size`): every layer's kept input and output units are those its
    sides' slots keep under the masks (:func:`~sparsejax.structure.accounting.kept_units`: a
    flattened map's tiles, a concatenation's indices); ``widths`` per pruned slot."""
    masks = {
        name: (np.asarray(layer["mask"]) > 0).astype(np.float32)
        for name, layer in zip(slot_names, state["layers"])
    }
    kept_out = {layer.name: round(kept_units(layer.outputs, masks, layer.out_units))
                for layer in layers}
    kept_in = {layer.name: round(kept_units(layer.inputs, masks, layer.in_units))
               for layer in layers}
    widths = {name: int(mask.sum()) for name, mask in masks.items()}
    return _filter_size(layers, kept_out, kept_in, widths)


def _filter_size(
    layers: tuple[Layer, ...],
    kept_out: dict[str, int],
    kept_in: dict[str, int],
    widths: dict[str, int],
) -> dict[str, Any]:
    """GReg's counter of the dense network and of the one that keeps ``kept_out`` output and
    ``kept_in`` input units per layer, its ``speedup`` and the kept ``widths``."""
    dense = greg_count(layers)
    pruned = greg_count(layers, kept_out, kept_in)
    return {
        "dense_weights": dense.weights,
        "weights": pruned.weights,
        "dense_flops": dense.flops,
        "flops": pruned.flops,
        "speedup": dense.flops / pruned.flops,
        "widths": widths,
    }


def slot_pruned_size(
    model: GatedModel, state: MethodState, slot_names: Sequence[str]
) -> dict[str, Any]:
    """Params and FLOPs of a transformer pruned by slot units, read from its zeros
    (:func:`~sparsejax.structure.report.weight_report`, the conventions of
    :mod:`sparsejax.structure.accounting`: MACs counted once, attention products included, not
    GReg's counter, which knows only convolutions and dense layers; a KV group whose heads are
    all pruned goes with them), the dense network's, the ``speedup`` and the kept ``widths``
    per pruned slot."""
    dense = count_network(model.layers, {}, model.activation_products)
    pruned = weight_report(model)
    return {
        "dense_params": float(dense["params"]),
        "params": float(pruned.params),
        "dense_flops": float(dense["flops"]),
        "flops": float(pruned.flops),
        "speedup": float(dense["flops"]) / float(pruned.flops),
        "widths": {
            name: int(np.sum(np.asarray(layer["mask"]) > 0))
            for name, layer in zip(slot_names, state["layers"])
        },
    }
