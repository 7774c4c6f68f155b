"""Wide residual networks WRN-d-k for CIFAR (Zagoruyko & Komodakis 2016, arXiv 1605.07146).

Architecture: conv3x3(3 -> 16), three stages of n = (d - 4) / 6 pre-activation basic blocks of
widths 16k, 32k and 64k (the first block of stages 2 and 3 has stride 2), then BN - ReLU, global
average pooling and a dense layer 64k -> classes. A block is BN1 - ReLU - conv3x3 (stride s) -
BN2 - ReLU - conv3x3, plus the shortcut: the identity, or, where the block changes the shape, a
1x1 convolution (stride s) of the pre-activated input ReLU(BN1(x)), as in the reference code.
Convolutions have no bias and pad one pixel on each side; no dropout. WRN-28-10 (n = 4, k = 10)
has 36,479,194 parameters for 10 classes and 5.24G multiply-accumulates on a 32x32 image.

A plain NNX module (BatchNorm's mode from ``train()`` / ``eval()``), gated from its trace
(:class:`~sparsejax.structure.traced_model.TracedModel`). Its ``gate_placements`` follow L0-HC
(Louizos et al. 2018): channel gates on the output of the first convolution of every block (slot
``"block{i}.conv1"``, blocks numbered 1..3n through the network; 4 x 160 + 4 x 320 + 4 x 640 =
4480 gates for WRN-28-10), initial drop rate 0.3. The reference multiplies the gate into conv1's
output *before* BN2, where a train-mode BatchNorm divides a batch-shared gate back out: the data
loss then gives the gate almost no gradient and a closed gate leaves the channel at BN2's bias
instead of zero. Here the gate acts *after* BN2 on the same channels, so that closing it removes
the channel: the traced gate multiplies conv2's kernel rows that read the channel, which, as a
gate z >= 0 commutes with the ReLU between them, is BN2 - gate - ReLU - conv2. This placement
deliberately differs from the reference code. ``|g|`` is the channel's conv1 kernel slice
(9 * C_in weights). The trace finds the rest: one residual stream per stage (the stem joins stage
1's when the first block keeps its width, k = 1), whose channels no gate removes.
With ``granularity="weight"`` every kernel (stem, convolutions, shortcuts, fc) gets its own
weight gates instead, and no unit is gated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.cifar_resnet import CIFAR_SHAPE, PAD_ONE, batch_norm
from sparsejax.models.layers import Conv, Dense
from sparsejax.models.placement import GatePlacement
from sparsejax.models.residual import block_sites, projection

STEM_WIDTH = 16
BASE_WIDTHS = (16, 32, 64)
DROPRATE = 0.3
"""droprate_init of the L0-HC WRN script."""


class PreActBasicBlock(nnx.Module):
    """BN1 - ReLU - conv3x3(s) - BN2 - ReLU - conv3x3, plus the identity or a 1x1 projection of
    ReLU(BN1(x))."""

    def __init__(self, in_features: int, out_features: int, stride: int, *, rngs: nnx.Rngs):
        self.bn1 = batch_norm(in_features, rngs)
        self.conv1 = Conv(in_features, out_features, 3, stride=stride, padding=PAD_ONE,
                          use_bias=False, rngs=rngs)
        self.bn2 = batch_norm(out_features, rngs)
        self.conv2 = Conv(out_features, out_features, 3, padding=PAD_ONE, use_bias=False, rngs=rngs)
        self.shortcut = projection(in_features, out_features, stride, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        activated = nnx.relu(self.bn1(x))
        h = self.conv2(nnx.relu(self.bn2(self.conv1(activated))))
        if self.shortcut is None:
            return h + x
        return h + self.shortcut(activated)


class WideResNet(nnx.Module):
    """WRN-depth-widen_factor for CIFAR, a plain NNX module whose ``gate_placements`` gate each
    block's conv1 channels (module docstring).

    ``stem_width`` and ``base_widths`` (the stage widths before widening) default to the paper's
    16 and (16, 32, 64).
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = CIFAR_SHAPE,
        stem_width: int = STEM_WIDTH,
        base_widths: tuple[int, int, int] = BASE_WIDTHS,
    ):
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"a wide ResNet has depth 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive integer, got {widen_factor}")
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.depth, self.widen_factor = depth, widen_factor
        blocks_per_stage = (depth - 4) // 6
        in_channels = input_shape[-1]
        self.stem = Conv(in_channels, stem_width, 3, padding=PAD_ONE, use_bias=False, rngs=rngs)
        blocks, placements = [], []
        channels = stem_width
        for site in block_sites((blocks_per_stage,) * len(base_widths)):
            stage_width = base_widths[site.stage] * widen_factor
            blocks.append(PreActBasicBlock(channels, stage_width, site.stride, rngs=rngs))
            placements.append(GatePlacement(f"{site.name}.conv1", f"{site.path}.conv1", "output",
                                            DROPRATE))
            channels = stage_width
        self.blocks = nnx.List(blocks)
        self.final_bn = batch_norm(channels, rngs)
        self.fc = Dense(channels, num_classes, rngs=rngs)
        self.gate_placements = tuple(placements)
        self.droprate_init = DROPRATE  # of the weight gates too, as the L0-HC script's

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        h = nnx.relu(self.final_bn(h))
        return self.fc(jnp.mean(h, axis=(1, 2)))


def wrn28_10(**kwargs) -> WideResNet:
    """WRN-28-10; kwargs as :class:`WideResNet` without ``depth`` and ``widen_factor``."""
    return WideResNet(depth=28, widen_factor=10, **kwargs)
