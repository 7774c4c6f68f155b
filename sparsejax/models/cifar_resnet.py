"""CIFAR ResNets of depth 6n + 2 with basic blocks (He et al. 2016, section 4.2).

Architecture: conv3x3(3 -> 16) - BN - ReLU, then three stages of n basic blocks of widths
16/32/64 (the first block of stages 2 and 3 has stride 2), global average pooling and a dense
layer 64 -> classes. A basic block is conv3x3 (stride s) - BN1 - ReLU - conv3x3 - BN2, plus the
shortcut, then ReLU. The shortcut is option A of the paper: the identity, or, where the block
changes the shape, a stride-2 subsample zero-padded to the new width (half of the new channels on
each side), which has no parameters. Convolutions have no bias (a BatchNorm follows each one) and
pad one pixel on each side (so a stride-2 convolution samples the same pixels as the PyTorch
reference). ResNet-20/56/110 are n = 3/9/18: 0.27M/0.85M/1.73M parameters and 41M/125M/253M
multiply-accumulates on a 32x32 image.

Gates: the ResNets are plain NNX modules gated from their trace
(:class:`~sparsejax.structure.traced_model.TracedModel`). Their ``gate_placements`` are Dep-L0's
(Li & Ji 2021): channel gates on the output of every block's first convolution (slot
``"block{i}.conv1"``, blocks numbered 1..3n through the network) and on the output of the stem
(slot ``"stem"``). A block's gates act on their channels' reader, the block's conv2 (its kernel
rows): as a gate z >= 0 commutes with the ReLU between them, this is the reference's gate after
BN1. The stem's output is one member of the first stage's residual stream, which the trace does
not let a gate remove (block 1 adds into it through an identity shortcut, and the stream is
zero-padded into stage 2): its gates multiply the stem's BatchNorm (scale and bias, so its output,
as in the reference), and block 1's conv1, which reads that output, loses the closed channels'
inputs in the counts. The second convolution of a block and the residual streams are never
gated, so the blocks keep their shapes and the shortcuts stay parameter-free. Initial drop rate
0.5. With ``granularity="weight"`` every kernel (stem, convolutions, fc) gets its own weight
gates instead, and no unit is gated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.layers import Conv, Dense
from sparsejax.models.placement import GatePlacement
from sparsejax.models.residual import block_sites

CIFAR_SHAPE = (32, 32, 3)
WIDTHS = (16, 32, 64)
DROPRATE = 0.5
PAD_ONE = ((1, 1), (1, 1))
"""Explicit 3x3 padding: equals "SAME" at stride 1; at stride 2 it keeps PyTorch's alignment."""

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm over the channels, PyTorch's defaults (momentum 0.1 there is 0.9 here)."""
    return nnx.BatchNorm(features, rngs=rngs, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)


class BasicBlock(nnx.Module):
    """conv3x3(s) - BN - ReLU - conv3x3 - BN, plus the option-A shortcut, then ReLU."""

    def __init__(self, in_features: int, out_features: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = Conv(in_features, out_features, 3, stride=stride, padding=PAD_ONE,
                          use_bias=False, rngs=rngs)
        self.bn1 = batch_norm(out_features, rngs)
        self.conv2 = Conv(out_features, out_features, 3, padding=PAD_ONE, use_bias=False, rngs=rngs)
        self.bn2 = batch_norm(out_features, rngs)
        self.stride = stride
        extra = out_features - in_features
        self.channel_pad = (extra // 2, extra - extra // 2)

    def shortcut(self, x: jax.Array) -> jax.Array:
        """Option A: subsample by the stride and zero-pad the new channels; no parameters."""
        if self.stride != 1:
            x = x[:, :: self.stride, :: self.stride, :]
        if self.channel_pad != (0, 0):
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), self.channel_pad))
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
        return nnx.relu(h + self.shortcut(x))


class CifarResNet(nnx.Module):
    """ResNet-(6n+2) for CIFAR with option-A shortcuts, a plain NNX module whose
    ``gate_placements`` are Dep-L0's (module docstring)."""

    def __init__(
        self,
        *,
        depth: int,
        rngs: nnx.Rngs,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = CIFAR_SHAPE,
        widths: tuple[int, int, int] = WIDTHS,
    ):
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 with n >= 1, got {depth}")
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.depth = depth
        blocks_per_stage = (depth - 2) // 6
        in_channels = input_shape[-1]
        stem_width = widths[0]
        self.stem = Conv(in_channels, stem_width, 3, padding=PAD_ONE, use_bias=False, rngs=rngs)
        self.stem_bn = batch_norm(stem_width, rngs)
        placements = [GatePlacement("stem", "stem", "output", DROPRATE, norm="stem_bn",
                                    readers=("blocks.0.conv1",))]
        blocks = []
        channels = stem_width
        for site in block_sites((blocks_per_stage,) * len(widths)):
            blocks.append(BasicBlock(channels, widths[site.stage], site.stride, rngs=rngs))
            placements.append(GatePlacement(f"{site.name}.conv1", f"{site.path}.conv1", "output",
                                            DROPRATE))
            channels = widths[site.stage]
        self.blocks = nnx.List(blocks)
        self.fc = Dense(channels, num_classes, rngs=rngs)
        self.gate_placements = tuple(placements)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            h = block(h)
        return self.fc(jnp.mean(h, axis=(1, 2)))


def resnet20(**kwargs) -> CifarResNet:
    """ResNet-20 (n = 3); kwargs as :class:`CifarResNet` without ``depth``."""
    return CifarResNet(depth=20, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    """ResNet-56 (n = 9); kwargs as :class:`CifarResNet` without ``depth``."""
    return CifarResNet(depth=56, **kwargs)


def resnet110(**kwargs) -> CifarResNet:
    """ResNet-110 (n = 18); kwargs as :class:`CifarResNet` without ``depth``."""
    return CifarResNet(depth=110, **kwargs)
