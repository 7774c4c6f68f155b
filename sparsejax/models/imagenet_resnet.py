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

Gates: the ResNets are plain NNX modules gated from their trace
(:class:`~sparsejax.structure.traced_model.TracedModel`). Their ``gate_placements`` are
Dep-L0's (Li & Ji 2021): channel gates on the outputs of every convolution of a block but its
last (slots ``"block{i}.conv{j}"``, blocks numbered 1..16 through the network: conv1 of a basic
block, conv1 and conv2 of a bottleneck) and on the output of the stem (slot ``"stem"``) when no
block adds into it: ResNet-50's first block projects the stem's 64 channels to 256, while
ResNet-34's first stage adds into the stem's output through identity shortcuts, so there the
stem is a member of a residual stream, which is never gated (16 slots for ResNet-34, 33 for
ResNet-50). The gates act on their channels' readers (the next convolution's input rows; the
stem's on block 1's conv1 and shortcut): since a gate z >= 0 commutes with the ReLU and the max
pool, this equals the reference's gate after the BatchNorm, after the ReLU, and after the pool in
its hard-concrete variant. The last convolution of a block and the shortcuts are never gated,
so the residual streams keep their width. Initial drop rate 0.5 (the hard-concrete default).
With ``granularity="weight"`` every kernel gets its own weight gates instead.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.cifar_resnet import PAD_ONE, batch_norm
from sparsejax.models.layers import Conv, Dense
from sparsejax.models.placement import GatePlacement
from sparsejax.models.residual import block_sites, projection

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
    """The convolutions of ``kind``, each followed by BN and (all but the last) ReLU, plus the
    identity or a 1x1 projection with BN, then ReLU."""

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

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for index, conv in enumerate(self.kind.convs):
            h = getattr(self, f"bn{index + 1}")(getattr(self, conv)(h))
            if conv in self.kind.gated:
                h = nnx.relu(h)
        if self.shortcut is None:
            return nnx.relu(h + x)
        return nnx.relu(h + self.shortcut_bn(self.shortcut(x)))


class ImageNetResNet(nnx.Module):
    """ResNet for ImageNet-sized images with ``block="basic"`` or ``"bottleneck"`` blocks, a
    plain NNX module whose ``gate_placements`` are Dep-L0's (module docstring)."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        blocks_per_stage: tuple[int, ...] = RESNET50_BLOCKS,
        widths: tuple[int, ...] = WIDTHS,
        block: str = "bottleneck",
        num_classes: int = 1000,
        input_shape: tuple[int, ...] = IMAGENET_SHAPE,
    ):
        if len(blocks_per_stage) != len(widths) or min(blocks_per_stage, default=0) < 1:
            raise ValueError(
                f"need one positive block count per stage width; got blocks_per_stage="
                f"{tuple(blocks_per_stage)} for widths={tuple(widths)}"
            )
        if block not in BLOCK_KINDS:
            raise ValueError(f"block must be one of {tuple(BLOCK_KINDS)}, got {block!r}")
        kind = BLOCK_KINDS[block]
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        in_channels = input_shape[-1]
        stem_width = widths[0]
        self.stem = Conv(in_channels, stem_width, STEM_KERNEL, stride=2, padding=STEM_PAD,
                         use_bias=False, rngs=rngs)
        self.stem_bn = batch_norm(stem_width, rngs)
        placements = []
        if kind.expansion * widths[0] != stem_width:  # else block 1 adds into the stem's output
            placements.append(GatePlacement("stem", "stem", "output", DROPRATE))
        blocks = []
        channels = stem_width
        for site in block_sites(blocks_per_stage):
            blocks.append(ResidualBlock(kind, channels, widths[site.stage], site.stride,
                                        rngs=rngs))
            placements += [GatePlacement(f"{site.name}.{conv}", f"{site.path}.{conv}", "output",
                                         DROPRATE) for conv in kind.gated]
            channels = kind.expansion * widths[site.stage]
        self.blocks = nnx.List(blocks)
        self.fc = Dense(channels, num_classes, rngs=rngs)
        self.gate_placements = tuple(placements)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = stem_pool(nnx.relu(self.stem_bn(self.stem(x))))
        for block in self.blocks:
            h = block(h)
        return self.fc(jnp.mean(h, axis=(1, 2)))


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
