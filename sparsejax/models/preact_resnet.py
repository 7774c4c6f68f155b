"""Pre-activation bottleneck ResNets of depth 9n + 2 for CIFAR (He et al. 2016, "Identity mappings
in deep residual networks", arXiv 1603.05027), in the layout of the Network Slimming code.

Architecture: conv3x3(3 -> 16), three stages of n bottleneck blocks of widths p = 16/32/64 with
expansion 4 (stream widths 64/128/256; the first block of stages 2 and 3 has stride 2), then
BN - ReLU, global average pooling and a dense layer 256 -> classes. A block is
BN1 - ReLU - conv1x1 (-> p) - BN2 - ReLU - conv3x3 (stride s) - BN3 - ReLU - conv1x1 (-> 4p),
plus the shortcut: the identity, or, where the block changes the shape, a 1x1 convolution
(stride s) of the block's raw input. Convolutions have no bias. ResNet-164 (n = 18) has 1,703,258
parameters for 10 classes (1,726,388 for 100) and 248M multiply-accumulates on a 32x32 image.

Gate placement. In a pre-activation network a convolution's output is not normalised by a
BatchNorm of its own: it is added to the stream or read by the next block's BN. So the gates
follow Network Slimming (Liu et al. 2017), which prunes the channels of every BatchNorm that
feeds a convolution: a channel gate right after each pre-activation BN, BN - gate - ReLU - conv,
where no normalisation can undo it. Each gate switches off input channels of the convolution that
reads it, so each slot is declared on that convolution's input axis:
- ``block{i}.conv1_in`` (width of the stream): BN1's output, the inputs of conv1. The stream
  itself is not touched (the shortcut reads the raw input), so a closed gate only removes conv1's
  input channel, as Network Slimming's channel selection after BN1 does.
- ``block{i}.conv2_in`` / ``block{i}.conv3_in`` (p): BN2's / BN3's outputs, i.e. the output
  channels of conv1 / conv2 and the inputs of conv2 / conv3.
- ``fc_in`` (256): the final BN's output, the inputs of the dense layer (Network Slimming's
  channel selection before the classifier).
Initial drop rate 0.5 (the hard-concrete default).

Which slots switch off the units of a layer (for :mod:`sparsejax.structure.accounting`):
- ``block{i}.conv1``: inputs = ``conv1_in``; outputs = ``conv2_in``.
- ``block{i}.conv2``: inputs = ``conv2_in``; outputs = ``conv3_in``.
- ``block{i}.conv3``: inputs = ``conv3_in``; outputs = none (residual stream).
- ``fc``: inputs = ``fc_in``. ``stem`` and ``block{i}.shortcut``: no gated units.
With ``granularity="weight"`` every kernel gets its own weight gates instead, and no unit is
gated.

Channel flow (for slimming): one coupling per residual stream, ``"stage{s}"``, whose members are
the projection shortcut and the conv3 of every block writing into it. The stem has a quarter of
the first stream's width, so the first block always projects and the stem is a plain layer read
by its conv1 and shortcut. Every conv1 and shortcut reads its block's input (a stream, or the
stem), conv2 / conv3 read conv1 / conv2, and fc reads the last stream. ``input_norm``: BN1 / BN2
/ BN3 of a block normalise the inputs of conv1 / conv2 / conv3, ``final_bn`` that of fc; conv1
and fc read their input through an input selection (a slimmed model drops the stream channels
their gates closed).
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
from sparsejax.models.cifar_resnet import CIFAR_SHAPE, PAD_ONE, batch_norm
from sparsejax.models.layers import Conv, Dense
from sparsejax.models.residual import (
    BlockNetwork,
    ResidualStreams,
    block_sites,
    projection,
)

WIDTHS = (16, 32, 64)
EXPANSION = 4
DROPRATE = 0.5
CONVS = ("conv1", "conv2", "conv3")


class PreActBottleneck(nnx.Module):
    """(BN - [gate] - ReLU - conv) for conv1x1, conv3x3(s), conv1x1, plus the identity or a 1x1
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

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        unit_gates: dict[str, jax.Array],
        kernel_gates: dict[str, jax.Array | None],
        conv1_reads: jax.Array | None = None,
    ) -> jax.Array:
        """``conv1_reads``: the channels of x that conv1 reads (all of x when None)."""
        h = x if conv1_reads is None else conv1_reads
        for norm, conv in zip((self.bn1, self.bn2, self.bn3), CONVS):
            h = norm(h, use_running_average=not train)
            if conv in unit_gates:
                h = gate_units(h, unit_gates[conv])
            h = getattr(self, conv)(nnx.relu(h), kernel_gates[conv])
        if self.shortcut is None:
            return h + x
        return h + self.shortcut(x, kernel_gates["shortcut"])


