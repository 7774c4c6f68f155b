"""Bottleneck ResNets for ImageNet: ResNet-50 (He et al. 2016, arXiv 1512.03385) in the
torchvision "v1.5" layout, with the stride of a downsampling block on its 3x3 convolution.

Architecture: stem conv7x7 (stride 2, pad 3; 3 -> 64) - BN - ReLU - max pool 3x3 (stride 2,
pad 1), four stages of [3, 4, 6, 3] bottleneck blocks of widths p = 64/128/256/512 with expansion
4 (stream widths 256/512/1024/2048; the first block of stages 2-4 has stride 2), global average
pooling and a dense layer 2048 -> classes. A block is conv1x1 (-> p) - BN1 - ReLU - conv3x3
(stride s) - BN2 - ReLU - conv1x1 (-> 4p) - BN3, plus the shortcut, then ReLU; the shortcut is
the identity, or, where the block changes the shape, a 1x1 convolution (stride s) and BatchNorm.
Convolutions have no bias. ResNet-50 has 25,557,032 parameters for 1000 classes and 4.09G
multiply-accumulates on a 224x224 image.

Gate placement follows Dep-L0 (Li & Ji 2021): channel gates on the output of the stem (slot
``"stem"``, 64) and on the outputs of the first and second convolution of every block (slots
``"block{i}.conv1"`` and ``"block{i}.conv2"``, blocks numbered 1..16 through the network): 33
slots. Each gate multiplies its channel after the convolution's BatchNorm and before the ReLU
(a nonnegative per-channel gate commutes with the ReLU and the max pool, so this equals the
reference's gate after the ReLU, and after the pool in its hard-concrete variant). conv3 and the
shortcuts are never gated, so the residual streams keep their width. Initial drop rate 0.5 (the
hard-concrete default).

Which slots switch off the units of a layer (for :mod:`sparsejax.structure.accounting`):
- ``stem``: outputs = the stem slot.
- ``block{i}.conv1``: outputs = its own slot; inputs = the stem slot for block 1, which reads the
  gated (pooled) stem activation, and nothing for every later block (the residual stream).
- ``block{i}.conv2``: inputs = the block's conv1 slot; outputs = its own slot.
- ``block{i}.conv3``: inputs = the block's conv2 slot; outputs = none (residual stream).
- ``block{i}.shortcut``: inputs = the stem slot for block 1, else none; outputs = none.
- ``fc``: no gated units.
With ``granularity="weight"`` every kernel gets its own weight gates instead, and no unit is
gated.

Channel flow (for slimming): one coupling per residual stream, ``"stage{s}"``, whose members are
the projection shortcut and the conv3 of every block writing into it. Block 1 projects the 64
stem channels to 256, so the stem is a plain layer read by block 1's conv1 and shortcut (the max
pool keeps channels). Every conv1 and shortcut reads its block's input (a stream, or the stem),
conv2 / conv3 read conv1 / conv2, and fc reads the last stream. ``norm``: ``stem_bn``, and a
block's ``bn1`` / ``bn2`` / ``bn3`` / ``shortcut_bn`` for conv1 / conv2 / conv3 / shortcut.
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
from sparsejax.models.cifar_resnet import PAD_ONE, batch_norm
from sparsejax.models.layers import Conv, Dense
from sparsejax.models.residual import (
    BlockNetwork,
    ResidualStreams,
    block_sites,
    projection,
    strided,
)

IMAGENET_SHAPE = (224, 224, 3)
RESNET50_BLOCKS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
DROPRATE = 0.5
STEM_KERNEL = 7
STEM_PAD = ((3, 3), (3, 3))
POOL_WINDOW = 3
GATED_CONVS = ("conv1", "conv2")


def stem_pool(x: jax.Array) -> jax.Array:
    """3x3 max pooling with stride 2 and one pixel of (-inf) padding on each side."""
    return nnx.max_pool(x, window_shape=(POOL_WINDOW, POOL_WINDOW), strides=(2, 2),
                        padding=PAD_ONE)


class Bottleneck(nnx.Module):
    """conv1x1 - BN - [gate] - ReLU - conv3x3(s) - BN - [gate] - ReLU - conv1x1 - BN, plus the
    identity or a 1x1 projection with BN, then ReLU."""

    def __init__(self, in_features: int, width: int, stride: int, *, rngs: nnx.Rngs):
        out_features = EXPANSION * width
        self.conv1 = Conv(in_features, width, 1, use_bias=False, rngs=rngs)
        self.bn1 = batch_norm(width, rngs)
        self.conv2 = Conv(width, width, 3, stride=stride, padding=PAD_ONE, use_bias=False,
                          rngs=rngs)
        self.bn2 = batch_norm(width, rngs)
        self.conv3 = Conv(width, out_features, 1, use_bias=False, rngs=rngs)
        self.bn3 = batch_norm(out_features, rngs)
        self.shortcut = projection(in_features, out_features, stride, rngs)
        self.shortcut_bn = None if self.shortcut is None else batch_norm(out_features, rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        unit_gates: dict[str, jax.Array],
        kernel_gates: dict[str, jax.Array | None],
    ) -> jax.Array:
        h = x
        for conv, norm in zip(GATED_CONVS, (self.bn1, self.bn2)):
            h = norm(getattr(self, conv)(h, kernel_gates[conv]), use_running_average=not train)
            if conv in unit_gates:
                h = gate_units(h, unit_gates[conv])
            h = nnx.relu(h)
        h = self.bn3(self.conv3(h, kernel_gates["conv3"]), use_running_average=not train)
        if self.shortcut is None:
            return nnx.relu(h + x)
        shortcut = self.shortcut_bn(self.shortcut(x, kernel_gates["shortcut"]),
                                    use_running_average=not train)
        return nnx.relu(h + shortcut)


class ImageNetResNet(BlockNetwork):
    """Bottleneck ResNet for ImageNet-sized images; see the module docstring for the gates."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        blocks_per_stage: tuple[int, ...] = RESNET50_BLOCKS,
        widths: tuple[int, ...] = WIDTHS,
        num_classes: int = 1000,
        input_shape: tuple[int, ...] = IMAGENET_SHAPE,
        gate_factory: GateFactory | None = None,
        granularity: Granularity = "unit",
    ):
        check_granularity(granularity)
        if len(blocks_per_stage) != len(widths) or min(blocks_per_stage, default=0) < 1:
            raise ValueError(
                f"need one positive block count per stage width; got blocks_per_stage="
                f"{tuple(blocks_per_stage)} for widths={tuple(widths)}"
            )
        self.granularity = granularity
        self.blocks_per_stage = tuple(blocks_per_stage)
        height, width, in_channels = input_shape

        stem_width = widths[0]
        self.stem = Conv(in_channels, stem_width, STEM_KERNEL, stride=2, padding=STEM_PAD,
                         use_bias=False, rngs=rngs)
        self.stem_bn = batch_norm(stem_width, rngs)
        height, width = strided(height, 2), strided(width, 2)
        stem = Layer("stem", (STEM_KERNEL, STEM_KERNEL, in_channels, stem_width), height * width,
                     has_bias=False, outputs=self._unit_sources(("stem", 1)),
                     kernel_slot=self._kernel_slot("stem"), reads=(MODEL_INPUT,), norm="stem_bn")
        layers = [stem]
        unit_slots = [GateSlot("stem", "stem", (stem_width,), 3, False, DROPRATE,
                               stem.kernel_shape)]
        height, width = strided(height, 2), strided(width, 2)
        streams = ResidualStreams("stem")
        blocks = []
        channels = stem_width
        for site in block_sites(blocks_per_stage, height, width):
            stage_width = widths[site.stage]
            out_features = EXPANSION * stage_width
            name, block_path = site.name, site.path
            block = Bottleneck(channels, stage_width, site.stride, rngs=rngs)
            blocks.append(block)
            stream_in = streams.join(site, f"{name}.conv3", projects=block.shortcut is not None)
            gated_input = self._unit_sources(("stem", 1)) if stream_in == "stem" else ()
            conv1 = Layer(
                f"{name}.conv1", (1, 1, channels, stage_width), site.positions_in, has_bias=False,
                inputs=gated_input, outputs=self._unit_sources((f"{name}.conv1", 1)),
                kernel_slot=self._kernel_slot(f"{name}.conv1"), reads=(stream_in,),
                norm=f"{block_path}.bn1",
            )
            conv2 = Layer(
                f"{name}.conv2", (3, 3, stage_width, stage_width), site.positions, has_bias=False,
                inputs=self._unit_sources((conv1.name, 1)),
                outputs=self._unit_sources((f"{name}.conv2", 1)),
                kernel_slot=self._kernel_slot(f"{name}.conv2"), reads=(conv1.name,),
                norm=f"{block_path}.bn2",
            )
            conv3 = Layer(
                f"{name}.conv3", (1, 1, stage_width, out_features), site.positions,
                has_bias=False, inputs=self._unit_sources((conv2.name, 1)),
                kernel_slot=self._kernel_slot(f"{name}.conv3"), reads=(conv2.name,),
                norm=f"{block_path}.bn3",
            )
            layers += [conv1, conv2, conv3]
            unit_slots += [
                GateSlot(conv.name, conv.name, (stage_width,), 3, False, DROPRATE,
                         conv.kernel_shape)
                for conv in (conv1, conv2)
            ]
            if block.shortcut is not None:
                layers.append(Layer(
                    f"{name}.shortcut", (1, 1, channels, out_features), site.positions,
                    has_bias=False, inputs=gated_input,
                    kernel_slot=self._kernel_slot(f"{name}.shortcut"), reads=(stream_in,),
                    norm=f"{block_path}.shortcut_bn",
                ))
            channels = out_features
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
        h = stem_pool(nnx.relu(h))
        for i, block in enumerate(self.blocks, start=1):
            name = f"block{i}"
            h = block(
                h,
                train=train,
                unit_gates={
                    conv: z[f"{name}.{conv}"]
                    for conv in GATED_CONVS
                    if unit and f"{name}.{conv}" in z
                },
                kernel_gates={
                    conv: self.kernel_gate(z, f"{name}.{conv}")
                    for conv in ("conv1", "conv2", "conv3", "shortcut")
                },
            )
        return self.fc(jnp.mean(h, axis=(1, 2)), self.kernel_gate(z, "fc"))


def resnet50(**kwargs) -> ImageNetResNet:
    """ResNet-50 (blocks [3, 4, 6, 3]); kwargs as :class:`ImageNetResNet` without
    ``blocks_per_stage`` and ``widths``."""
    return ImageNetResNet(blocks_per_stage=RESNET50_BLOCKS, widths=WIDTHS, **kwargs)
