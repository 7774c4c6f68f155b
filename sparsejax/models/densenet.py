"""DenseNet for CIFAR without bottlenecks or compression (Huang et al. 2017, section 3-4).

Architecture of DenseNet-(3m + 4), growth rate k: a 3x3 convolution 3 -> 2k, then three dense
blocks of m layers joined by two transitions, then BN - ReLU - global average pooling - dense
layer -> classes. The initial width 2k is that of the network-slimming code (Liu et al. 2017);
Huang et al. use 16 (``initial_features=16``: 1,019,722 parameters for DenseNet-40, the
"1.0M"/"1.02M" of the papers, where 2k = 24 gives 1,059,298, the "1.06M").

- Dense layer: BN - ReLU - conv3x3(C -> k) on the concatenation of every feature map of its block
  so far (the block input, then each earlier layer's k new channels, in order); its k channels are
  appended, so layer j of a block reads C_0 + (j - 1) k channels.
- Transition: BN - ReLU - conv1x1(C -> C) - 2x2 average pooling (no compression).
Convolutions have no bias and pad one pixel (3x3). DenseNet-40 (m = 12, k = 12) has widths
24 -> 168 | 168 -> 312 | 312 -> 456, 1,059,298 parameters for 10 classes (BatchNorm included)
and 282.9M multiply-accumulates on a 32x32 image.

Gates: DenseNet is a plain NNX module gated from its trace
(:class:`~sparsejax.structure.traced_model.TracedModel`). Its ``gate_placements`` are network
slimming's ``channel_selection`` (Liu et al. 2017), pre-activation: one gate per *input* channel
of every dense layer, transition and the classifier (slots ``"block{b}.layer{j}"``, ``"trans{b}"``
and ``"fc"``, named after that consumer), in that consumer's order. Each is an input selection of
the consumer's rows: its gates multiply what the consumer reads, ReLU(BN(x)), which equals gating
right after its BatchNorm (BN -> gate -> ReLU -> conv) since a gate z >= 0 commutes with the
ReLU, and no normalisation undoes it. Each consumer normalises and gates the shared features on
its own, so a closed gate removes one input channel (kernel row) of that consumer only, and its
BatchNorm's entry when slimming; the producer's channel lives on as long as another consumer
reads it. ``|g|`` is the consumer's kernel row. The stem's outputs and the dense layers' new
channels are not gated by themselves. Initial drop rate 0.5. With ``granularity="weight"`` every
kernel gets its own weight gates instead and no unit is gated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.cifar_resnet import CIFAR_SHAPE, PAD_ONE, batch_norm
from sparsejax.models.layers import Conv, Dense
from sparsejax.models.placement import GatePlacement

NUM_BLOCKS = 3
NON_BLOCK_LAYERS = 4
"""The initial convolution, two transitions and the classifier: depth = 3m + 4."""

GROWTH_RATE = 12
DROPRATE = 0.5
POOL = 2
"""Transitions halve the spatial size with 2x2 average pooling."""


class DenseLayer(nnx.Module):
    """BN - ReLU - conv3x3(C -> k); returns the input with the k new channels appended."""

    def __init__(self, in_features: int, growth_rate: int, *, rngs: nnx.Rngs):
        self.bn = batch_norm(in_features, rngs)
        self.conv = Conv(in_features, growth_rate, 3, padding=PAD_ONE, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([x, self.conv(nnx.relu(self.bn(x)))], axis=-1)


class Transition(nnx.Module):
    """BN - ReLU - conv1x1(C -> C) - 2x2 average pooling."""

    def __init__(self, features: int, *, rngs: nnx.Rngs):
        self.bn = batch_norm(features, rngs)
        self.conv = Conv(features, features, 1, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv(nnx.relu(self.bn(x)))
        return nnx.avg_pool(h, window_shape=(POOL, POOL), strides=(POOL, POOL))


class DenseNet(nnx.Module):
    """DenseNet-(3m + 4) for CIFAR, no bottleneck or compression, a plain NNX module whose
    ``gate_placements`` gate the inputs of every consumer (module docstring)."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        depth: int = 40,
        growth_rate: int = GROWTH_RATE,
        initial_features: int | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = CIFAR_SHAPE,
    ):
        if depth < NON_BLOCK_LAYERS + NUM_BLOCKS or (depth - NON_BLOCK_LAYERS) % NUM_BLOCKS:
            raise ValueError(f"a DenseNet has depth 3m + 4 with m >= 1, got {depth}")
        if growth_rate < 1:
            raise ValueError(f"growth_rate must be a positive integer, got {growth_rate}")
        height, width, in_channels = input_shape
        shrink = POOL ** (NUM_BLOCKS - 1)
        if height < shrink or width < shrink:
            raise ValueError(
                f"DenseNet's {NUM_BLOCKS - 1} transitions need images of at least {shrink} pixels "
                f"a side, got {height}x{width}"
            )
        self.depth = depth
        self.layers_per_block = (depth - NON_BLOCK_LAYERS) // NUM_BLOCKS
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        channels = 2 * growth_rate if initial_features is None else initial_features
        self.stem = Conv(in_channels, channels, 3, padding=PAD_ONE, use_bias=False, rngs=rngs)
        blocks, transitions, placements = [], [], []
        for b in range(1, NUM_BLOCKS + 1):
            block = []
            for j in range(1, self.layers_per_block + 1):
                block.append(DenseLayer(channels, growth_rate, rngs=rngs))
                placements.append(GatePlacement(f"block{b}.layer{j}", f"blocks.{b - 1}.{j - 1}.conv",
                                                "input", DROPRATE))
                channels += growth_rate
            blocks.append(nnx.List(block))
            if b < NUM_BLOCKS:
                transitions.append(Transition(channels, rngs=rngs))
                placements.append(GatePlacement(f"trans{b}", f"transitions.{b - 1}.conv", "input",
                                                DROPRATE))
        self.blocks = nnx.List(blocks)
        self.transitions = nnx.List(transitions)
        self.final_bn = batch_norm(channels, rngs)
        self.fc = Dense(channels, num_classes, rngs=rngs)
        self.gate_placements = (*placements, GatePlacement("fc", "fc", "input", DROPRATE))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.stem(x)
        for b, block in enumerate(self.blocks):
            for layer in block:
                h = layer(h)
            if b < len(self.transitions):
                h = self.transitions[b](h)
        return self.fc(jnp.mean(nnx.relu(self.final_bn(h)), axis=(1, 2)))


def densenet40(**kwargs) -> DenseNet:
    """DenseNet-40, growth rate 12 (Huang et al. 2017); kwargs as :class:`DenseNet`."""
    return DenseNet(depth=40, growth_rate=GROWTH_RATE, **kwargs)