class PreActResNet(BlockNetwork):
    """Pre-activation bottleneck ResNet-(9n+2) for CIFAR; see the module docstring for the gates."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        depth: int = 164,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = CIFAR_SHAPE,
        widths: tuple[int, int, int] = WIDTHS,
        gate_factory: GateFactory | None = None,
        granularity: Granularity = "unit",
    ):
        check_granularity(granularity)
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(f"a bottleneck CIFAR ResNet has depth 9n + 2 with n >= 1, got {depth}")
        self.granularity = granularity
        self.depth = depth
        blocks_per_stage = (depth - 2) // 9
        height, width, in_channels = input_shape

        stem_width = widths[0]
        self.stem = Conv(in_channels, stem_width, 3, padding=PAD_ONE, use_bias=False, rngs=rngs)
        layers = [
            Layer("stem", (3, 3, in_channels, stem_width), height * width, has_bias=False,
                  kernel_slot=self._kernel_slot("stem"), reads=(MODEL_INPUT,)),
        ]
        unit_slots = []
        streams = ResidualStreams("stem")
        blocks = []
        channels = stem_width
        for site in block_sites((blocks_per_stage,) * len(widths), height, width):
            stage_width = widths[site.stage]
            out_features = EXPANSION * stage_width
            name, block_path = site.name, site.path
            block = PreActBottleneck(channels, stage_width, site.stride, rngs=rngs)
            blocks.append(block)
            stream_in = streams.join(site, f"{name}.conv3", projects=block.shortcut is not None)
            conv1 = Layer(
                f"{name}.conv1", (1, 1, channels, stage_width), site.positions_in, has_bias=False,
                inputs=self._unit_sources((f"{name}.conv1_in", 1)),
                outputs=self._unit_sources((f"{name}.conv2_in", 1)),
                kernel_slot=self._kernel_slot(f"{name}.conv1"), reads=(stream_in,),
                input_norm=f"{block_path}.bn1", input_selection=True,
            )
            conv2 = Layer(
                f"{name}.conv2", (3, 3, stage_width, stage_width), site.positions, has_bias=False,
                inputs=self._unit_sources((f"{name}.conv2_in", 1)),
                outputs=self._unit_sources((f"{name}.conv3_in", 1)),
                kernel_slot=self._kernel_slot(f"{name}.conv2"), reads=(conv1.name,),
                input_norm=f"{block_path}.bn2",
            )
            conv3 = Layer(
                f"{name}.conv3", (1, 1, stage_width, out_features), site.positions,
                has_bias=False, inputs=self._unit_sources((f"{name}.conv3_in", 1)),
                kernel_slot=self._kernel_slot(f"{name}.conv3"), reads=(conv2.name,),
                input_norm=f"{block_path}.bn3",
            )
            layers += [conv1, conv2, conv3]
            unit_slots += [
                GateSlot(f"{conv.name}_in", conv.name, (conv.in_units,), 2, False, DROPRATE,
                         conv.kernel_shape)
                for conv in (conv1, conv2, conv3)
            ]
            if block.shortcut is not None:
                layers.append(Layer(
                    f"{name}.shortcut", (1, 1, channels, out_features), site.positions,
                    has_bias=False, kernel_slot=self._kernel_slot(f"{name}.shortcut"),
                    reads=(stream_in,),
                ))
            channels = out_features
        self.blocks = nnx.List(blocks)
        self.final_bn = batch_norm(channels, rngs)
        self.fc = Dense(channels, num_classes, rngs=rngs)
        fc = Layer("fc", (channels, num_classes), inputs=self._unit_sources(("fc_in", 1)),
                   kernel_slot=self._kernel_slot("fc"), reads=(streams.current,),
                   input_norm="final_bn", input_selection=True)
        layers.append(fc)
        unit_slots.append(GateSlot("fc_in", "fc", (channels,), 0, False, DROPRATE,
                                   fc.kernel_shape))
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
                unit_gates={
                    conv: z[f"{name}.{conv}_in"]
                    for conv in CONVS
                    if unit and f"{name}.{conv}_in" in z
                },
                kernel_gates={
                    conv: self.kernel_gate(z, f"{name}.{conv}") for conv in (*CONVS, "shortcut")
                },
                conv1_reads=self.select_inputs(h, f"{name}.conv1"),
            )
        h = self.final_bn(self.select_inputs(h, "fc"), use_running_average=not train)
        if unit:
            h = apply_unit_gate(h, z, "fc_in")
        h = jnp.mean(nnx.relu(h), axis=(1, 2))
        return self.fc(h, self.kernel_gate(z, "fc"))


def resnet164(**kwargs) -> PreActResNet:
    """ResNet-164 (n = 18); kwargs as :class:`PreActResNet` without ``depth``."""
    return PreActResNet(depth=164, **kwargs)
