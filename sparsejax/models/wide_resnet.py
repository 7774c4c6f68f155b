"""Wide residual networks WRN-d-k for CIFAR (Zagoruyko & Komodakis 2016, arXiv 1605.07146).

Architecture: conv3x3(3 -> 16), three stages of n = (d - 4) / 6 pre-activation basic blocks of
widths 16k, 32k and 64k (the first block of stages 2 and 3 has stride 2), then BN - ReLU, global
average pooling and a dense layer 64k -> classes. A block is BN1 - ReLU - conv3x3 (stride s) -
BN2 - ReLU - conv3x3, plus the shortcut: the identity, or, where the block changes the shape, a
1x1 convolution (stride s) of the pre-activated input ReLU(BN1(x)), as in the reference code.
Convolutions have no bias and pad one pixel on each side; no dropout. WRN-28-10 (n = 4, k = 10)
has 36,479,194 parameters for 10 classes and 5.24G multiply-accumulates on a 32x32 image.

Gate placement follows L0-HC (Louizos et al. 2018): channel gates on the output of the first
convolution of every block (slot ``"block{i}.conv1"``, blocks numbered 1..3n through the network;
4 x 160 + 4 x 320 + 4 x 640 = 4480 gates for WRN-28-10), initial drop rate 0.3. The reference
multiplies the gate into conv1's output *before* BN2, where a train-mode BatchNorm divides a
batch-shared gate back out: the data loss then gives the gate almost no gradient and a closed gate
leaves the channel at BN2's bias instead of zero. Here the gate acts *after* BN2
(BN2 - gate - ReLU - conv2), on the same channels, so that closing it removes the channel; this
placement deliberately differs from the reference code.

Which slots switch off the units of a layer (for :mod:`sparsejax.structure.accounting`):
- ``block{i}.conv1``: outputs = its own slot; inputs = none (the pre-activated residual stream).
- ``block{i}.conv2``: inputs = the block's conv1 slot; outputs = none (residual stream).
- ``stem``, ``block{i}.shortcut`` (1x1 projections) and ``fc``: no gated units.
With ``granularity="weight"`` every kernel (stem, convolutions, shortcuts, fc) gets its own weight
gates instead, and no unit is gated.

Channel flow (for slimming): one coupling per residual stream, ``"stage{s}"``, whose members are
the projection shortcut and the conv2 of every block writing into it; the stem joins stage 1's
stream when the first block keeps its width (k = 1) and is otherwise read by that block's conv1
and shortcut. Every conv1 and shortcut reads its block's input (a stream, or the stem), conv2
reads its block's conv1, and fc reads the last stream. ``norm`` / ``input_norm``: a block's
BN1 normalises the input of conv1 and of the shortcut, BN2 the output of conv1; ``final_bn`` the
input of fc; the stem and conv2 write into the stream unnormalised.
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
    check_granularity,
)
from sparsejax.models.cifar_resnet import CIFAR_SHAPE, PAD_ONE, batch_norm
from sparsejax.models.layers import Conv, Dense
from sparsejax.models.residual import (
    BlockNetwork,
    ResidualStreams,
    block_sites,
    projection,
)

STEM_WIDTH = 16
BASE_WIDTHS = (16, 32, 64)
DROPRATE = 0.3
"""droprate_init of the L0-HC WRN script."""


class PreActBasicBlock(nnx.Module):
    """BN1 - ReLU - conv3x3(s) - BN2 - [gate] - ReLU - conv3x3, plus the identity or a 1x1
    projection of ReLU(BN1(x))."""

    def __init__(self, in_features: int, out_features: int, stride: int, *, rngs: nnx.Rngs):
        self.bn1 = batch_norm(in_features, rngs)
        self.conv1 = Conv(in_features, out_features, 3, stride=stride, padding=PAD_ONE,
                          use_bias=False, rngs=rngs)
        self.bn2 = batch_norm(out_features, rngs)
        self.conv2 = Conv(out_features, out_features, 3, padding=PAD_ONE, use_bias=False, rngs=rngs)
        self.shortcut = projection(in_features, out_features, stride, rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        unit_gate: jax.Array | None,
        kernel_gates: dict[str, jax.Array | None],
    ) -> jax.Array:
        activated = nnx.relu(self.bn1(x, use_running_average=not train))
        h = self.bn2(self.conv1(activated, kernel_gates["conv1"]), use_running_average=not train)
        if unit_gate is not None:
            h = gate_units(h, unit_gate)
        h = self.conv2(nnx.relu(h), kernel_gates["conv2"])
        if self.shortcut is None:
            return h + x
        return h + self.shortcut(activated, kernel_gates["shortcut"])


class WideResNet(BlockNetwork):
    """WRN-depth-widen_factor for CIFAR; see the module docstring for the gates.

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
        gate_factory: GateFactory | None = None,
        granularity: Granularity = "unit",
    ):
        check_granularity(granularity)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"a wide ResNet has depth 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive integer, got {widen_factor}")
        self.granularity = granularity
        self.depth, self.widen_factor = depth, widen_factor
        blocks_per_stage = (depth - 4) // 6
        height, width, in_channels = input_shape

        self.stem = Conv(in_channels, stem_width, 3, padding=PAD_ONE, use_bias=False, rngs=rngs)
        layers = [
            Layer("stem", (3, 3, in_channels, stem_width), height * width, has_bias=False,
                  kernel_slot=self._kernel_slot("stem"), reads=(MODEL_INPUT,)),
        ]
        unit_slots = []
        streams = ResidualStreams("stem")
        blocks = []
        channels = stem_width
        for site in block_sites((blocks_per_stage,) * len(base_widths), height, width):
            stage_width = base_widths[site.stage] * widen_factor
            name, block_path = site.name, site.path
            block = PreActBasicBlock(channels, stage_width, site.stride, rngs=rngs)
            blocks.append(block)
            stream_in = streams.join(site, f"{name}.conv2", projects=block.shortcut is not None)
            conv1 = Layer(
                f"{name}.conv1", (3, 3, channels, stage_width), site.positions, has_bias=False,
                outputs=self._unit_sources((f"{name}.conv1", 1)),
                kernel_slot=self._kernel_slot(f"{name}.conv1"), reads=(stream_in,),
                norm=f"{block_path}.bn2",
                input_norm=f"{block_path}.bn1",
            )
            conv2 = Layer(
                f"{name}.conv2", (3, 3, stage_width, stage_width), site.positions, has_bias=False,
                inputs=self._unit_sources((f"{name}.conv1", 1)),
                kernel_slot=self._kernel_slot(f"{name}.conv2"), reads=(conv1.name,),
            )
            layers += [conv1, conv2]
            if block.shortcut is not None:
                layers.append(Layer(
                    f"{name}.shortcut", (1, 1, channels, stage_width), site.positions,
                    has_bias=False, kernel_slot=self._kernel_slot(f"{name}.shortcut"),
                    reads=(stream_in,), input_norm=f"{block_path}.bn1",
                ))
            unit_slots.append(GateSlot(conv1.name, conv1.name, (stage_width,), 3, False,
                                       DROPRATE, conv1.kernel_shape))
            channels = stage_width
        self.blocks = nnx.List(blocks)
        self.final_bn = batch_norm(channels, rngs)
        self.fc = Dense(channels, num_classes, rngs=rngs)
        layers.append(Layer("fc", (channels, num_classes), kernel_slot=self._kernel_slot("fc"),
                            reads=(streams.current,), input_norm="final_bn"))
        self._declare(layers, unit_slots, droprate_init=DROPRATE, gate_factory=gate_factory,
                      rngs=rngs, couplings=streams.couplings())


    def forward(self, x: jax.Array, z: dict[str, jax.Array], *, train: bool) -> jax.Array:
        unit = self.granularity == "unit"
        h = self.stem(x, self.kernel_gate(z, "stem"))
        for i, block in enumerate(self.blocks, start=1):
            name = f"block{i}"
            h = block(
                h,
                train=train,
                unit_gate=z.get(f"{name}.conv1") if unit else None,
                kernel_gates={
                    conv: self.kernel_gate(z, f"{name}.{conv}")
                    for conv in ("conv1", "conv2", "shortcut")
                },
            )
        h = nnx.relu(self.final_bn(h, use_running_average=not train))
        return self.fc(jnp.mean(h, axis=(1, 2)), self.kernel_gate(z, "fc"))


def wrn28_10(**kwargs) -> WideResNet:
    """WRN-28-10; kwargs as :class:`WideResNet` without ``depth`` and ``widen_factor``."""
    return WideResNet(depth=28, widen_factor=10, **kwargs)
