"""The blocks of a traced residual network, found from its trace: which unit slots sit inside a
block, and in which stage.

A *stream* is a group whose units a sum of two activations joins (a residual addition,
:attr:`~sparsejax.structure.trace.UnitGroup.stream`). A slot is *inside a block* when its group is
no stream and at most one layer besides its producers reads it (a basic block's ``conv1``, a
bottleneck's ``conv1`` and ``conv2``, a transformer's heads and FFN units, not the stem of an
ImageNet ResNet, read by the first block and its shortcut), and its *stage* is the rank of that
reader's output resolution (output positions per example, largest first), which each stage's
stride changes. A network with streams but no slot inside a block (branches joined by one
addition) is not taken for a network of blocks.

GReg's one ratio prunes the slots inside blocks (:func:`inside_blocks`), as the zoo's
declarations and the reference choose them: the stem and the streams keep their width (Wang et
al., ICLR 2021, ``meta_pruner.py``). Unit-structured gmp prunes every slot outside the streams
(:func:`outside_streams`), the stem of an ImageNet ResNet included, as the zoo does: a stream
unit has several filters and no one magnitude to rank it by.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sparsejax.structure.sparsify import gated_slices
from sparsejax.structure.trace import TracedStructure, UnitGroup
from sparsejax.structure.traced_model import TracedModel


def _readers(structure: TracedStructure, group: UnitGroup) -> set[str]:
    """The kernels of the layers that read ``group``'s units (its producers among them when
    they read it too)."""
    kernels = {layer.kernel for layer in structure.layers}
    return {s.path for s in gated_slices(structure, group)} & kernels


def _resolutions(structure: TracedStructure) -> dict[str, float] | None:
    """Output positions per example of every traced layer, by kernel path (MACs over
    weights); None for a network without streams, which has no blocks."""
    if not any(group.stream for group in structure.groups):
        return None
    return {c.kernel: c.macs / c.weights for c in structure.layer_counts() if c.weights}


def traced_stages(model: TracedModel) -> dict[str, int | None] | None:
    """For a traced network of residual blocks, the stage (0-based) of every unit slot inside a
    block, None for the others (module docstring); None for a network without streams or
    without a slot inside a block."""
    structure = model.structure
    positions = _resolutions(structure)
    if positions is None:
        return None
    resolution: dict[str, float | None] = {}
    for index, name in model.group_slots:
        group = structure.groups[index]
        produced = [path for path, _ in group.producers]
        readers = _readers(structure, group) - set(produced)
        inside = not group.stream and len(readers) <= 1
        resolution[name] = positions.get([*readers, produced[0]][0]) if inside else None
    ranks = sorted({r for r in resolution.values() if r is not None}, reverse=True)
    if not ranks:
        return None
    return {name: None if r is None else ranks.index(r) for name, r in resolution.items()}


def inside_blocks(names: Sequence[str], stages: Mapping[str, int | None] | None) -> list[str]:
    """The slots among ``names`` that GReg's one ratio prunes: on a residual network
    (``stages``: :func:`traced_stages`) those inside its blocks, so that the stem and the
    streams keep their width as in the zoo and the reference; every slot otherwise."""
    return list(names) if stages is None else [n for n in names if stages[n] is not None]


def outside_streams(model: TracedModel) -> list[str]:
    """The unit slots of ``model`` whose groups are no residual stream, in slot order, once
    each (a slot of heads gates two groups: queries with keys, and values)."""
    groups = model.structure.groups
    streams = {name for index, name in model.group_slots if groups[index].stream}
    return list(dict.fromkeys(name for _, name in model.group_slots if name not in streams))


def traced_layer_stages(model: TracedModel) -> dict[str, int] | None:
    """For a traced network of residual blocks, the entry of every layer in a stage list
    ``[stem, stage 1, ..., stage k, fc]``: 0 for the first layer, k + 1 for the last, and for
    any other layer 1 + the rank of the resolution of the stream it writes to (largest first):
    its own output resolution when it is a stream member (a block's last convolution or
    projection shortcut), else that of the one layer that reads it, followed until a member (a
    block's earlier convolutions). This is the zoo's weight-granularity rule, every kernel of a
    block at the block's stage. None unless the network has streams and every layer between the
    first and the last writes to one."""
    structure = model.structure
    resolution = _resolutions(structure)
    if resolution is None:
        return None
    produced: dict[str, list[int]] = {}
    for group in structure.groups:
        for path, _ in group.producers:
            produced.setdefault(path, []).append(group.index)

    def stream_resolution(kernel: str, seen: frozenset[str]) -> float | None:
        groups = [structure.groups[g] for g in produced.get(kernel, ())]
        if any(group.stream for group in groups):
            return resolution[kernel]
        if len(groups) != 1:
            return None
        readers = _readers(structure, groups[0]) - {kernel} - seen
        if len(readers) != 1:
            return None
        return stream_resolution(next(iter(readers)), seen | {kernel})

    names = [name for name, _, _ in model.layer_params]
    inner = {name: stream_resolution(kernel, frozenset())
             for name, kernel, _ in model.layer_params[1:-1]}
    if any(r is None for r in inner.values()):
        return None
    ranks = sorted(set(inner.values()), reverse=True)
    stages = {name: 1 + ranks.index(r) for name, r in inner.items()}
    return {names[0]: 0, **stages, names[-1]: len(ranks) + 1}
