"""ResNets for ImageNet (He et al. 2016, arXiv 1512.03385) in the torchvision layout, with basic
blocks (ResNet-34) or bottleneck blocks (ResNet-50, "v1.5": the stride of a downsampling
bottleneck is on its 3x3 convolution).

Architecture: stem conv7x7 (stride 2, pad 3; 3 -> 64) - BN - ReLU - max pool 3x3 (stride 2,
pad 1), four stages of residual blocks of widths p = 64/128/256/512 (the first block of stages
2-4 has stride 2), global average pooling and a dense layer -> classes. A block is a chain of
convolutions, each followed by BN and (all but the last) ReLU, plus the shortcut, then ReLU:
- basic (expansion 1): conv3x3 (stride s, -> p) - BN1 - ReLU - conv3x3 (-> p) - BN2;
- bottleneck (expansion 4): conv1x1 (-> p) - BN1 - ReLU - conv3x3 (stride s) - BN2 - ReLU -
  conv1x1 (-> 4p) - BN3.
The shortcut is the identity, or, where the block changes the shape, a 1x1 convolution (stride
s) and BatchNorm. Convolutions have no bias. For 1000 classes on a 224x224 image: ResNet-34
(basic, [3, 4, 6, 3]) has 21,797,672 parameters and 3.66G multiply-accumulates; ResNet-50
(bottleneck, [3, 4, 6, 3]) 25,557,032 and 4.09G.

Gate placement follows Dep-L0 (Li & Ji 2021): channel gates on the outputs of every convolution
of a block but its last (slots ``"block{i}.conv{j}"``, blocks numbered 1..16 through the
network: conv1 of a basic block, conv1 and conv2 of a bottleneck) and on the output of the stem
(slot ``"stem"``) when no block adds into it: ResNet-50's first block projects the stem's 64
channels to 256, while ResNet-34's first stage adds into the stem's output through identity
shortcuts, so there the stem is a member of a residual stream, which is never gated (16 slots for
ResNet-34, 33 for ResNet-50). Each gate multiplies its channel after the convolution's BatchNorm
and before the ReLU (a nonnegative per-channel gate commutes with the ReLU and the max pool, so
this equals the reference's gate after the ReLU, and after the pool in its hard-concrete
variant). The last convolution of a block and the shortcuts are never gated, so the residual
streams keep their width. Initial drop rate 0.5 (the hard-concrete default).

Which slots switch off the units of a layer (for :mod:`sparsejax.structure.accounting`):
- ``stem``: outputs = the stem slot, when there is one.
- ``block{i}.conv1``: outputs = its own slot; inputs = the stem slot for block 1 when the stem is
  gated, which reads the gated (pooled) stem activation, and nothing otherwise (a stream).
- ``block{i}.conv{j}``, j > 1: inputs = the block's slot j - 1; outputs = its own slot, except
  for the last convolution (residual stream).
- ``block{i}.shortcut``: inputs = the stem slot for block 1 when the stem is gated, else none;
  outputs = none.
- ``fc``: no gated units.
With ``granularity="weight"`` every kernel gets its own weight gates instead, and no unit is
gated.

Channel flow (for slimming): one coupling per residual stream, ``"stage{s}"``, whose members are
the projection shortcut and the last convolution of every block writing into it, and, when the
first block has an identity shortcut, the stem (ResNet-34's ``stage1``). Otherwise the stem is a
plain layer read by block 1's conv1 and shortcut (the max pool keeps channels). Every conv1 and
shortcut reads its block's input (a stream, or the stem), conv{j} reads conv{j-1}, and fc reads
the last stream. ``norm``: ``stem_bn``, and a block's ``bn{j}`` / ``shortcut_bn`` for conv{j} /
shortcut.
"""

from __future__ import annotations

import dataclasses

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
RESNET34_BLOCKS = (3, 4, 6, 3)
RESNET50_BLOCKS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
DROPRATE = 0.5
STEM_KERNEL = 7
STEM_PAD = ((3, 3), (3, 3))
POOL_WINDOW = 3


@dataclasses.dataclass(frozen=True)
class BlockKind:
    """The convolutions of a residual block: their kernel sizes in order, which one carries the
    block's stride, and the factor by which the last one widens the block's width."""

    kernels: tuple[int, ...]
    stride_at: int
    expansion: int

    @property
    def convs(self) -> tuple[str, ...]:
        """Names of the convolutions, ``conv1 .. convN``."""
        return tuple(f"conv{j}" for j in range(1, len(self.kernels) + 1))

    @property
    def gated(self) -> tuple[str, ...]:
        """The convolutions with channel gates: all but the last, which writes the stream."""
        return self.convs[:-1]


BLOCK_KINDS: dict[str, BlockKind] = {
    "basic": BlockKind(kernels=(3, 3), stride_at=0, expansion=1),
    "bottleneck": BlockKind(kernels=(1, 3, 1), stride_at=1, expansion=4),
}


def stem_pool(x: jax.Array) -> jax.Array:
    """3x3 max pooling with stride 2 and one pixel of (-inf) padding on each side."""
    return nnx.max_pool(x, window_shape=(POOL_WINDOW, POOL_WINDOW), strides=(2, 2),
                        padding=PAD_ONE)


