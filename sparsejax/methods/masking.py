"""Pruning units by zeroing them: only through a model's unit gate slots."""

from __future__ import annotations

from typing import NoReturn

from sparsejax.errors import ConfigError


def refuse_unit_zeroing(what: str) -> NoReturn:
    """Refuse, with a :class:`ConfigError`, to prune units (``what``: the method and setting
    that asks for it) in a model gated at weight granularity. A unit is removed with every slice
    the trace ties to it through its unit gate slot
    (:meth:`~sparsejax.structure.traced_model.TracedModel.scale_units`); zeroing a layer's kernel
    columns and bias alone would not remove it, as a normaliser or activation after the layer
    can still pass a constant on (a BatchNorm's bias, sigmoid(0))."""
    raise ConfigError(
        f"{what} prunes units through the model's unit gate slots, which a model gated at "
        "--config.granularity=weight does not have (zeroing a layer's kernel columns would not "
        "remove its units: a normaliser or activation after the layer can still pass a constant "
        "on); leave granularity at unit, or prune single weights"
    )
