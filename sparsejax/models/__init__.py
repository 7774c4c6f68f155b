"""Gated models and their declarations (gate slots, layers)."""

from sparsejax.models.base import GatedModel, GateSlot, Layer
from sparsejax.models.lenet import MLP, LeNet5
from sparsejax.models.registry import MODELS, build_model

__all__ = ["GatedModel", "GateSlot", "Layer", "MLP", "LeNet5", "MODELS", "build_model"]
