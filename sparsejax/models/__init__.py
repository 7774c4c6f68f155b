"""The zoo: plain NNX models carrying their gate placements (:data:`MODELS`), gated from their
trace by :func:`sparsejax.structure.traced_model.build_zoo_model`, and what a gated model is
(:class:`GatedModel`: gate slots and layers)."""

from sparsejax.models.base import GatedModel, GateSlot, Layer, each_slot
from sparsejax.models.cifar_resnet import CifarResNet, resnet20, resnet56, resnet110
from sparsejax.models.densenet import DenseNet, densenet40
from sparsejax.models.imagenet_resnet import ImageNetResNet, resnet34, resnet50
from sparsejax.models.lenet import MLP, LeNet5
from sparsejax.models.lm import DecoderLM, lm_tiny
from sparsejax.models.mobilenet_v2 import MobileNetV2, mobilenet_v2, mobilenet_v2_cifar
from sparsejax.models.preact_resnet import PreActResNet, resnet164
from sparsejax.models.registry import MODELS, build_model
from sparsejax.models.vgg import VGG, VGG16, VGG19
from sparsejax.models.vit import ViT, vit_tiny
from sparsejax.models.wide_resnet import WideResNet, wrn28_10

__all__ = [
    "MLP",
    "MODELS",
    "VGG",
    "VGG16",
    "VGG19",
    "CifarResNet",
    "DecoderLM",
    "DenseNet",
    "GateSlot",
    "GatedModel",
    "ImageNetResNet",
    "Layer",
    "LeNet5",
    "MobileNetV2",
    "PreActResNet",
    "ViT",
    "WideResNet",
    "build_model",
    "each_slot",
    "densenet40",
    "lm_tiny",
    "mobilenet_v2",
    "mobilenet_v2_cifar",
    "resnet20",
    "resnet34",
    "resnet50",
    "resnet56",
    "resnet110",
    "resnet164",
    "vit_tiny",
    "wrn28_10",
]
