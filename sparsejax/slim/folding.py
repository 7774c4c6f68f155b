"""Folding deterministic gates into the weights, and reading the weights the plan needs.

A gate value z multiplies a group of activations; at test time it is a constant, so it moves into
the parameters that produce those activations, exactly:

- a gate on a layer's output units (the kernel's last axis) multiplies the output of the layer's
  BatchNorm when it has one: BN scale and bias times z (z * (s x_hat + b) = (z s) x_hat + z b);
  otherwise the output itself: kernel columns and bias times z;
- a gate on a layer's input units multiplies the output of the layer's input BatchNorm when it has
  one (which must then feed no other layer): its scale and bias times z; otherwise the kernel rows
  times z (a dense layer folds batch-shared input gates the same way; for a convolution this is
  exact for any sign of z, since zero padding commutes with a per-channel scale);
- weight gates multiply the kernel entry by entry.

All of these hold for every value of z; the ReLU between a gate and the next layer is never
crossed.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.models.base import GatedModel, GateSlot, Layer
from sparsejax.slim.plan import LayerWeights


def test_gate_values(model: GatedModel) -> dict[str, np.ndarray]:
    """The deterministic gate values an evaluation forward pass of ``model`` uses."""
    values = model.gate_values(1, train=False, rngs=None, gates=None)
    return {name: np.asarray(value) for name, value in values.items()}


def _set(variable: nnx.Variable, value: np.ndarray) -> None:
    variable[...] = jnp.asarray(value.astype(np.asarray(variable[...]).dtype))


def _scale_norm(norm: nnx.BatchNorm, z: np.ndarray) -> None:
    _set(norm.scale, np.asarray(norm.scale[...]) * z)
    _set(norm.bias, np.asarray(norm.bias[...]) * z)


def _fold_slot(model: GatedModel, slot: GateSlot, layer: Layer, z: np.ndarray) -> None:
    module = model.layer_module(layer.name)
    kernel = np.asarray(module.kernel[...])
    if slot.axis is None:
        _set(module.kernel, kernel * z)
        return
    if slot.axis == kernel.ndim - 1:
        if layer.norm is not None:
            _scale_norm(model.module_at(layer.norm), z)
            return
        _set(module.kernel, kernel * z)
        if module.bias is not None:
            _set(module.bias, np.asarray(module.bias[...]) * z)
        return
    if layer.input_norm is not None:
        sharing = [l.name for l in model.layers if l.input_norm == layer.input_norm]
        if sharing != [layer.name]:
            raise ValueError(
                f"gate slot {slot.name!r} multiplies the output of BatchNorm {layer.input_norm!r}, "
                f"which {sharing} all read; a gate there cannot be folded into one of them"
            )
        _scale_norm(model.module_at(layer.input_norm), z)
        return
    shape = [1] * kernel.ndim
    shape[slot.axis] = -1
    _set(module.kernel, kernel * z.reshape(shape))


def fold_gates(model: GatedModel, values: Mapping[str, np.ndarray]) -> None:
    """Fold the gate ``values`` (per slot) into ``model``'s weights, in place."""
    layers = {layer.name: layer for layer in model.layers}
    for slot in model.gate_slots:
        if slot.name in values:
            z = np.asarray(values[slot.name])
            if z.shape != slot.shape:
                raise ValueError(
                    f"gate slot {slot.name!r} has per-example or misshapen test-time values "
                    f"{z.shape}; slimming needs one value per unit, shape {slot.shape}"
                )
            _fold_slot(model, slot, layers[slot.layer], z)


def _norm_zero(norm: nnx.BatchNorm | None) -> np.ndarray | None:
    if norm is None:
        return None
    return (np.asarray(norm.scale[...]) == 0) & (np.asarray(norm.bias[...]) == 0)


def layer_weights(model: GatedModel) -> dict[str, LayerWeights]:
    """Each declared layer's kernel, bias and BatchNorm zeros, as numpy arrays."""
    weights = {}
    for layer in model.layers:
        module = model.layer_module(layer.name)
        bias = getattr(module, "bias", None)
        weights[layer.name] = LayerWeights(
            kernel=np.asarray(module.kernel[...]),
            bias=None if bias is None else np.asarray(bias[...]),
            norm_zero=_norm_zero(model.module_at(layer.norm) if layer.norm else None),
            input_norm_zero=_norm_zero(
                model.module_at(layer.input_norm) if layer.input_norm else None
            ),
        )
    return weights
