"""Model names for the command line and configs."""

from __future__ import annotations

from collections.abc import Callable

from sparsejax.models.base import GatedModel
from sparsejax.models.cifar_resnet import resnet20, resnet56, resnet110
from sparsejax.models.lenet import MLP, LeNet5
from sparsejax.models.vgg import VGG16

MODELS: dict[str, Callable[..., GatedModel]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg16": VGG16,
}


def build_model(name: str, **kwargs) -> GatedModel:
    """Build the model registered as ``name``; kwargs go to its constructor."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)
