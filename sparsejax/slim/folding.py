"""The test-time gate values that slimming folds into the weights."""

from __future__ import annotations

import numpy as np

from sparsejax.models.base import GatedModel


def test_gate_values(model: GatedModel) -> dict[str, np.ndarray]:
    """The deterministic gate values an evaluation forward pass of ``model`` uses."""
    values = model.gate_values(1, train=False, rngs=None, gates=None)
    return {name: np.asarray(value) for name, value in values.items()}
