"""Bookkeeping shared by the residual networks: output sizes, block sites and lookup, residual
streams.

A *residual stream* is the running sum a chain of blocks adds into: channel c of every layer that
writes into it (the stem, the last convolution of each block, a projection shortcut) is one unit,
declared as a :class:`~sparsejax.models.base.ChannelCoupling`. :class:`ResidualStreams` builds
these couplings while a model lays out its blocks, and says what a layer reading the stream names
in its :attr:`~sparsejax.models.base.Layer.reads`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from flax import nnx

from sparsejax.models.base import ChannelCoupling, GatedModel
from sparsejax.models.layers import Conv


def strided(size: int, stride: int) -> int:
    """Output size (size - 1) // stride + 1 of a k x k convolution or pooling with stride s and
    padding (k - 1) / 2 on each side (odd k), a 1x1 convolution with no padding included."""
    return (size - 1) // stride + 1


def projection(in_features: int, out_features: int, stride: int, rngs: nnx.Rngs) -> Conv | None:
    """The 1x1 projection shortcut of a block that changes the width or the resolution (strided,
    no bias); None when the identity fits."""
    if in_features == out_features and stride == 1:
        return None
    return Conv(in_features, out_features, 1, stride=stride, use_bias=False, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class BlockSite:
    """Where a block sits: its index through the network and stage (both from 0), its stride and
    the spatial positions (H * W) of its output map."""

    index: int
    stage: int
    stride: int
    positions: int

    @property
    def name(self) -> str:
        """The prefix of its layers' names, ``"block{index + 1}"``."""
        return f"block{self.index + 1}"

    @property
    def path(self) -> str:
        """Its attribute path, ``"blocks.{index}"``."""
        return f"blocks.{self.index}"

    @property
    def stream(self) -> str:
        """The name of the residual stream its stage starts, ``"stage{stage + 1}"``."""
        return f"stage{self.stage + 1}"


def block_sites(blocks_per_stage: Sequence[int], height: int, width: int) -> Iterator[BlockSite]:
    """The blocks of consecutive stages on ``height`` x ``width`` input maps, in network order; the
    first block of every stage but the first has stride 2."""
    index = 0
    for stage, count in enumerate(blocks_per_stage):
        for position in range(count):
            stride = 2 if stage > 0 and position == 0 else 1
            height, width = strided(height, stride), strided(width, stride)
            yield BlockSite(index, stage, stride, height * width)
            index += 1


def block_member(blocks: Sequence[nnx.Module], name: str) -> nnx.Module:
    """The module named ``"block{i}.{attribute}"``, blocks numbered from 1 through the network."""
    block, attribute = name.split(".")
    return getattr(blocks[int(block.removeprefix("block")) - 1], attribute)


class BlockNetwork(GatedModel):
    """A gated model whose blocks live in ``self.blocks`` and whose block layers are declared as
    ``"block{i}.{attribute}"`` (blocks numbered from 1); other layers are attributes."""

    def layer_module(self, name: str) -> nnx.Module:
        return block_member(self.blocks, name) if name.startswith("block") else getattr(self, name)


class ResidualStreams:
    """The channel couplings of a residual network, recorded block by block in network order.

    The first stream starts at ``source`` (the stem), which is its only producer until a block adds
    into it through an identity shortcut (:meth:`add`). A block whose zero-padding shortcut
    (:meth:`pad`, CIFAR ResNet option A) changes the width ends the stream and starts the next
    one: the shortcut copies the old stream into the new one at a channel offset, which ties both
    widths (both streams are ``fixed``). A stream is named after the stage of the first block that
    writes into it.

    Both methods return what the block's first convolution, which reads its input, names in its
    ``reads``.
    """

    def __init__(self, source: str):
        self._members: list[str] = [source]
        self._name: str | None = None
        self._shortcut_from: str | None = None
        self._fixed = False
        self._closed: list[ChannelCoupling] = []

    @property
    def current(self) -> str:
        """What a layer reading the stream now names in its ``reads``: the coupling, or the only
        producer while no block has added into the stream."""
        return self._members[0] if self._name is None else self._name

    def add(self, layer: str, stream: str) -> str:
        """``layer`` writes into the current stream (identity shortcut), which the block reads;
        the stream is named ``stream`` if it had no name yet."""
        self._members.append(layer)
        if self._name is None:
            self._name = stream
        return self._name

    def pad(self, layer: str, stream: str) -> str:
        """The block's last ``layer`` and the zero-padded current stream start ``stream``; the
        block reads the previous one."""
        previous = self.current
        self._fixed = True
        self._start((layer,), stream, shortcut_from=previous, fixed=True)
        return previous

    def couplings(self) -> tuple[ChannelCoupling, ...]:
        """Every stream recorded so far, the current one included."""
        return (*self._closed, *self._current_coupling())

    def _current_coupling(self) -> tuple[ChannelCoupling, ...]:
        if self._name is None:
            return ()
        coupling = ChannelCoupling(
            self._name, tuple(self._members), self._shortcut_from, self._fixed
        )
        return (coupling,)

    def _start(
        self, members: tuple[str, ...], stream: str, *, shortcut_from: str | None, fixed: bool
    ) -> None:
        self._closed.extend(self._current_coupling())
        self._members, self._name = list(members), stream
        self._shortcut_from, self._fixed = shortcut_from, fixed
