"""Which units of a traced network no kernel reads any more, after the constants its rows
meet are folded into biases.

A unit can go exactly when every kernel row that reads it is zero, only ever multiplies zeros,
or multiplies one constant that its layer's bias takes over (:mod:`.zeros` finds the last
two). :func:`read_units` says which units are still read, :func:`absorbed_constants` makes the
fold, and :func:`units_left` does both on the network as it runs. Both slimming paths use it: a
``--model`` run's (:func:`sparsejax.slim.traced.slim_traced_model`) and
:meth:`~sparsejax.structure.sparsify.Sparsified.slim`.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from sparsejax.structure.slim_trace.zeros import RowReads, Rows, read_rows
from sparsejax.structure.sparsify import GatedSlice, gated_slices, variable_at
from sparsejax.structure.trace import TracedStructure, UnitGroup
from sparsejax.structure.trace.analyze import Apply, call_model

Dropped = dict[tuple[str, int], np.ndarray]
"""Indices of a parameter's axis (by ``(path, axis)``) that hold units slimming removes."""


def live_rows(
    net: nnx.Module, s: GatedSlice, met: Rows, dropped: Dropped | None = None
) -> np.ndarray:
    """True for each index of axis ``s.axis`` of the parameter ``s.path`` of ``net``
    whose row holds a nonzero entry outside the ``dropped`` indices of its other axes and,
    where ``met`` (:func:`.zeros.read_rows`) knows the row, meets a nonzero value."""
    value = np.asarray(variable_at(net, s.path)[...])
    for (path, axis), indices in (dropped or {}).items():
        if path == s.path and axis != s.axis and indices.size:
            value = np.moveaxis(value, axis, 0).copy()
            value[indices] = 0
            value = np.moveaxis(value, 0, axis)
    value = np.moveaxis(value, s.axis, 0)
    nonzero = np.any(value.reshape(value.shape[0], -1) != 0, axis=1)
    return nonzero & met.get((s.path, s.axis), True)


def absorbed_constants(
    net: nnx.Module, structure: TracedStructure, reads: RowReads
) -> tuple[dict[str, np.ndarray], Rows]:
    """Fold the constants that rows of ``net``'s layers (those of ``structure``) meet into the
    layers' biases (:mod:`.zeros`): for a layer with a bias whose kernel one matrix product
    reads, ``b + c W_c`` over its nonzero rows ``W_c`` that meet a nonzero constant ``c``, and
    those rows zeroed. Returns the new values by parameter path and ``reads.met`` with the
    absorbed rows marked as meeting nothing, so that a unit only such rows read goes."""
    replaced: dict[str, np.ndarray] = {}
    met = dict(reads.met)
    biases = {layer.kernel: layer.bias for layer in structure.layers if layer.bias}
    for (path, axis), (mask, values) in reads.constant.items():
        if path not in biases:
            continue
        kernel = np.moveaxis(np.asarray(variable_at(net, path)[...]), axis, 0)
        rows = kernel.reshape(kernel.shape[0], -1)
        bias = np.asarray(variable_at(net, biases[path])[...])
        chosen = mask & (values != 0) & np.any(rows != 0, axis=1)
        if not chosen.any() or bias.size != rows.shape[1]:
            continue
        shift = (values[chosen] @ rows[chosen]).reshape(bias.shape)
        replaced[biases[path]] = (bias + shift).astype(bias.dtype)
        replaced[path] = np.moveaxis(np.where(chosen[:, None], 0, rows).reshape(
            kernel.shape), 0, axis).astype(kernel.dtype)
        met[(path, axis)] = met.get((path, axis), True) & ~chosen
    return replaced, met


def read_units(
    net: nnx.Module, structure: TracedStructure, met: Rows | None = None
) -> dict[int, np.ndarray]:
    """Per removable group of ``structure`` (a trace of ``net``), True for each unit that a
    slice its gates act on (:func:`~sparsejax.structure.sparsify.gated_slices`: the rows of the
    kernels that read it) still reads, in ``net``'s current parameters: a row with a nonzero
    entry that meets a nonzero value (``met``: :func:`.zeros.read_rows`; rows it does not know
    count as meeting one). An entry in the column of a unit that goes does not count, so the
    test repeats until nothing more goes: a unit whose only readers feed units that went
    (a dead chain, as node pruning finds) goes too."""
    removable = [group for group in structure.groups if group.removable]
    read = {group.index: np.ones(group.size, bool) for group in removable}
    while True:
        dropped = _dropped_indices(removable, read)
        found = {}
        for group in removable:
            units = np.zeros(group.size, bool)
            for s in gated_slices(structure, group):
                live = live_rows(net, s, met or {}, dropped)[np.asarray(s.indices)]
                units[np.asarray(s.units)[live]] = True
            found[group.index] = units & read[group.index]
        if all(np.array_equal(found[g], read[g]) for g in read):
            return found
        read = found


def _dropped_indices(groups: list[UnitGroup], read: dict[int, np.ndarray]) -> Dropped:
    """The indices, per parameter axis, that hold a unit of ``groups`` not in ``read``."""
    dropped: dict[tuple[str, int], list[int]] = {}
    for group in groups:
        for m in group.members:
            gone = [i for i, u in zip(m.indices, m.units) if not read[group.index][u]]
            dropped.setdefault((m.path, m.axis), []).extend(gone)
    return {key: np.asarray(indices, np.int64) for key, indices in dropped.items()}


def units_left(
    net: nnx.Module,
    structure: TracedStructure,
    example_input: jax.Array | jax.ShapeDtypeStruct,
    apply: Apply = call_model,
) -> tuple[dict[int, np.ndarray], dict[str, np.ndarray], Rows]:
    """What slimming keeps of ``net`` (traced as ``structure``) with its current parameters:
    the units still read (:func:`read_units`) once the constants its rows meet in the forward
    pass ``apply(net, x)`` are folded, the folded parameter values
    (:func:`absorbed_constants`), and which rows still meet a value."""
    replaced, met = absorbed_constants(net, structure, read_rows(net, example_input, apply))
    return read_units(net, structure, met), replaced, met
