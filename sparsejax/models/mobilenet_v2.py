"""MobileNetV2 (Sandler et al. 2018, Table 2) for ImageNet and its common CIFAR adaptation.

Architecture: conv3x3(3 -> 32, stride s0) - BN - ReLU6; inverted-residual stages (t, c, n, s)
(expansion t, output width c, n blocks, the first with stride s):
(1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1);
then conv1x1(320 -> 1280) - BN - ReLU6, global average pooling and a dense layer -> classes.
An inverted-residual block is conv1x1(C -> tC) - BN - ReLU6 (left out when t = 1),
depthwise conv3x3(tC, stride s) - BN - ReLU6, conv1x1(tC -> C') - BN (linear bottleneck), plus the
identity when s = 1 and C = C'. Widths are c * width_multiplier rounded to a multiple of 8 (the
head keeps 1280 for multipliers up to 1). Convolutions have no bias; 3x3 ones pad one pixel.

- ``variant="imagenet"``: stem stride 2, the table above; 224x224 input, 1000 classes:
  3,504,872 parameters (BatchNorm included) and 300.8M multiply-accumulates.
- ``variant="cifar"``: the usual 32x32 adaptation changes two strides from 2 to 1, the stem's and
  the first block of the (6,24,2,2) stage, so the maps after the stem and the seven stages are
  32-32-32-16-8-8-4-4 pixels a side (ImageNet: 112-112-56-28-14-14-7-7); 2,236,682 parameters and
  88.0M multiply-accumulates for 10 classes. Blocks that change the width have no shortcut, as in
  the paper (some CIFAR ports add a 1x1 convolution there).

Gates: MobileNetV2 is a plain NNX module gated from its trace
(:class:`~sparsejax.structure.traced_model.TracedModel`). Its ``gate_placements`` put one gate
on each hidden (expanded) channel of inverted-residual block i (slot ``"block{i}"``, on the
depthwise convolution's output channels) and one on each channel of the last 1x1 convolution
(slot ``"head"``). A hidden channel is one traced group: the expansion's output, the depthwise
filter (which reads only its own channel) and the projection's input row, removed together; in
a block with t = 1 the hidden channels are the block's input channels, the stem's outputs with
the standard table, which the slot removes with them. The gates multiply the output of the
depthwise (head) BatchNorm, before the ReLU6 (``norm=``: its scale and bias): ReLU6 does not
commute with a gate in (0, 1) as ReLU does, so gating the channels' readers after it would be
another network. ``|g|`` is the depthwise filter (9 weights) and the head's kernel column. The
residual streams (the projections of a stage of n > 1 blocks) are never gated, so the shortcuts
stay identities. Initial drop rate 0.5. The classifier has no dropout (the reference
implementations put dropout 0.2 before it). With ``granularity="weight"`` every kernel gets its
own weight gates instead and no unit is gated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.cifar_resnet import CIFAR_SHAPE, PAD_ONE, batch_norm
from sparsejax.models.layers import Conv, Dense
from sparsejax.models.placement import GatePlacement

StageTable = tuple[tuple[int, int, int, int], ...]
"""Inverted-residual stages as (expansion t, output width c, blocks n, first stride s)."""

IMAGENET_TABLE: StageTable = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
CIFAR_TABLE: StageTable = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
STEM_FEATURES = 32
HEAD_FEATURES = 1280
CHANNEL_DIVISOR = 8
IMAGENET_SHAPE = (224, 224, 3)
VARIANTS: dict[str, tuple[int, StageTable]] = {
    "imagenet": (2, IMAGENET_TABLE),
    "cifar": (1, CIFAR_TABLE),
}
"""Stem stride and stage table of each variant."""

DROPRATE = 0.5


def make_divisible(value: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """The multiple of ``divisor`` nearest to ``value`` (at least ``divisor``), raised by one
    step if rounding lost more than 10% (the rule of the reference implementations)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nnx.Module):
    """[conv1x1 - BN - ReLU6] - dwconv3x3(s) - BN - ReLU6 - conv1x1 - BN (+ identity)."""

    def __init__(
        self, in_features: int, out_features: int, stride: int, expansion: int, *, rngs: nnx.Rngs
    ):
        hidden = in_features * expansion
        self.expand = (
            Conv(in_features, hidden, 1, use_bias=False, rngs=rngs) if expansion != 1 else None
        )
        self.expand_bn = batch_norm(hidden, rngs) if expansion != 1 else None
        self.depthwise = Conv(hidden, hidden, 3, stride=stride, padding=PAD_ONE, use_bias=False,
                              groups=hidden, rngs=rngs)
        self.depthwise_bn = batch_norm(hidden, rngs)
        self.project = Conv(hidden, out_features, 1, use_bias=False, rngs=rngs)
        self.project_bn = batch_norm(out_features, rngs)
        self.residual = stride == 1 and in_features == out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        if self.expand is not None:
            h = jax.nn.relu6(self.expand_bn(self.expand(h)))
        h = jax.nn.relu6(self.depthwise_bn(self.depthwise(h)))
        h = self.project_bn(self.project(h))
        return x + h if self.residual else h


