"""Model names for the command line and configs."""

from __future__ import annotations

from collections.abc import Callable

from sparsejax.models.base import GatedModel
from sparsejax.models.lenet import MLP, LeNet5

MODELS: dict[str, Callable[..., GatedModel]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
}


def build_model(name: str, **kwargs) -> GatedModel:
    """Build the model registered as ``name``; kwargs go to its constructor."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)
