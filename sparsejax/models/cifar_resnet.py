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

Gate placement follows Dep-L0 (Li & Ji 2021): channel gates on the output of the stem (slot
``"stem"``) and on the output of every block's first convolution (slot ``"block{i}.conv1"``,
blocks numbered 1..3n through the network). Each gate multiplies its channel *after* the
BatchNorm, where no normalisation can undo it, and before the ReLU (a nonnegative per-channel
gate commutes with it). The second convolution of a block and the residual stream are never
gated, so the blocks keep their shapes and the shortcuts stay parameter-free.

Which slots switch off the units of a layer (for :mod:`sparsejax.structure.accounting`):
- ``stem``: outputs = stem slot.
- ``block{i}.conv1``: outputs = its own slot; inputs = the stem slot for block 1, whose input is
  the gated stem activation, and nothing for every later block: from block 1 on, the residual
  stream is the shortcut plus BN2 of conv2, whose bias keeps a channel alive even when the gate
  upstream closes it.
- ``block{i}.conv2``: inputs = the block's conv1 slot; outputs = none (residual stream).
- ``fc``: no gated units.
With ``granularity="weight"`` every kernel (stem, all conv1/conv2, fc) gets its own weight gates
instead, and no unit is gated.

Channel flow (for slimming): one coupling per residual stream, ``"stage{s}"``: the stem and the
conv2 of every stage-1 block write into ``stage1``, the conv2 of the blocks of stage s into
``stage{s}``. A zero-padded shortcut copies ``stage{s-1}`` into ``stage{s}`` at a channel offset
(``shortcut_from``), which ties the widths of both, so every stream that is padded into the next
or receives a padded one is ``fixed``. Every conv1 reads the block's input stream, conv2 reads its
block's conv1, and fc reads the last stream. ``norm``: the stem's BatchNorm is ``stem_bn``, a
block's convolutions are normalised by its ``bn1`` / ``bn2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.gates.apply import gate_units
from sparsejax.models.base import (
    MODEL_INPUT,
    GateFactory,
    GateSlot,
    Granularity,
    Layer,
    apply_unit_gate,
    check_granularity,
)
from sparsejax.models.layers import Conv, Dense
from sparsejax.models.residual import BlockNetwork, ResidualStreams, block_sites

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
    """conv3x3(s) - BN - [gate] - ReLU - conv3x3 - BN, plus the option-A shortcut, then ReLU."""

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

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        unit_gate: jax.Array | None = None,
        kernel_gates: tuple[jax.Array | None, jax.Array | None] = (None, None),
    ) -> jax.Array:
        h = self.bn1(self.conv1(x, kernel_gates[0]), use_running_average=not train)
        if unit_gate is not None:
            h = gate_units(h, unit_gate)
        h = self.bn2(self.conv2(nnx.relu(h), kernel_gates[1]), use_running_average=not train)
        return nnx.relu(h + self.shortcut(x))


class CifarResNet(BlockNetwork):
    """ResNet-(6n+2) for CIFAR with option-A shortcuts; see the module docstring for the gates."""

    def __init__(
        self,
        *,
        depth: int,
        rngs: nnx.Rngs,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = CIFAR_SHAPE,
        widths: tuple[int, int, int] = WIDTHS,
        gate_factory: GateFactory | None = None,
        granularity: Granularity = "unit",
    ):
        check_granularity(granularity)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 with n >= 1, got {depth}")
        self.granularity = granularity
        self.depth = depth
        blocks_per_stage = (depth - 2) // 6
        height, width, in_channels = input_shape

        stem_width = widths[0]
        self.stem = Conv(in_channels, stem_width, 3, padding=PAD_ONE, use_bias=False, rngs=rngs)
        self.stem_bn = batch_norm(stem_width, rngs)
        layers = [
            Layer("stem", (3, 3, in_channels, stem_width), height * width, has_bias=False,
                  outputs=self._unit_sources(("stem", 1)), kernel_slot=self._kernel_slot("stem"),
                  reads=(MODEL_INPUT,), norm="stem_bn"),
        ]
        unit_slots = [
            GateSlot("stem", "stem", (stem_width,), 3, False, DROPRATE, layers[0].kernel_shape),
        ]
        streams = ResidualStreams("stem")
        blocks = []
        channels = stem_width
        for site in block_sites((blocks_per_stage,) * len(widths), height, width):
            stage_width = widths[site.stage]
            name, block_path = site.name, site.path
            block = BasicBlock(channels, stage_width, site.stride, rngs=rngs)
            blocks.append(block)
            if block.channel_pad == (0, 0):
                stream_in = streams.add(f"{name}.conv2", site.stream)
            else:
                stream_in = streams.pad(f"{name}.conv2", site.stream)
            conv1 = Layer(
                f"{name}.conv1", (3, 3, channels, stage_width), site.positions,
                has_bias=False,
                inputs=self._unit_sources(("stem", 1)) if site.index == 0 else (),
                outputs=self._unit_sources((f"{name}.conv1", 1)),
                kernel_slot=self._kernel_slot(f"{name}.conv1"),
                reads=(stream_in,),
                norm=f"{block_path}.bn1",
            )
            conv2 = Layer(
                f"{name}.conv2", (3, 3, stage_width, stage_width), site.positions,
                has_bias=False,
                inputs=self._unit_sources((f"{name}.conv1", 1)),
                kernel_slot=self._kernel_slot(f"{name}.conv2"),
                reads=(conv1.name,),
                norm=f"{block_path}.bn2",
            )
            layers += [conv1, conv2]
            unit_slots.append(GateSlot(conv1.name, conv1.name, (stage_width,), 3, False,
                                       DROPRATE, conv1.kernel_shape))
            channels = stage_width
        self.blocks = nnx.List(blocks)
        self.fc = Dense(channels, num_classes, rngs=rngs)
        layers.append(Layer("fc", (channels, num_classes), kernel_slot=self._kernel_slot("fc"),
                            reads=(streams.current,)))
        self._declare(layers, unit_slots, droprate_init=DROPRATE, gate_factory=gate_factory,
                      rngs=rngs, couplings=streams.couplings())


    def forward(self, x: jax.Array, z: dict[str, jax.Array], *, train: bool) -> jax.Array:
        unit = self.granularity == "unit"
        h = self.stem_bn(self.stem(x, self.kernel_gate(z, "stem")), use_running_average=not train)
        if unit:
            h = apply_unit_gate(h, z, "stem")
        h = nnx.relu(h)
        for i, block in enumerate(self.blocks, start=1):
            name = f"block{i}"
            h = block(
                h,
                train=train,
                unit_gate=z.get(f"{name}.conv1") if unit else None,
                kernel_gates=(
                    self.kernel_gate(z, f"{name}.conv1"),
                    self.kernel_gate(z, f"{name}.conv2"),
                ),
            )
        h = jnp.mean(h, axis=(1, 2))
        return self.fc(h, self.kernel_gate(z, "fc"))


def resnet20(**kwargs) -> CifarResNet:
    """ResNet-20 (n = 3); kwargs as :class:`CifarResNet` without ``depth``."""
    return CifarResNet(depth=20, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    """ResNet-56 (n = 9); kwargs as :class:`CifarResNet` without ``depth``."""
    return CifarResNet(depth=56, **kwargs)


def resnet110(**kwargs) -> CifarResNet:
    """ResNet-110 (n = 18); kwargs as :class:`CifarResNet` without ``depth``."""
    return CifarResNet(depth=110, **kwargs)
