"""A plain Flax NNX model, with nothing declared for sparsejax, trained by any method of the
command line: ``--model=MODULE:FACTORY`` traces it and gates its prunable unit groups.

    PYTHONPATH=examples python -m experiments.mnist --model=traced_model:small_cnn \
        --method=l0_hc --dataset=fashion_mnist --epochs=2 --steps_per_epoch=50 \
        --workdir=runs/traced_cnn

The factory takes ``rngs`` and ``num_classes`` by keyword and returns a module that maps NHWC
images to logits; NNX's ``train()`` / ``eval()`` switch its BatchNorm (the engine calls them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class SmallCNN(nnx.Module):
    """A stem, a residual block with a projection, two branches concatenated, a flatten into a
    dense layer."""

    def __init__(self, *, rngs: nnx.Rngs, num_classes: int, width: int = 16):
        self.stem = nnx.Conv(1, width, (3, 3), rngs=rngs)
        self.stem_bn = nnx.BatchNorm(width, rngs=rngs)
        self.conv = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs)
        self.bn = nnx.BatchNorm(2 * width, rngs=rngs)
        self.shortcut = nnx.Conv(width, 2 * width, (1, 1), strides=2, rngs=rngs)
        self.wide = nnx.Conv(2 * width, width, (3, 3), rngs=rngs)
        self.narrow = nnx.Conv(2 * width, width // 2, (1, 1), rngs=rngs)
        self.fc1 = nnx.Linear(7 * 7 * (width + width // 2), 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.stem_bn(self.stem(x)))
        h = jax.nn.relu(self.bn(self.conv(h)) + self.shortcut(h))
        h = jnp.concatenate([jax.nn.relu(self.wide(h)), jax.nn.relu(self.narrow(h))], axis=-1)
        h = nnx.max_pool(h, (2, 2), (2, 2))
        return self.fc2(jax.nn.relu(self.fc1(h.reshape(h.shape[0], -1))))


def small_cnn(*, rngs: nnx.Rngs, num_classes: int) -> SmallCNN:
    """The factory named on the command line."""
    return SmallCNN(rngs=rngs, num_classes=num_classes)