class MobileNetV2(nnx.Module):
    """MobileNetV2, a plain NNX module whose ``gate_placements`` gate the hidden channels of
    every block and the head (module docstring)."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        variant: str = "imagenet",
        num_classes: int = 1000,
        input_shape: tuple[int, ...] = IMAGENET_SHAPE,
        width_multiplier: float = 1.0,
        table: StageTable | None = None,
        head_features: int | None = None,
    ):
        """``table`` replaces the variant's stage table (the variant still sets the stem
        stride); ``head_features`` the width of the last 1x1 convolution."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
        if width_multiplier <= 0:
            raise ValueError(f"width_multiplier must be positive, got {width_multiplier}")
        stem_stride, default_table = VARIANTS[variant]
        table = default_table if table is None else tuple(table)
        if not table or any(t < 1 or c < 1 or n < 1 or s not in (1, 2) for t, c, n, s in table):
            raise ValueError(
                f"table must be a nonempty sequence of (t, c, n, s) with t, c, n >= 1 and "
                f"s in (1, 2), got {table}"
            )
        self.variant = variant
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        channels = make_divisible(STEM_FEATURES * width_multiplier)
        if head_features is None:
            head_features = make_divisible(HEAD_FEATURES * max(1.0, width_multiplier))
        self.stem = Conv(input_shape[-1], channels, 3, stride=stem_stride, padding=PAD_ONE,
                         use_bias=False, rngs=rngs)
        self.stem_bn = batch_norm(channels, rngs)
        blocks, placements = [], []
        for expansion, stage_width, repeats, first_stride in table:
            out_channels = make_divisible(stage_width * width_multiplier)
            for b in range(repeats):
                stride = first_stride if b == 0 else 1
                blocks.append(InvertedResidual(channels, out_channels, stride, expansion,
                                               rngs=rngs))
                path = f"blocks.{len(blocks) - 1}"
                placements.append(GatePlacement(f"block{len(blocks)}", f"{path}.depthwise",
                                                "output", DROPRATE, norm=f"{path}.depthwise_bn"))
                channels = out_channels
        self.blocks = nnx.List(blocks)
        self.head = Conv(channels, head_features, 1, use_bias=False, rngs=rngs)
        self.head_bn = batch_norm(head_features, rngs)
        self.fc = Dense(head_features, num_classes, rngs=rngs)
        self.gate_placements = (
            *placements, GatePlacement("head", "head", "output", DROPRATE, norm="head_bn"))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu6(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            h = block(h)
        h = jax.nn.relu6(self.head_bn(self.head(h)))
        return self.fc(jnp.mean(h, axis=(1, 2)))


def mobilenet_v2(**kwargs) -> MobileNetV2:
    """MobileNetV2 1.0 for ImageNet (224x224, 1000 classes); kwargs as :class:`MobileNetV2`."""
    return MobileNetV2(variant="imagenet", **kwargs)


def mobilenet_v2_cifar(**kwargs) -> MobileNetV2:
    """MobileNetV2 1.0 with the CIFAR strides (32x32, 10 classes by default); kwargs as
    :class:`MobileNetV2`."""
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("input_shape", CIFAR_SHAPE)
    return MobileNetV2(variant="cifar", **kwargs)
