"""Zeroing a layer's output units in place: the parameters a removed unit takes with it."""

from __future__ import annotations

from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.models.base import GatedModel
from sparsejax.structure.traced_model import TracedModel


def check_unit_zeroing(model: GatedModel, what: str) -> None:
    """Refuse, with a :class:`ConfigError`, to prune ``model``'s units by zeroing their
    parameters (``what``: the method and setting that asks for it) when the model does not
    declare what lies between a layer and its readers: a traced model's activations and
    normalisers are not declared, so a zeroed output could still reach the readers as a
    constant (a BatchNorm's bias, sigmoid(0))."""
    if isinstance(model, TracedModel):
        raise ConfigError(
            f"{what} removes a unit by zeroing its layer's kernel slice and bias; in a traced "
            "model (the convolutional zoo, --model=MODULE:FACTORY) a normaliser or activation "
            "after the layer can still pass a constant on. At unit granularity (the default) "
            "gmp and GReg prune a traced model's units by its gate slots instead"
        )


def unit_variables(model: GatedModel, name: str) -> list[nnx.Variable]:
    """The parameters of layer ``name`` indexed by its output units on their last axis: its
    kernel and its bias, so that zeroing unit j in both makes the unit output exactly zero, as
    if removed, in a model that declares no normaliser or activation after a layer."""
    check_unit_zeroing(model, "pruning units")
    module = model.layer_module(name)
    variables = [module.kernel]
    if getattr(module, "bias", None) is not None:
        variables.append(module.bias)
    return variables
