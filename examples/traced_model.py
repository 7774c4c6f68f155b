"""Plain Flax NNX models, with nothing declared for sparsejax, trained by any method of the
command line: ``--model=MODULE:FACTORY`` traces them and gates their prunable unit groups.

    PYTHONPATH=examples python -m experiments.mnist --model=traced_model:small_cnn \
        --method=l0_hc --dataset=fashion_mnist --epochs=2 --steps_per_epoch=50 \
        --workdir=runs/traced_cnn
    PYTHONPATH=examples python -m experiments.mnist --model=traced_model:small_vit \
        --method=l0_hc --dataset=fashion_mnist --epochs=2 --steps_per_epoch=50 \
        --workdir=runs/traced_vit
    PYTHONPATH=examples python -m experiments.mnist --model=traced_model:pixel_mlp \
        --method=l0_hc --dataset=fashion_mnist --epochs=3 --workdir=runs/pixel_mlp

The factory takes ``rngs`` and ``num_classes`` by keyword and returns a module that maps NHWC
images to logits; NNX's ``train()`` / ``eval()`` switch its BatchNorm (the engine calls them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax import GatePlacement


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


class Block(nnx.Module):
    """A pre-norm transformer block on Flax's own attention and a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=heads, in_features=dim, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, mlp, rngs=rngs)
        self.down = nnx.Linear(mlp, dim, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        h = h + self.attention(self.norm1(h))
        return h + self.down(jax.nn.gelu(self.up(self.norm2(h))))


class SmallViT(nnx.Module):
    """7x7 patches of a 28x28 image (16 tokens), a learned position table, two blocks of four
    heads, a mean over the tokens."""

    def __init__(self, *, rngs: nnx.Rngs, num_classes: int, dim: int = 64, depth: int = 2):
        self.embed = nnx.Linear(49, dim, rngs=rngs)
        self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (16, dim)))
        self.blocks = nnx.List([Block(dim, 4, 2 * dim, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        patches = x.reshape(x.shape[0], 4, 7, 4, 7).transpose(0, 1, 3, 2, 4)
        h = self.embed(patches.reshape(x.shape[0], 16, 49)) + self.positions[...]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(axis=1))


def small_vit(*, rngs: nnx.Rngs, num_classes: int) -> SmallViT:
    """The transformer's factory: its heads, head dimensions and MLP units are found and
    gated from the trace."""
    return SmallViT(rngs=rngs, num_classes=num_classes)


class PixelMLP(nnx.Module):
    """LeNet-300-100 with the gates of Louizos et al. (2018), placed by its own
    ``gate_placements``: one per pixel (the rows of ``fc1`` alone, since the image has no
    producer) and one per hidden unit, at the inputs of the layer that reads it. GReg and gmp
    leave the placements out and prune the hidden layers' outputs."""

    gate_placements = (
        GatePlacement("pixels", "fc1", "input", droprate_init=0.2),
        GatePlacement("hidden1", "fc2", "input"),
        GatePlacement("hidden2", "fc3", "input"),
    )

    def __init__(self, *, rngs: nnx.Rngs, num_classes: int):
        self.fc1 = nnx.Linear(784, 300, rngs=rngs)
        self.fc2 = nnx.Linear(300, 100, rngs=rngs)
        self.fc3 = nnx.Linear(100, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc3(jax.nn.relu(self.fc2(h)))


def pixel_mlp(*, rngs: nnx.Rngs, num_classes: int) -> PixelMLP:
    """The factory named on the command line."""
    return PixelMLP(rngs=rngs, num_classes=num_classes)
