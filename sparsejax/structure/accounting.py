"""Parameters and FLOPs of a gated network, pruned or in expectation.

Every quantity comes from one function of per-slot *unit values*: 0/1 masks of the deterministic
test-time gates give the pruned network; gate probabilities P(z != 0) give expectations under the
gate distribution (gates are independent, so the expectation of a product of an input gate and an
output gate is the product of their probabilities).

Conventions (stated once, used everywhere):
- FLOPs are multiply-accumulates counted once (MACs): a dense layer costs in * out, a convolution
  kh * kw * (C_in / groups) * C_out * H_out * W_out; biases, activations and pooling are not
  counted.
- A kernel weight is kept when its input unit and its output unit are both kept; a bias when its
  output unit is kept. An input unit of a dense layer fed by a flattened feature map is kept only if
  its own gate *and* the gate of its channel keep it.
- ``pruning_rate`` is 100 * (1 - kept kernel weights / all kernel weights), biases ignored, as in
  the L0-ARM paper.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from sparsejax.models.base import Layer, UnitIndex, UnitSource, unit_positions

ArrayLike = np.ndarray | jnp.ndarray


@dataclasses.dataclass(frozen=True)
class LayerCount:
    """Kept (or expected) kernel weights, biases and MACs of one layer."""

    name: str
    weights: float
    biases: float
    macs: float


def _unit_vector(sources: UnitSource, values: Mapping[str, ArrayLike], size: int):
    vector = jnp.ones((size,), jnp.float32)
    for slot, placement in sources:
        if slot not in values:
            continue
        slot_values = jnp.asarray(values[slot], jnp.float32)
        if isinstance(placement, UnitIndex):
            indices, units = unit_positions(placement, size)
            vector = vector.at[indices].set(vector[indices] * slot_values[units])
        else:
            vector = vector * jnp.tile(slot_values, placement)
    return vector


def kept_units(sources: UnitSource, values: Mapping[str, ArrayLike], size: int) -> float:
    """How many of a layer side's ``size`` units the per-slot unit ``values`` keep (their sum
    for fractional values): a unit is kept when each of its ``sources`` keeps it."""
    return float(jnp.sum(_unit_vector(sources, values, size)))


def _kernel_inputs(inputs: jnp.ndarray, layer: Layer) -> jnp.ndarray:
    """The input-unit value of every kernel entry, ``(in / groups, out)``: output o of a grouped
    convolution reads the inputs of its own group."""
    group_of_output = jnp.arange(layer.out_units) // (layer.out_units // layer.groups)
    return inputs.reshape(layer.groups, -1)[group_of_output].T


def count_layer(layer: Layer, values: Mapping[str, ArrayLike]) -> LayerCount:
    """Kept weights, biases and MACs of ``layer`` given per-slot unit or kernel values."""
    inputs = _unit_vector(layer.inputs, values, layer.in_units)
    outputs = _unit_vector(layer.outputs, values, layer.out_units)
    if layer.kernel_slot is not None and layer.kernel_slot in values:
        kernel = layer.geometry(jnp.asarray(values[layer.kernel_slot], jnp.float32))
        weights = jnp.sum(kernel * _kernel_inputs(inputs, layer) * outputs)
    else:
        per_group_in = jnp.sum(inputs.reshape(layer.groups, -1), axis=1)
        per_group_out = jnp.sum(outputs.reshape(layer.groups, -1), axis=1)
        weights = layer.receptive_field * jnp.sum(per_group_in * per_group_out)
    biases = jnp.sum(outputs) if layer.has_bias else jnp.zeros(())
    return LayerCount(layer.name, weights, biases, weights * layer.out_positions)


def count_network(
    layers: tuple[Layer, ...],
    values: Mapping[str, ArrayLike],
    products: tuple[Layer, ...] = (),
) -> dict[str, float]:
    """Totals over the layers: ``weights``, ``params`` (weights + biases) and ``flops`` (MACs);
    ``products`` (:attr:`~sparsejax.models.base.GatedModel.activation_products`) add their MACs
    to ``flops`` only."""
    counts = [count_layer(layer, values) for layer in layers]
    weights = sum(c.weights for c in counts)
    biases = sum(c.biases for c in counts)
    return {
        "weights": weights,
        "params": weights + biases,
        "flops": sum(c.macs for c in counts)
        + sum(count_layer(product, values).macs for product in products),
    }


def pruning_rate(layers: tuple[Layer, ...], values: Mapping[str, ArrayLike]) -> float:
    """Percent of kernel weights removed by the gates (biases ignored)."""
    kept = count_network(layers, values)["weights"]
    total = count_network(layers, {})["weights"]
    return 100.0 * (1.0 - float(kept) / float(total))


def reduction(before: float, after: float) -> float:
    """``before / after``, the factor a count shrank by (>= 1 for a pruned network); infinite
    when nothing is left (e.g. every unit before the logits removed)."""
    return before / after if after else math.inf
