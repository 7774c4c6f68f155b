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

Gates (``granularity="unit"``):
- ``"block{i}"``: one gate per hidden (expanded) channel of inverted-residual block i, multiplied
  in after the depthwise convolution's BatchNorm, before the ReLU6. A closed channel feeds zero into
  the projection, so it removes the expansion's output channel, the depthwise filter and the
  projection's input column together: the expansion declares ``outputs`` = the slot, the
  depthwise convolution ``outputs`` = the slot, the projection ``inputs`` = the slot. (A
  depthwise filter reads only its own channel, so its input unit *is* its output unit; the slot
  is declared on one side only, or the accounting would multiply a channel's keep probability by
  itself.) In a block with t = 1 the hidden channels are the block's input channels: when the
  block is the only reader of its input (no shortcut, and the input is a single layer, not a
  residual stream) that producer also declares ``outputs`` = the slot; with the standard table
  this is the stem. The slot's ``layer`` is the depthwise convolution, whose BatchNorm output the
  gate multiplies, so its :attr:`~sparsejax.models.base.GateSlot.group_size` is the 9 weights of a
  depthwise filter, while the accounting (which reads the layer declarations) counts every
  weight a closed gate removes: C_in + 9 + C_out.
- ``"head"``: one gate per channel of the last 1x1 convolution, after its BatchNorm; it removes
  the convolution's output channel and the classifier's input row.
- The stem is not gated: its channels are the hidden channels of block 1 (t = 1), which that
  block's slot already gates. Residual streams are never gated, so the shortcuts stay identities.

The classifier has no dropout (the reference implementations put dropout 0.2 before it).

Residual streams (``channel_couplings``): the projections of a stage with n > 1 blocks are summed
into one stream, named ``"stage{k}"`` (stages numbered from 1 in table order); every layer that
reads the stream lists it in ``reads``. ``norm``: every convolution is followed by its own
BatchNorm (``stem_bn``, ``expand_bn``, ``depthwise_bn``, ``project_bn``, ``head_bn``). With
``granularity="weight"`` every kernel gets its own weight gates instead and no unit is gated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.gates.apply import gate_units
from sparsejax.models.base import (
    MODEL_INPUT,
    ChannelCoupling,
    GatedModel,
    GateFactory,
    GateSlot,
    Granularity,
    Layer,
    apply_unit_gate,
    check_granularity,
    weight_slots,
)
from sparsejax.models.cifar_resnet import CIFAR_SHAPE, PAD_ONE, batch_norm
from sparsejax.models.layers import Conv, Dense
from sparsejax.models.residual import strided

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
BLOCK_CONVS = ("expand", "depthwise", "project")
"""The convolutions of an inverted-residual block, in order (``"block{i}.expand"``, ...)."""


