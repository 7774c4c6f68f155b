"""Zeroing a layer's output units in place: the parameters a removed unit takes with it."""

from __future__ import annotations

from flax import nnx

from sparsejax.models.base import GatedModel


def unit_variables(model: GatedModel, name: str) -> list[nnx.Variable]:
    """The parameters of layer ``name`` indexed by its output units on their last axis: its
    kernel, its bias and the scale and bias of the BatchNorm that normalises its output, so
    that zeroing unit j in all of them makes the unit output exactly zero, as if removed."""
    module = model.layer_module(name)
    variables = [module.kernel]
    if getattr(module, "bias", None) is not None:
        variables.append(module.bias)
    layer = next(layer for layer in model.layers if layer.name == name)
    if layer.norm is not None:
        norm = model.module_at(layer.norm)
        variables += [norm.scale, norm.bias]
    return variables
