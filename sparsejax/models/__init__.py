"""Gated models and their declarations (gate slots, layers)."""

from sparsejax.models.base import GatedModel, GateSlot, Layer
from sparsejax.models.cifar_resnet import CifarResNet, resnet20, resnet56, resnet110
from sparsejax.models.lenet import MLP, LeNet5
from sparsejax.models.registry import MODELS, build_model
from sparsejax.models.vgg import VGG16

__all__ = [
    "MLP",
    "MODELS",
    "VGG16",
    "CifarResNet",
    "GateSlot",
    "GatedModel",
    "Layer",
    "LeNet5",
    "build_model",
    "resnet20",
    "resnet56",
    "resnet110",
]