def make_divisible(value: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """The multiple of ``divisor`` nearest to ``value`` (at least ``divisor``), raised by one
    step if rounding lost more than 10% (the rule of the reference implementations)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _weight_gated(layer: Layer) -> Layer:
    """The layer with no gated units and weight gates on its kernel."""
    return dataclasses.replace(layer, inputs=(), outputs=(), kernel_slot=layer.name)


def _block_layers(
    name: str,
    in_channels: int,
    expansion: int,
    out_channels: int,
    positions: tuple[int, int],
    source: str,
) -> list[Layer]:
    """Declarations of inverted-residual block ``name`` (unit granularity): the hidden slot
    ``name`` switches off the expansion's outputs, the depthwise filters and the projection's
    inputs. ``positions``: output positions before and after the block's stride; ``source``:
    the layer or stream the block reads."""
    hidden = in_channels * expansion
    slot = ((name, 1),)
    path = f"blocks.{int(name.removeprefix('block')) - 1}"
    layers = []
    depthwise_reads = (source,)
    if expansion != 1:
        layers.append(Layer(f"{name}.expand", (1, 1, in_channels, hidden), positions[0],
                            has_bias=False, outputs=slot, reads=(source,),
                            norm=f"{path}.expand_bn"))
        depthwise_reads = (f"{name}.expand",)
    layers.append(Layer(f"{name}.depthwise", (3, 3, 1, hidden), positions[1], has_bias=False,
                        outputs=slot, groups=hidden, reads=depthwise_reads,
                        norm=f"{path}.depthwise_bn"))
    layers.append(Layer(f"{name}.project", (1, 1, hidden, out_channels), positions[1],
                        has_bias=False, inputs=slot, reads=(f"{name}.depthwise",),
                        norm=f"{path}.project_bn"))
    return layers


class InvertedResidual(nnx.Module):
    """[conv1x1 - BN - ReLU6] - dwconv3x3(s) - BN - [gate] - ReLU6 - conv1x1 - BN (+ identity)."""

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

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        unit_gate: jax.Array | None = None,
        kernel_gates: tuple[jax.Array | None, ...] = (None, None, None),
    ) -> jax.Array:
        """``kernel_gates``: weight gates of the expansion, depthwise and projection kernels."""
        expand_gate, depthwise_gate, project_gate = kernel_gates
        h = x
        if self.expand is not None:
            h = self.expand(h, expand_gate)
            h = jax.nn.relu6(self.expand_bn(h, use_running_average=not train))
        h = self.depthwise_bn(self.depthwise(h, depthwise_gate), use_running_average=not train)
        if unit_gate is not None:
            h = gate_units(h, unit_gate)
        h = self.project(jax.nn.relu6(h), project_gate)
        h = self.project_bn(h, use_running_average=not train)
        return x + h if self.residual else h



class MobileNetV2(GatedModel):
    """MobileNetV2 with gates on the hidden channels of every block; see the module docstring."""

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
        gate_factory: GateFactory | None = None,
        granularity: Granularity = "unit",
    ):
        """``table`` replaces the variant's stage table (the variant still sets the stem
        stride); ``head_features`` the width of the last 1x1 convolution."""
        check_granularity(granularity)
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
        self.granularity = granularity
        self.variant = variant
        unit = granularity == "unit"
        height, width, in_channels = input_shape
        channels = make_divisible(STEM_FEATURES * width_multiplier)
        if head_features is None:
            head_features = make_divisible(HEAD_FEATURES * max(1.0, width_multiplier))

        self.stem = Conv(in_channels, channels, 3, stride=stem_stride, padding=PAD_ONE,
                         use_bias=False, rngs=rngs)
        self.stem_bn = batch_norm(channels, rngs)
        height, width = strided(height, stem_stride), strided(width, stem_stride)
        layers: dict[str, Layer] = {
            "stem": Layer("stem", (3, 3, in_channels, channels), height * width, has_bias=False,
                          reads=(MODEL_INPUT,), norm="stem_bn"),
        }
        unit_slots: list[GateSlot] = []
        couplings: list[ChannelCoupling] = []
        blocks = []
        source = "stem"  # what the next block reads: a layer or a residual stream
        for stage, (expansion, stage_width, repeats, first_stride) in enumerate(table, start=1):
            out_channels = make_divisible(stage_width * width_multiplier)
            stream = f"stage{stage}" if repeats > 1 else None
            projections = []
            for b in range(repeats):
                stride = first_stride if b == 0 else 1
                name = f"block{len(blocks) + 1}"
                block = InvertedResidual(channels, out_channels, stride, expansion, rngs=rngs)
                blocks.append(block)
                positions = (height * width, strided(height, stride) * strided(width, stride))
                for layer in _block_layers(name, channels, expansion, out_channels, positions,
                                           source):
                    layers[layer.name] = layer
                if block.expand is None and source in layers and not block.residual:
                    # the block's hidden channels are its input layer's outputs, read only here
                    layers[source] = dataclasses.replace(layers[source], outputs=((name, 1),))
                depthwise = layers[f"{name}.depthwise"]
                unit_slots.append(GateSlot(name, depthwise.name, (depthwise.out_units,), 3,
                                           False, DROPRATE, depthwise.kernel_shape))
                height, width = strided(height, stride), strided(width, stride)
                projections.append(f"{name}.project")
                channels = out_channels
                source = stream or f"{name}.project"
            if stream is not None:
                couplings.append(ChannelCoupling(stream, tuple(projections)))
        self.blocks = nnx.List(blocks)
        self.head = Conv(channels, head_features, 1, use_bias=False, rngs=rngs)
        self.head_bn = batch_norm(head_features, rngs)
        self.fc = Dense(head_features, num_classes, rngs=rngs)
        head_slot = (("head", 1),)
        layers["head"] = Layer("head", (1, 1, channels, head_features), height * width,
                               has_bias=False, outputs=head_slot, reads=(source,),
                               norm="head_bn")
        layers["fc"] = Layer("fc", (head_features, num_classes), inputs=head_slot,
                             reads=("head",))
        unit_slots.append(GateSlot("head", "head", (head_features,), 3, False, DROPRATE,
                                   layers["head"].kernel_shape))
        self.channel_couplings = tuple(couplings)
        if unit:
            self.layers = tuple(layers.values())
            self.gate_slots = tuple(unit_slots)
        else:
            self.layers = tuple(_weight_gated(layer) for layer in layers.values())
            self.gate_slots = weight_slots(self.layers, DROPRATE)
        self._build_gates(gate_factory, rngs)

    def layer_module(self, name: str) -> nnx.Module:
        """``"stem"``, ``"head"``, ``"fc"`` or ``"block{i}.expand|depthwise|project"``."""
        if name.startswith("block"):
            block, conv = name.split(".")
            return getattr(self.blocks[int(block.removeprefix("block")) - 1], conv)
        return getattr(self, name)

    def forward(self, x: jax.Array, z: dict[str, jax.Array], *, train: bool) -> jax.Array:
        unit = self.granularity == "unit"
        h = self.stem_bn(self.stem(x, self.kernel_gate(z, "stem")), use_running_average=not train)
        h = jax.nn.relu6(h)
        for i, block in enumerate(self.blocks, start=1):
            name = f"block{i}"
            h = block(
                h,
                train=train,
                unit_gate=z.get(name) if unit else None,
                kernel_gates=tuple(self.kernel_gate(z, f"{name}.{conv}") for conv in BLOCK_CONVS),
            )
        h = self.head_bn(self.head(h, self.kernel_gate(z, "head")), use_running_average=not train)
        if unit:
            h = apply_unit_gate(h, z, "head")
        h = jnp.mean(jax.nn.relu6(h), axis=(1, 2))
        return self.fc(h, self.kernel_gate(z, "fc"))


def mobilenet_v2(**kwargs) -> MobileNetV2:
    """MobileNetV2 1.0 for ImageNet (224x224, 1000 classes); kwargs as :class:`MobileNetV2`."""
    return MobileNetV2(variant="imagenet", **kwargs)


def mobilenet_v2_cifar(**kwargs) -> MobileNetV2:
    """MobileNetV2 1.0 with the CIFAR strides (32x32, 10 classes by default); kwargs as
    :class:`MobileNetV2`."""
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("input_shape", CIFAR_SHAPE)
    return MobileNetV2(variant="cifar", **kwargs)
