"""Pre-activation bottleneck ResNets of depth 9n + 2 for CIFAR (He et al. 2016, "Identity mappings
in deep residual networks", arXiv 1603.05027), in the layout of the Network Slimming code.

Architecture: conv3x3(3 -> 16), three stages of n bottleneck blocks of widths p = 16/32/64 with
expansion 4 (stream widths 64/128/256; the first block of stages 2 and 3 has stride 2), then
BN - ReLU, global average pooling and a dense layer 256 -> classes. A block is
BN1 - ReLU - conv1x1 (-> p) - BN2 - ReLU - conv3x3 (stride s) - BN3 - ReLU - conv1x1 (-> 4p),
plus the shortcut: the identity, or, where the block changes the shape, a 1x1 convolution
(stride s) of the block's raw input. Convolutions have no bias. ResNet-164 (n = 18) has 1,703,258
parameters for 10 classes (1,726,388 for 100) and 248M multiply-accumulates on a 32x32 image.

Gates: a plain NNX module (BatchNorm's mode from ``train()`` / ``eval()``), gated from its
trace (:class:`~sparsejax.structure.traced_model.TracedModel`). In a pre-activation network a
convolution's output is not normalised by a BatchNorm of its own: it is added to the stream or
read by the next block's BN. So the ``gate_placements`` follow Network Slimming (Liu et al.
2017), which prunes the channels of every BatchNorm that feeds a convolution: a channel gate on
each pre-activation BN's output, BN - gate - ReLU - conv, where no normalisation can undo it.
The traced gate multiplies the convolution's input rows, which is the same, as a gate z >= 0
commutes with the ReLU. Each slot is placed on that convolution's input side:
- ``block{i}.conv1_in`` (width of the stream): BN1's output, the inputs of conv1, gated on
  conv1's rows alone (an input selection: the shortcut reads the raw stream, which no gate
  touches), as Network Slimming's channel selection after BN1 does. ``|g|``: one row.
- ``block{i}.conv2_in`` / ``block{i}.conv3_in`` (p): BN2's / BN3's outputs, i.e. the output
  channels of conv1 / conv2 and the inputs of conv2 / conv3.
- ``fc_in`` (256): the final BN's output, the inputs of the dense layer (Network Slimming's
  channel selection before the classifier), an input selection of fc's rows.
Initial drop rate 0.5 (the hard-concrete default). The trace finds the rest: one residual
stream per stage (the stem, a quarter of the first stream's width, is read by the first block's
conv1 and projection shortcut). With ``granularity="weight"`` every kernel gets its own weight
gates instead, and no unit is gated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.cifar_resnet import CIFAR_SHAPE, PAD_ONE, batch_norm
from sparsejax.models.layers import Conv, Dense
from sparsejax.models.placement import GatePlacement
from sparsejax.models.residual import block_sites, projection

WIDTHS = (16, 32, 64)
EXPANSION = 4
DROPRATE = 0.5
CONVS = ("conv1", "conv2", "conv3")


class PreActBottleneck(nnx.Module):
    """(BN - ReLU - conv) for conv1x1, conv3x3(s), conv1x1, plus the identity or a 1x1
    projection of the raw input."""

    def __init__(self, in_features: int, width: int, stride: int, *, rngs: nnx.Rngs):
        out_features = EXPANSION * width
        self.bn1 = batch_norm(in_features, rngs)
        self.conv1 = Conv(in_features, width, 1, use_bias=False, rngs=rngs)
        self.bn2 = batch_norm(width, rngs)
        self.conv2 = Conv(width, width, 3, stride=stride, padding=PAD_ONE, use_bias=False,
                          rngs=rngs)
        self.bn3 = batch_norm(width, rngs)
        self.conv3 = Conv(width, out_features, 1, use_bias=False, rngs=rngs)
        self.shortcut = projection(in_features, out_features, stride, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for norm, conv in zip((self.bn1, self.bn2, self.bn3), CONVS):
            h = getattr(self, conv)(nnx.relu(norm(h)))
        if self.shortcut is None:
            return h + x
        return h + self.shortcut(x)


class PreActResNet(nnx.Module):
    """Pre-activation bottleneck ResNet-(9n+2) for CIFAR, a plain NNX module whose
    ``gate_placements`` gate the output of every pre-activation BatchNorm (module docstring)."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        depth: int = 164,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = CIFAR_SHAPE,
        widths: tuple[int, int, int] = WIDTHS,
    ):
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(f"a bottleneck CIFAR ResNet has depth 9n + 2 with n >= 1, got {depth}")
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.depth = depth
        blocks_per_stage = (depth - 2) // 9
        in_channels = input_shape[-1]
        channels = widths[0]
        self.stem = Conv(in_channels, channels, 3, padding=PAD_ONE, use_bias=False, rngs=rngs)
        blocks, placements = [], []
        for site in block_sites((blocks_per_stage,) * len(widths)):
            blocks.append(PreActBottleneck(channels, widths[site.stage], site.stride, rngs=rngs))
            placements += [
                GatePlacement(f"{site.name}.{conv}_in", f"{site.path}.{conv}", "input", DROPRATE)
                for conv in CONVS
            ]
            channels = EXPANSION * widths[site.stage]
        self.blocks = nnx.List(blocks)
        self.final_bn = batch_norm(channels, rngs)
        self.fc = Dense(channels, num_classes, rngs=rngs)
        self.gate_placements = (*placements, GatePlacement("fc_in", "fc", "input", DROPRATE))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.fc(jnp.mean(nnx.relu(self.final_bn(h)), axis=(1, 2)))


def resnet164(**kwargs) -> PreActResNet:
    """ResNet-164 (n = 18); kwargs as :class:`PreActResNet` without ``depth``."""
    return PreActResNet(depth=164, **kwargs)