class ResidualBlock(nnx.Module):
    """The convolutions of ``kind``, each followed by BN and (all but the last) [gate] - ReLU,
    plus the identity or a 1x1 projection with BN, then ReLU."""

    def __init__(
        self, kind: BlockKind, in_features: int, width: int, stride: int, *, rngs: nnx.Rngs
    ):
        self.kind = kind
        out_features = kind.expansion * width
        channels = in_features
        for index, (conv, kernel) in enumerate(zip(kind.convs, kind.kernels)):
            features = out_features if conv == kind.convs[-1] else width
            pad = kernel // 2
            setattr(self, conv, Conv(
                channels, features, kernel, stride=stride if index == kind.stride_at else 1,
                padding=((pad, pad), (pad, pad)), use_bias=False, rngs=rngs,
            ))
            setattr(self, f"bn{index + 1}", batch_norm(features, rngs))
            channels = features
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
        for index, conv in enumerate(self.kind.convs):
            h = getattr(self, conv)(h, kernel_gates[conv])
            h = getattr(self, f"bn{index + 1}")(h, use_running_average=not train)
            if conv in self.kind.gated:
                if conv in unit_gates:
                    h = gate_units(h, unit_gates[conv])
                h = nnx.relu(h)
        if self.shortcut is None:
            return nnx.relu(h + x)
        shortcut = self.shortcut_bn(self.shortcut(x, kernel_gates["shortcut"]),
                                    use_running_average=not train)
        return nnx.relu(h + shortcut)


class ImageNetResNet(BlockNetwork):
    """ResNet for ImageNet-sized images with ``block="basic"`` or ``"bottleneck"`` blocks; see
    the module docstring for the gates."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        blocks_per_stage: tuple[int, ...] = RESNET50_BLOCKS,
        widths: tuple[int, ...] = WIDTHS,
        block: str = "bottleneck",
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
        if block not in BLOCK_KINDS:
            raise ValueError(f"block must be one of {tuple(BLOCK_KINDS)}, got {block!r}")
        kind = BLOCK_KINDS[block]
        self.granularity = granularity
        self.blocks_per_stage = tuple(blocks_per_stage)
        self.block_kind = kind
        height, width, in_channels = input_shape

        stem_width = widths[0]
        self.stem = Conv(in_channels, stem_width, STEM_KERNEL, stride=2, padding=STEM_PAD,
                         use_bias=False, rngs=rngs)
        self.stem_bn = batch_norm(stem_width, rngs)
        height, width = strided(height, 2), strided(width, 2)
        # the stem is gated unless block 1 adds into it through an identity shortcut
        self.stem_gated = kind.expansion * widths[0] != stem_width
        stem_slot = self._unit_sources(("stem", 1)) if self.stem_gated else ()
        stem = Layer("stem", (STEM_KERNEL, STEM_KERNEL, in_channels, stem_width), height * width,
                     has_bias=False, outputs=stem_slot, kernel_slot=self._kernel_slot("stem"),
                     reads=(MODEL_INPUT,), norm="stem_bn")
        layers = [stem]
        unit_slots = []
        if self.stem_gated:
            unit_slots.append(GateSlot("stem", "stem", (stem_width,), 3, False, DROPRATE,
                                       stem.kernel_shape))
        height, width = strided(height, 2), strided(width, 2)
        streams = ResidualStreams("stem")
        blocks = []
        channels = stem_width
        for site in block_sites(blocks_per_stage, height, width):
            stage_width = widths[site.stage]
            out_features = kind.expansion * stage_width
            name, block_path = site.name, site.path
            residual = ResidualBlock(kind, channels, stage_width, site.stride, rngs=rngs)
            blocks.append(residual)
            last = f"{name}.{kind.convs[-1]}"
            stream_in = streams.join(site, last, projects=residual.shortcut is not None)
            gated_input = stem_slot if stream_in == "stem" else ()
            reads, inputs, positions = stream_in, gated_input, site.positions_in
            block_channels = channels
            for index, (conv, kernel) in enumerate(zip(kind.convs, kind.kernels)):
                layer_name = f"{name}.{conv}"
                features = out_features if conv == kind.convs[-1] else stage_width
                if index == kind.stride_at:
                    positions = site.positions
                gated = conv in kind.gated
                layers.append(Layer(
                    layer_name, (kernel, kernel, block_channels, features), positions,
                    has_bias=False, inputs=inputs,
                    outputs=self._unit_sources((layer_name, 1)) if gated else (),
                    kernel_slot=self._kernel_slot(layer_name), reads=(reads,),
                    norm=f"{block_path}.bn{index + 1}",
                ))
                if gated:
                    unit_slots.append(GateSlot(layer_name, layer_name, (features,), 3, False,
                                               DROPRATE, layers[-1].kernel_shape))
                reads, inputs = layer_name, self._unit_sources((layer_name, 1))
                block_channels = features
            if residual.shortcut is not None:
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
        kind = self.block_kind
        for i, block in enumerate(self.blocks, start=1):
            name = f"block{i}"
            h = block(
                h,
                train=train,
                unit_gates={
                    conv: z[f"{name}.{conv}"]
                    for conv in kind.gated
                    if unit and f"{name}.{conv}" in z
                },
                kernel_gates={
                    conv: self.kernel_gate(z, f"{name}.{conv}")
                    for conv in (*kind.convs, "shortcut")
                },
            )
        return self.fc(jnp.mean(h, axis=(1, 2)), self.kernel_gate(z, "fc"))


def resnet34(**kwargs) -> ImageNetResNet:
    """ResNet-34 (basic blocks [3, 4, 6, 3]); kwargs as :class:`ImageNetResNet` without
    ``blocks_per_stage``, ``widths`` and ``block``."""
    return ImageNetResNet(blocks_per_stage=RESNET34_BLOCKS, widths=WIDTHS, block="basic",
                          **kwargs)


def resnet50(**kwargs) -> ImageNetResNet:
    """ResNet-50 (bottleneck blocks [3, 4, 6, 3]); kwargs as :class:`ImageNetResNet` without
    ``blocks_per_stage``, ``widths`` and ``block``."""
    return ImageNetResNet(blocks_per_stage=RESNET50_BLOCKS, widths=WIDTHS, block="bottleneck",
                          **kwargs)
