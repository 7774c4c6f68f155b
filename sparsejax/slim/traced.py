"""Slimming the trained model of a ``--model=MODULE:FACTORY`` run from its trace.

Such a run trains a :class:`~sparsejax.structure.traced_model.TracedModel`: the user's plain NNX
module ``net`` with gates multiplied into the kernel slices their units feed. Its slim network is
the :class:`~sparsejax.structure.slim_trace.SlimFunction` of ``net`` with those test-time gate
values folded in (:func:`slim_traced_model`): every gated slice is multiplied by its gate exactly
as the gated forward pass does (:func:`~sparsejax.structure.sparsify.parameters_gated`; one value
per unit, or per kernel entry at weight granularity). A unit goes when no kernel reads it any
more (:func:`read_units`): every row that reads it, in every kernel its gates act on, is zero
after folding (a closed unit gate, closed weight gates or pruned weights on all of its rows),
only ever meets zeros, or meets a constant that its dense layer's bias absorbs
(:func:`absorbed_constants`), so removing it is exact. The rows of an input selection (a
placed slot on inputs that are no group of their own: pixels, a concatenation other layers read
whole) go the same way, row by row
(:func:`selected_rows`). :func:`~sparsejax.structure.slim_trace.slim_traced` cuts the arrays, on
the groups of the model's own trace; ``round_to=K`` keeps back the removed units with the highest
P(gate != 0) until every slimmed group has a multiple of K units. The largest logit difference
to the gated model in evaluation mode is measured on a batch of the run's test images
(:func:`check_images`) and recorded in the report.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.data.sources import BatchSource
from sparsejax.slim.folding import test_gate_values
from sparsejax.structure.slim_trace import SlimFunction, slim_traced
from sparsejax.structure.slim_trace.zeros import RowReads, Rows, read_rows
from sparsejax.structure.sparsify import (
    GatedSlice,
    gated_slices,
    parameters_gated,
    variable_at,
)
from sparsejax.structure.traced_model import TracedModel

CHECK_EXAMPLES = 256
"""Test images the slim network is compared on with the gated model."""


def check_images(data: BatchSource, examples: int = CHECK_EXAMPLES) -> np.ndarray:
    """The first ``examples`` test images of ``data`` (all of them when it has fewer), as the
    run's evaluation reads them."""
    images, _ = data.test_batch(np.arange(min(examples, data.num_test)))
    return np.asarray(images)


def _live_rows(model: TracedModel, s: GatedSlice, met: Rows) -> np.ndarray:
    """True for each index of axis ``s.axis`` of the parameter ``s.path`` of ``model.net``
    whose row holds a nonzero entry and, where ``met`` (:func:`read_rows`) knows the row,
    meets a nonzero value."""
    value = np.moveaxis(np.asarray(variable_at(model.net, s.path)[...]), s.axis, 0)
    nonzero = np.any(value.reshape(value.shape[0], -1) != 0, axis=1)
    return nonzero & met.get((s.path, s.axis), True)


def absorbed_constants(
    model: TracedModel, reads: RowReads
) -> tuple[dict[str, np.ndarray], Rows]:
    """Fold the constants that rows of ``model.net``'s layers meet into the layers' biases
    (:mod:`~sparsejax.structure.slim_trace.zeros`): for a layer with a bias whose kernel one
    matrix product reads, ``b + c W_c`` over its nonzero rows ``W_c`` that meet a nonzero
    constant ``c``, and those rows zeroed. Returns the new values by parameter path and
    ``reads.met`` with the absorbed rows marked as meeting nothing, so that a unit only such
    rows read goes."""
    replaced: dict[str, np.ndarray] = {}
    met = dict(reads.met)
    for layer in model.structure.layers:
        for (path, axis), (mask, values) in reads.constant.items():
            if path != layer.kernel or layer.bias is None:
                continue
            kernel = np.moveaxis(np.asarray(variable_at(model.net, path)[...]), axis, 0)
            rows = kernel.reshape(kernel.shape[0], -1)
            bias = np.asarray(variable_at(model.net, layer.bias)[...])
            chosen = mask & (values != 0) & np.any(rows != 0, axis=1)
            if not chosen.any() or bias.size != rows.shape[1]:
                continue
            shift = (values[chosen] @ rows[chosen]).reshape(bias.shape)
            replaced[layer.bias] = (bias + shift).astype(bias.dtype)
            replaced[path] = np.moveaxis(np.where(chosen[:, None], 0, rows).reshape(
                kernel.shape), 0, axis).astype(kernel.dtype)
            met[(path, axis)] = met.get((path, axis), True) & ~chosen
    return replaced, met


def read_units(model: TracedModel, met: Rows | None = None) -> dict[int, np.ndarray]:
    """Per prunable traced group of ``model``, True for each unit that a slice its gates act on
    (:func:`~sparsejax.structure.sparsify.gated_slices`: the rows of the kernels that read it)
    still reads, in ``model.net``'s current parameters: a row with a nonzero entry that meets a
    nonzero value (``met``: :func:`~sparsejax.structure.slim_trace.zeros.read_rows`; rows it
    does not know count as meeting one)."""
    read = {}
    for group in model.structure.groups:
        if not group.prunable:
            continue
        units = np.zeros(group.size, bool)
        for s in gated_slices(model.structure, group):
            live = _live_rows(model, s, met or {})[np.asarray(s.indices)]
            units[np.asarray(s.units)[live]] = True
        read[group.index] = units
    return read


def selected_rows(
    model: TracedModel, met: Rows | None = None
) -> dict[str, tuple[int, np.ndarray]]:
    """Per input selection of ``model`` (:class:`~sparsejax.structure.traced_model.GatePlacement`
    on inputs that are no group of their own), its kernel's axis and True for each row that is
    still read (as in :func:`read_units`): the rows the slim network keeps."""
    return {s.path: (s.axis, _live_rows(model, s, met or {})) for _, s in model.selections}


@nnx.jit
def _evaluation_logits(model: TracedModel, x: jax.Array) -> jax.Array:
    return model(x, train=False)


def slim_traced_model(
    model: TracedModel, check: np.ndarray, *, round_to: int = 1
) -> SlimFunction:
    """The slim network of ``model`` under its test-time gates (see the module docstring), its
    report holding ``max_logit_difference`` on the images ``check``."""
    values = test_gate_values(model)
    gated = [
        (s, jnp.asarray(values[name])) for name, slices in model.gated if name in values
        for s in slices
    ]
    scores = {
        group: np.asarray(model.gates[name].prob_nonzero())
        for group, name in model.group_slots if name in values
    }
    example = jax.ShapeDtypeStruct((1, *check.shape[1:]), check.dtype)
    with parameters_gated(model.net, gated):
        replaced, met = absorbed_constants(model, read_rows(model.net, example))
        slim = slim_traced(
            model.net, example, structure=model.structure, keep=read_units(model, met),
            scores=scores, round_to=round_to, rows=selected_rows(model, met), replaced=replaced,
        )
    slim.check(_evaluation_logits(model, check), check)
    return slim
