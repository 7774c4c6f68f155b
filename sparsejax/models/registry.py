"""Model names for the command line and configs."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from sparsejax.models.cifar_resnet import resnet20, resnet56, resnet110
from sparsejax.models.densenet import densenet40
from sparsejax.models.imagenet_resnet import resnet34, resnet50
from sparsejax.models.lenet import MLP, LeNet5
from sparsejax.models.lm import lm_tiny
from sparsejax.models.mobilenet_v2 import mobilenet_v2, mobilenet_v2_cifar
from sparsejax.models.preact_resnet import resnet164
from sparsejax.models.vgg import VGG16, VGG19
from sparsejax.models.vit import vit_tiny
from sparsejax.models.wide_resnet import wrn28_10

MODELS: dict[str, Callable[..., nnx.Module]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg16": VGG16,
    "vgg19": VGG19,
    "wrn28_10": wrn28_10,
    "resnet164": resnet164,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "densenet40": densenet40,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v2_cifar": mobilenet_v2_cifar,
    "vit_tiny": vit_tiny,
    "lm_tiny": lm_tiny,
}


def build_model(name: str, **kwargs) -> nnx.Module:
    """The plain network of the model registered as ``name``; kwargs go to its constructor.
    Every zoo model is a plain NNX module with its ``gate_placements``
    (:mod:`sparsejax.models.placement`) and the attributes ``input_shape`` and ``num_classes``
    (a model of token ids also ``input_dtype``); gate it from its trace with
    :func:`sparsejax.structure.traced_model.build_zoo_model`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)
