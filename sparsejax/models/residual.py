"""Bookkeeping shared by the residual networks: projection shortcuts and where each block
sits."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from flax import nnx

from sparsejax.models.layers import Conv


def projection(in_features: int, out_features: int, stride: int, rngs: nnx.Rngs) -> Conv | None:
    """The 1x1 projection shortcut of a block that changes the width or the resolution (strided,
    no bias); None when the identity fits."""
    if in_features == out_features and stride == 1:
        return None
    return Conv(in_features, out_features, 1, stride=stride, use_bias=False, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class BlockSite:
    """Where a block sits: its index through the network and stage (both from 0) and its
    stride."""

    index: int
    stage: int
    stride: int

    @property
    def name(self) -> str:
        """The prefix of its gate slots' names, ``"block{index + 1}"``."""
        return f"block{self.index + 1}"

    @property
    def path(self) -> str:
        """Its attribute path, ``"blocks.{index}"``."""
        return f"blocks.{self.index}"


def block_sites(blocks_per_stage: Sequence[int]) -> Iterator[BlockSite]:
    """The blocks of consecutive stages in network order; the first block of every stage but the
    first has stride 2."""
    index = 0
    for stage, count in enumerate(blocks_per_stage):
        for position in range(count):
            yield BlockSite(index, stage, 2 if stage > 0 and position == 0 else 1)
            index += 1
