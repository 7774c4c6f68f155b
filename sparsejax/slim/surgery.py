"""Physical slimming: a pruned gated model becomes a smaller model of the same class.

:func:`slim_model` copies the model, folds its deterministic gates into the weights
(:mod:`sparsejax.slim.folding`), decides which units go (:mod:`sparsejax.slim.plan`) and applies
the plan (:func:`apply_plan`): kernels lose their removed input rows and output columns, biases and
the output BatchNorm (scale, bias, running mean and variance) their removed outputs, an input
BatchNorm its reader's removed inputs, a depthwise convolution its channels and as many feature
groups, a dense reader absorbs the constant outputs of removed dead neurons into its bias, and a
layer that reads only part of what its producers deliver gets an input selection. The copy has no
gates (its forward pass skips gating) and none of the state a method attached; its ``layers`` and
``gate_slots`` declare the new widths, so :func:`~sparsejax.structure.accounting.count_network` of
its layers with no gate values gives its parameters and FLOPs. The input model is not modified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.models.base import GatedModel, GateSlot, Layer
from sparsejax.models.transformer import TransformerModel
from sparsejax.slim.folding import fold_gates, layer_weights, test_gate_values
from sparsejax.slim.plan import SlimPlan, plan_slimming
from sparsejax.slim.result import (
    SlimResult,
    slim_report,
)
from sparsejax.slim.transformer import slim_transformer


def strip_to_network(model: GatedModel) -> None:
    """Remove the gates (and with them anything only they reach, e.g. a gate generator), in
    place. Methods attach nothing else to a model: their state lives in the train state."""
    model.gates = nnx.Dict({})


def _sliced(variable: nnx.Variable, index: np.ndarray, axis: int = -1) -> nnx.Variable:
    """A new variable of the same type holding ``variable``'s array taken at ``index`` along
    ``axis`` (numpy indexing: no per-shape compilation)."""
    value = np.take(np.asarray(variable[...]), index, axis=axis)
    return type(variable)(jnp.asarray(value))


def _slice_norm(norm: nnx.BatchNorm, index: np.ndarray) -> None:
    for name in ("scale", "bias", "mean", "var"):
        variable = getattr(norm, name)
        if variable is not None:
            setattr(norm, name, _sliced(variable, index))
    norm.num_features = int(index.size)


def _absorb(model: GatedModel, layer: Layer, units: tuple[int, ...]) -> None:
    """reader bias += relu(producer bias[units]) @ reader kernel[units]: the constant outputs
    of dead neurons of a dense producer (followed by ReLU) moved into its dense reader."""
    reader = model.layer_module(layer.name)
    producer = model.layer_module(layer.reads[0])
    index = np.asarray(units)
    constants = np.maximum(np.asarray(producer.bias[...])[index], 0.0)
    absorbed = np.asarray(reader.bias[...]) + constants @ np.asarray(reader.kernel[...])[index]
    reader.bias[...] = jnp.asarray(absorbed, reader.bias[...].dtype)


def _slice_layer(module: nnx.Module, layer: Layer, rows: np.ndarray, columns: np.ndarray) -> None:
    if layer.groups > 1:
        module.groups = int(columns.size)
        rows = np.zeros(1, np.int64)
    module.kernel = _sliced(_sliced(module.kernel, rows, axis=-2), columns)
    if module.bias is not None:
        module.bias = _sliced(module.bias, columns)
    module.in_features = int(rows.size * (module.groups if layer.groups > 1 else 1))
    module.out_features = int(columns.size)


def _slim_layer(layer: Layer, rows: int, columns: int) -> Layer:
    groups = columns if layer.groups > 1 else 1
    return dataclasses.replace(
        layer,
        kernel_shape=(*layer.kernel_shape[:-2], rows // groups, columns),
        inputs=(),
        outputs=(),
        kernel_slot=None,
        groups=groups,
    )


def _slim_slot(slot: GateSlot, layer: Layer, plan: SlimPlan) -> GateSlot:
    if slot.axis is None:
        shape = layer.kernel_shape
    elif slot.axis == len(slot.kernel_shape) - 1:
        shape = (len(plan.kept_outputs[layer.name]),)
    else:
        shape = (len(plan.kept_inputs[layer.name]),)
    return dataclasses.replace(slot, shape=tuple(shape), kernel_shape=layer.kernel_shape)


def apply_plan(model: GatedModel, plan: SlimPlan) -> None:
    """Slice ``model`` (gates already folded or absent) to the plan's widths, in place."""
    for layer in model.layers:
        if layer.name in plan.absorbed:
            _absorb(model, layer, plan.absorbed[layer.name])
    input_norm_rows: dict[str, tuple[int, ...]] = {}
    slim_layers = []
    for layer in model.layers:
        rows = np.asarray(plan.kept_inputs[layer.name], np.int64)
        columns = np.asarray(plan.kept_outputs[layer.name], np.int64)
        _slice_layer(model.layer_module(layer.name), layer, rows, columns)
        if layer.norm is not None:
            _slice_norm(model.module_at(layer.norm), columns)
        if layer.input_norm is not None:
            seen = input_norm_rows.setdefault(layer.input_norm, plan.kept_inputs[layer.name])
            if seen != plan.kept_inputs[layer.name]:
                raise ValueError(
                    f"the layers reading BatchNorm {layer.input_norm!r} keep different inputs; "
                    "declare input_selection on them or keep the units"
                )
        slim_layers.append(_slim_layer(layer, rows.size, columns.size))
    for path, rows in input_norm_rows.items():
        _slice_norm(model.module_at(path), np.asarray(rows, np.int64))
    by_name = {layer.name: layer for layer in slim_layers}
    model.gate_slots = tuple(
        _slim_slot(slot, by_name[slot.layer], plan) for slot in model.gate_slots
    )
    model.layers = tuple(slim_layers)
    model.input_selections = tuple(sorted(plan.selections.items()))


def slim_model(
    model: GatedModel,
    keep: Mapping[str, np.ndarray] | None = None,
    *,
    width_multiple: int = 1,
) -> SlimResult:
    """The physically slimmed copy of ``model`` (see the module docstring).

    ``keep`` optionally removes further units: per producer (a layer outside any residual stream,
    or a stream by its coupling name) a boolean vector, False where a unit must go even though
    its output is not zero (the outputs then change). ``width_multiple`` rounds every slimmed
    width up to a multiple of it by keeping removable units
    (:func:`~sparsejax.slim.plan.plan_slimming`).

    Transformers (:class:`~sparsejax.models.transformer.TransformerModel`) are cut by
    :func:`~sparsejax.slim.transformer.slim_transformer` into a model of the same class with
    smaller per-block widths; ``keep`` and ``width_multiple`` do not apply to them.
    """
    if isinstance(model, TransformerModel):
        if keep is not None or width_multiple != 1:
            raise ValueError("keep and width_multiple are not supported for transformers")
        return slim_transformer(model)
    slim = nnx.clone(model)
    fold_gates(slim, test_gate_values(model))
    strip_to_network(slim)
    plan = plan_slimming(
        slim.layers, tuple(slim.channel_couplings), layer_weights(slim), keep, width_multiple
    )
    apply_plan(slim, plan)
    report = slim_report(model, slim, round_to=width_multiple)
    return SlimResult(slim, plan, report)


def rebuild(model: GatedModel, plan: SlimPlan) -> GatedModel:
    """``model`` (built without gates, e.g. from its config) cut to the plan's widths, in place;
    its arrays are then placeholders for a slim checkpoint's."""
    strip_to_network(model)
    apply_plan(model, plan)
    return model
