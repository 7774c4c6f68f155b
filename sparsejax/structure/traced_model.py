"""Any plain Flax NNX model as the engine's :class:`~sparsejax.models.base.GatedModel`, from its
traced structure: :class:`TracedModel` and, for configs and the command line, the model spec
``MODULE:FACTORY`` (:func:`build_any_model`).

The engine and the methods see a model through its declarations: :class:`Layer` geometry (for
params and FLOPs), :class:`GateSlot` places for gates and :class:`ChannelCoupling` streams. A
:class:`TracedModel` derives them from :func:`~sparsejax.structure.trace.trace_structure` instead
of a hand-written declaration:

- **Layers**: one per traced dense or conv product, named after the module that holds its kernel
  (``"blocks.0.conv"``; the parameter's path when it is not called ``kernel``), with the
  kernel's geometry, its bias, and its output positions (MACs per kernel weight from the trace).
  A dense kernel's output axes are those that produce units and its input axes all before them,
  each side flattened (``nnx.LinearGeneral``'s ``(dim, heads, head_dim)`` is a ``(dim, heads *
  head_dim)`` layer). Its ``inputs`` are the gated groups with members on the input axes, placed
  by tile count or, for a concatenation, a head or any other arrangement, by
  :class:`UnitIndex`; its ``outputs`` the groups its output axes produce.
- **Activation products** (attention's ``Q K^T`` and ``A V``): one
  :attr:`~sparsejax.models.base.GatedModel.activation_products` layer per product the trace
  counted, so that FLOPs shrink with the heads and head dimensions kept.
- **Gate slots** at unit granularity: one per *removable* traced group (prunable, and no
  normaliser's statistic reads its units: a LayerNorm'd stream keeps every unit when slimmed,
  so a gate there would count producers' columns that never go), named after its first
  producer (with ``.axis{k}`` where that module produces several groups), ``(size,)`` gates.
  The gates act on the consumers, as :func:`sparsejax.sparsify` does
  (:func:`~sparsejax.structure.sparsify.gated_slices`): gate ``z_u`` multiplies the kernel rows
  of every layer that reads unit ``u`` while the forward pass runs, so a closed gate removes the
  unit exactly. ``group_params`` is the params one unit takes with it (its
  producers' kernel slices and biases and every consumer's rows), the ``|g|`` of the expected-L0
  penalty. For the methods that read a slot's layer (gated L2, group norms) the slot names its
  first producer and that kernel's output axis. Gates drawn per example (Dep-L0) scale each
  example's inputs of those kernels instead
  (:func:`~sparsejax.structure.example_gates.run_with_example_gates`). At weight granularity
  every traced kernel gets one gate per entry (a slot named after its layer, shaped like the
  kernel), multiplied into the kernel.
- **Couplings**: a group with several producers (a residual stream, or kernels tied by a
  product or a depthwise convolution) is a :class:`ChannelCoupling` of their layers (``fixed``
  when the group is not removable).
- **Gate placements** (``placements``, :class:`GatePlacement`): where a paper gates other units
  than every removable group, one placement per slot names a layer and a side. Its output units
  are their traced group, with the layer's kernel slice and bias as ``|g|``; its input units are
  their group when only that layer reads it, else an input selection of the layer's rows
  alone, with one row as ``|g|``; with ``norm``, the output of the normaliser after the layer
  (one member of a residual stream); with ``heads``, its output units by head (in
  grouped-query attention, the query heads that the trace tags inside each key/value group); with
  ``branch``, one gate on the layer's whole output that removes a residual branch (a
  transformer's sublayer); with ``stream``, the units of a residual stream that normalisers
  read (a transformer's hidden dimension): its gates multiply every write into it, its open
  mask the rows that read it, and the forward pass takes the normalisers' sums over its open
  units (:func:`~sparsejax.structure.example_gates.run_with_example_gates`). The zoo's
  models place their papers' gates so; placed, they gave the slots, accounting and logits
  their hand declarations had (BUILD_NOTES.md, one section per model).

- **Lookups and tied heads**: an embedding table whose rows are looked up is a layer
  ``(vocabulary, features)`` of no MACs (its params count; its features are units of the stream
  it starts); a table that is also read as a matrix product, transposed (a head tied to the
  embedding, ``nnx.Embed.attend``), is that product's layer, ``(features, vocabulary)`` with
  :attr:`~sparsejax.models.base.Layer.kernel_axes` ``(1, 0)``, counted once.

The wrapped module runs in NNX training mode (``model.train()``: BatchNorm on batch
statistics) when the engine trains and in evaluation mode (``model.eval()``) otherwise. What the
trace cannot map onto the layer geometry (a kernel whose outputs are neither its last axes nor,
for a matrix, its first, a kernel read by several products, parameters read outside a layer) is
refused with a :class:`~sparsejax.errors.ConfigError` naming the layer.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.models.base import (
    ChannelCoupling,
    GatedModel,
    GateFactory,
    GateSlot,
    Granularity,
    Layer,
    SlotMember,
    SpanSlot,
    UnitIndex,
    UnitSource,
    check_granularity,
)
from sparsejax.models.placement import DROPRATE_INIT, GatePlacement
from sparsejax.models.registry import MODELS, build_model
from sparsejax.structure.accounting import count_network
from sparsejax.structure.example_gates import run_with_example_gates
from sparsejax.structure.sparsify import (
    GatedSlice,
    gated_slices,
    layer_readers,
    parameters_gated,
    scaled_slice,
    variable_at,
)
from sparsejax.structure.trace import (
    OUTPUT_BLOCKER,
    Joint,
    Member,
    TracedLayer,
    TracedStructure,
    UnitGroup,
    trace_structure,
)
from sparsejax.user_code import import_named

COUNT_TOLERANCE = 1e-6
"""Relative difference allowed between the layer accounting (float32) and the exact trace."""
WHOLE_SIDE = 0
"""The tile of a slot in :func:`traced_layers`' ``added`` that is one unit for the whole side
of a layer (a branch gate)."""

Factory = Callable[..., nnx.Module]


@dataclasses.dataclass(frozen=True)
class LayerParameters:
    """What the methods read of a traced layer (:meth:`TracedModel.layer_module`): its kernel
    and bias variables (the bias None when the layer has none)."""

    kernel: nnx.Variable
    bias: nnx.Variable | None


@dataclasses.dataclass(frozen=True)
class _PlacedSlot:
    """A resolved :class:`GatePlacement`: its slot, the traced group it gates (None for an
    input selection or a normaliser's output) and where its gates act."""

    slot: GateSlot
    group: int | None
    slices: tuple[GatedSlice, ...]
    readers: tuple[str, ...] = ()
    reader_rows: tuple[GatedSlice, ...] = ()
    """For a normaliser's output: its readers' kernel rows that read it, one per unit."""
    summed: str | None = None
    """For a normaliser's output: its bias, where gates drawn per example scale the sum."""
    heads: tuple[int, ...] | None = None
    """For a placement with heads: the head (gate) of each unit of ``group``."""
    branch: tuple[str, ...] = ()
    """For a branch gate: the traced layers it switches off, its own layer first."""
    stream: bool = False
    """Whether ``group`` is a stream whose reductions are taken over its open units."""
    masked: tuple[GatedSlice, ...] = ()
    """For a stream: the rows of the kernels that read it, which its open mask multiplies."""
    lookups: tuple[GatedSlice, ...] = ()
    """For a stream: the embedding tables looked up into it (tied ones also among its
    readers), which its gates multiply where their rows are gathered."""
    tags: tuple[int, ...] = ()
    """For query heads inside key/value groups: the tag of each head (gate), in gate order
    (:mod:`~sparsejax.structure.trace.tags`); ``slices`` are the rows that read the heads."""
    carried: tuple[GatedSlice, ...] = ()
    """For query heads: the slices that go with the heads without their gates (the query
    projection's columns and bias)."""


def _covers(member: Member, size: int, group_size: int, heads: int) -> bool:
    """Whether a group member holds every index of an axis of ``size``, index i being unit i
    of a group of ``size`` units; for a placement with ``heads``, whatever units they are (a
    fused ``qkv`` projection's query and key columns share units, as do the query heads of a
    key/value group)."""
    whole = member.indices == tuple(range(size))
    return whole and (heads > 0 or (member.units == member.indices and group_size == size))


def _place(
    structure: TracedStructure, layers: dict[str, TracedLayer], placement: GatePlacement
) -> _PlacedSlot:
    """Resolve ``placement`` against the trace; see :class:`GatePlacement`.

    Raises:
      ConfigError: for an unknown layer or side, a side of several axes, output units that
        are not a prunable group, a normaliser or readers that do not fit, or heads that are
        no positive number, not on an output side or not found.
    """
    where = f"gate placement {placement.slot!r}"
    if placement.side not in ("input", "output"):
        raise ConfigError(f"{where}: side must be 'input' or 'output', got {placement.side!r}")
    if placement.heads:
        whole = isinstance(placement.heads, int) and not isinstance(placement.heads, bool)
        if not whole or placement.heads < 1:
            raise ConfigError(
                f"{where}: heads must be a positive whole number, got {placement.heads!r}"
            )
        if placement.side != "output" or placement.norm is not None:
            raise ConfigError(
                f"{where}: heads split a layer's output units; use side='output' without norm"
            )
    traced = layers.get(placement.layer)
    if traced is None:
        raise ConfigError(
            f"{where}: the traced model has no layer {placement.layer!r}; its layers are "
            f"{', '.join(layers)}"
        )
    if placement.branch:
        return _place_branch(structure, layers, placement)
    shape, in_axes, out_axes = _kernel_axes(structure, placement.layer, traced)
    axes = out_axes if placement.side == "output" else in_axes
    if placement.heads and len(axes) > 1:  # a (dim, heads, head_dim) kernel: its heads axis
        axes = tuple(a for a in axes if shape[a] == placement.heads)[:1] or axes
    if len(axes) != 1:
        raise ConfigError(
            f"{where}: the {placement.side}s of layer {placement.layer!r} span kernel axes "
            f"{list(axes)} of shape {shape}; place gates on a side with one axis"
            + (" (or give heads the size of one)" if placement.side == "output" else "")
        )
    axis, size = axes[0], shape[axes[0]]
    found = [
        g for g in structure.groups
        if (member := g.member(traced.kernel, axis)) is not None
        and _covers(member, size, g.size, placement.heads)
    ]
    group = found[0] if len(found) == 1 and found[0].removable else None
    slot = GateSlot(
        placement.slot, placement.layer, (size,), axis,
        placement.side == "output" and traced.bias is not None, placement.droprate_init, shape,
    )
    if placement.stream:
        return _place_stream(structure, placement, slot, found)
    if placement.norm is not None:
        return _place_after_norm(structure, layers, placement, slot, group)
    if placement.readers:
        raise ConfigError(f"{where}: readers are for a normaliser's output; give norm too")
    if placement.side == "output":
        if group is None:
            why = (found[0].obstacle.describe() if len(found) == 1
                   else f"{len(found)} traced groups hold them")
            raise ConfigError(
                f"{where}: the outputs of layer {placement.layer!r} are not a removable unit "
                f"group ({why}); place the gates on the inputs of the layers that read them, "
                "or on the output of the normaliser that follows it (norm=...)"
            )
        if placement.heads:
            return _place_heads(structure, placement, slot, group)
        return _PlacedSlot(slot, group.index, gated_slices(structure, group))
    own_rows = (GatedSlice(traced.kernel, axis, tuple(range(size)), tuple(range(size))),)
    if group is not None and gated_slices(structure, group) == own_rows:
        return _PlacedSlot(slot, group.index, own_rows)
    return _PlacedSlot(slot, None, own_rows)


def _unit_cost(
    structure: TracedStructure, placed: _PlacedSlot, placement: GatePlacement
) -> _PlacedSlot:
    """``placed`` with ``|g|`` everything one unit of its group removes when the placement
    asks for ``whole_unit``.

    Raises:
      ConfigError: for ``whole_unit`` on units that are no traced group, or with heads (a
        head's ``|g|`` is already all it removes).
    """
    if not placement.whole_unit:
        return placed
    if placed.group is None or placed.heads is not None:
        raise ConfigError(
            f"gate placement {placement.slot!r}: whole_unit counts a traced group's units; "
            f"the {placement.side}s of layer {placement.layer!r} here are "
            + ("heads, which count all they remove already" if placed.heads is not None
               else "no traced group")
        )
    unit = _unit_params(structure, structure.groups[placed.group])
    return dataclasses.replace(placed, slot=dataclasses.replace(placed.slot, group_params=unit))


def _place_heads(
    structure: TracedStructure, placement: GatePlacement, slot: GateSlot, group: UnitGroup
) -> _PlacedSlot:
    """A placement with ``heads`` (:class:`GatePlacement`): the output units of its layer, a
    removable group, one gate per head of a split that a product of two activations makes;
    else the query heads inside key/value groups that tags find (:func:`_place_query_heads`);
    else the units themselves when there are ``heads`` of them (a heads axis), or, with one
    head, one gate for every unit."""
    where = f"gate placement {placement.slot!r}"
    splits = structure.heads(group.index)
    head = next((s for s in splits if s.max() + 1 == placement.heads), None)
    if head is None and (query := _place_query_heads(structure, placement, slot, group)):
        return query
    if group.size == placement.heads:  # the heads are units already (a heads axis)
        splits = (np.arange(group.size), *splits)
    if placement.heads == 1:  # one head holds every unit
        splits = (np.zeros(group.size, np.int64), *splits)
    head = next((s for s in splits if s.max() + 1 == placement.heads), None)
    if head is None:
        found = sorted({int(s.max()) + 1 for s in splits})
        what = (f"the trace splits them into {' or '.join(map(str, found))} heads" if found
                else "no product of two activations splits them into heads")
        raise ConfigError(
            f"{where}: the outputs of layer {placement.layer!r} ({group.size} units) are not "
            f"split into {placement.heads} heads; {what}"
        )
    slices = tuple(
        GatedSlice(s.path, s.axis, s.indices, tuple(head[list(s.units)].tolist()))
        for s in gated_slices(structure, group)
    )
    slot = dataclasses.replace(slot, shape=(placement.heads,), gates_bias=False)
    return _PlacedSlot(slot, group.index, slices, heads=tuple(head.tolist()))


def _place_query_heads(
    structure: TracedStructure, placement: GatePlacement, slot: GateSlot, group: UnitGroup
) -> _PlacedSlot | None:
    """Query heads inside key/value groups (grouped-query attention): the ``heads`` tags
    (:mod:`~sparsejax.structure.trace.tags`) on every index of the placed layer's outputs
    (the query projection's columns) or of the rows that read its group (the output
    projection's rows, for the value projection), one gate per tag; None when neither has
    exactly ``heads`` tags. The gates act on the rows that read the heads (the output
    projection's: a gate scales its head's output); the other tagged slices (the query
    projection's columns and bias) go with their heads in the counts. Heads are numbered in
    the order they first meet those rows, ``|g|`` is everything one head removes."""
    kernel = next(l.kernel for l in structure.layers if _layer_name(l.kernel) == placement.layer)
    candidates = [(kernel, slot.axis), *((s.path, s.axis) for s in gated_slices(structure, group))]
    for path, axis in candidates:
        tags = structure.param_tags(path, axis)
        if tags is None or np.any(tags < 0) or len(set(tags.tolist())) != placement.heads:
            continue
        return _query_heads(structure, placement, slot, set(tags.tolist()))
    return None


def _query_heads(
    structure: TracedStructure, placement: GatePlacement, slot: GateSlot, tags: set[int]
) -> _PlacedSlot:
    """The placed slot of the query heads with ``tags`` (:func:`_place_query_heads`)."""
    kernels = {layer.kernel: layer for layer in structure.layers}
    acting, carried = [], []
    for path, axis, axis_tags in structure.tagged_axes(tags):
        layer = kernels.get(path)
        reads = layer is not None and axis in _kernel_axes(structure, _layer_name(path), layer)[1]
        indices = np.flatnonzero(axis_tags >= 0)
        (acting if reads else carried).append((path, axis, indices, axis_tags[indices]))
    if not acting:
        raise ConfigError(
            f"gate placement {placement.slot!r}: no layer reads the {placement.heads} query "
            f"heads of layer {placement.layer!r}, so no gate can scale their outputs"
        )
    order = list(dict.fromkeys(t for *_, found in acting for t in found.tolist()))
    head = {tag: k for k, tag in enumerate(order)}

    def sliced(path: str, axis: int, indices: np.ndarray, found: np.ndarray) -> GatedSlice:
        return GatedSlice(path, axis, tuple(indices.tolist()),
                          tuple(head[t] for t in found.tolist()))

    removed = sum(math.prod(structure.param_shapes[path]) // structure.param_shapes[path][axis]
                  * indices.size for path, axis, indices, _ in acting + carried)
    path, axis = acting[0][:2]
    slot = dataclasses.replace(
        slot, layer=_layer_name(path), shape=(placement.heads,), axis=axis, gates_bias=False,
        kernel_shape=structure.param_shapes[path], group_params=removed / placement.heads)
    return _PlacedSlot(slot, None, tuple(sliced(*a) for a in acting), tags=tuple(order),
                       carried=tuple(sliced(*c) for c in carried))


def _place_after_norm(
    structure: TracedStructure,
    layers: dict[str, TracedLayer],
    placement: GatePlacement,
    slot: GateSlot,
    group: UnitGroup | None,
) -> _PlacedSlot:
    """A placement on a normaliser's output (:class:`GatePlacement` with ``norm``): the slot
    of ``group``, the layer's outputs when they are a removable group, or else of that output
    alone, with its readers."""
    where = f"gate placement {placement.slot!r}"
    if placement.side != "output":
        raise ConfigError(f"{where}: norm gates a layer's output; use side='output'")
    size = slot.shape[0]
    params = {f"{placement.norm}.{name}": name for name in ("scale", "bias")}
    shapes = {name: structure.param_shapes.get(path) for path, name in params.items()}
    if any(shape != (size,) for shape in shapes.values()):
        raise ConfigError(
            f"{where}: norm {placement.norm!r} must have a scale and a bias of shape ({size},), "
            f"the outputs of layer {placement.layer!r}; it has {shapes}"
        )
    units = tuple(range(size))
    slices = tuple(GatedSlice(path, 0, units, units) for path in params)
    if group is not None:
        if placement.readers:
            raise ConfigError(
                f"{where}: the outputs of layer {placement.layer!r} are a removable group, "
                "which its gates remove with every reader; leave readers out"
            )
        return _PlacedSlot(slot, group.index, slices, summed=f"{placement.norm}.bias")
    unknown = sorted(set(placement.readers) - set(layers))
    if unknown:
        raise ConfigError(f"{where}: the readers {unknown} are not traced layers")
    reader_rows = []
    for reader in placement.readers:
        shape, in_axes, _ = _kernel_axes(structure, reader, layers[reader])
        if [shape[axis] for axis in in_axes] != [size]:
            raise ConfigError(
                f"{where}: reader {reader!r} must read the {size} outputs of {placement.norm!r} "
                f"on one kernel axis; its kernel of shape {shape} has input axes {list(in_axes)}"
            )
        reader_rows.append(GatedSlice(layers[reader].kernel, in_axes[0], units, units))
    return _PlacedSlot(slot, None, slices, tuple(placement.readers), tuple(reader_rows),
                       f"{placement.norm}.bias")


def _place_stream(
    structure: TracedStructure,
    placement: GatePlacement,
    slot: GateSlot,
    found: Sequence[UnitGroup],
) -> _PlacedSlot:
    """A placement on a residual stream that normalisers read (:class:`GatePlacement` with
    ``stream``): the stream's group, its gates on every write into it, its open mask on the
    rows that read it; ``|g|`` is everything one unit removes.

    Raises:
      ConfigError: for units that are no one prunable group, with heads or norm, a named
        normaliser with no parameter in the stream, or a reduction over the stream that is no
        sum (a max cannot be taken over the open units by rescaling).
    """
    where = f"gate placement {placement.slot!r}"
    if placement.heads or placement.norm is not None or placement.whole_unit:
        raise ConfigError(f"{where}: a stream takes one gate per unit; leave out heads, norm "
                          "and whole_unit")
    if len(found) != 1 or not found[0].prunable:
        why = (found[0].obstacle.describe() if len(found) == 1
               else f"{len(found)} traced groups hold them")
        raise ConfigError(f"{where}: the {placement.side}s of layer {placement.layer!r} are no "
                          f"prunable stream ({why})")
    group = found[0]
    others = sorted({c.primitive for c in group.caveats} - {"reduce_sum"})
    if others:
        raise ConfigError(f"{where}: the stream is reduced by {', '.join(others)}; only sums "
                          "(means) over its units can be taken over the open units")
    norms = tuple(f"{norm}." for norm in placement.stream)
    absent = [norm for norm, prefix in zip(placement.stream, norms)
              if not any(m.path.startswith(prefix) for m in group.members)]
    if absent:
        raise ConfigError(f"{where}: {absent} have no parameter on the stream of layer "
                          f"{placement.layer!r}; name the normalisers that read it")
    readers = layer_readers(structure, group)
    read = {(m.path, m.axis) for m in readers}
    writes = tuple(
        GatedSlice(m.path, m.axis, m.indices, m.units) for m in group.members
        if (m.path, m.axis) not in read and not m.path.startswith(norms)
        and m.path not in structure.tables
    )
    masked = tuple(GatedSlice(m.path, m.axis, m.indices, m.units) for m in readers)
    lookups = tuple(GatedSlice(m.path, m.axis, m.indices, m.units) for m in group.members
                    if m.path in structure.tables)
    slot = dataclasses.replace(slot, gates_bias=False, group_params=_unit_params(structure, group))
    return _PlacedSlot(slot, group.index, writes, stream=True, masked=masked, lookups=lookups)


def _place_branch(
    structure: TracedStructure, layers: dict[str, TracedLayer], placement: GatePlacement
) -> _PlacedSlot:
    """A branch gate (:class:`GatePlacement` with ``branch``): one gate on the whole output
    of its layer, switching off the layers of its branch with it.

    Raises:
      ConfigError: with another side, heads, a normaliser, readers or ``whole_unit``; for a
        branch entry that is no traced layer, or a branch layer whose outputs a layer outside
        the branch reads.
    """
    where = f"gate placement {placement.slot!r}"
    if (placement.side != "output" or placement.heads or placement.norm is not None
            or placement.readers or placement.whole_unit):
        raise ConfigError(
            f"{where}: a branch gate is one gate on a layer's whole output; use side='output' "
            "without heads, norm, readers or whole_unit"
        )
    unknown = sorted(set(placement.branch) - set(layers))
    if unknown:
        raise ConfigError(f"{where}: the branch layers {unknown} are not traced layers")
    names = tuple(dict.fromkeys((placement.layer, *placement.branch)))
    kernels = {layers[name].kernel for name in names}
    for name in names[1:]:
        kernel = layers[name].kernel
        for group in structure.groups:
            if any(path == kernel for path, _ in group.producers):
                outside = sorted({_layer_name(m.path) for m in layer_readers(structure, group)
                                  if m.path not in kernels})
                if outside:
                    raise ConfigError(
                        f"{where}: layer {name!r} of the branch also feeds {outside}; a branch "
                        f"holds the layers that only feed layer {placement.layer!r}"
                    )
    traced = layers[placement.layer]
    shape, in_axes, out_axes = _kernel_axes(structure, placement.layer, traced)
    if len(out_axes) != 1:
        raise ConfigError(
            f"{where}: the outputs of layer {placement.layer!r} span kernel axes "
            f"{list(out_axes)} of shape {shape}; a branch gate needs one output axis"
        )
    columns = tuple(range(shape[out_axes[0]]))
    slices = (GatedSlice(traced.kernel, out_axes[0], columns, (0,) * len(columns)),)
    if traced.bias is not None:
        slices += (GatedSlice(traced.bias, 0, columns, (0,) * len(columns)),)
    removed = sum(
        math.prod(structure.param_shapes[path])
        for name in names for path in (layers[name].kernel, layers[name].bias) if path
    )
    slot = GateSlot(placement.slot, placement.layer, (1,), in_axes[-1], False,
                    placement.droprate_init, shape, group_params=removed)
    return _PlacedSlot(slot, None, slices, branch=names)


def _branch_products(
    structure: TracedStructure, layers: Mapping[str, TracedLayer], branch: Sequence[str]
) -> tuple[int, ...]:
    """The products of two activations that read the outputs of the layers ``branch``."""
    kernels = {layers[name].kernel for name in branch}
    produced = {g.index for g in structure.groups
                if any(path in kernels for path, _ in g.producers)}
    found = []
    for index, factors in enumerate(structure.products):
        ids = [np.asarray(i).reshape(-1) for f in factors if not isinstance(f, int)
               for i in (f.ids if isinstance(f, Joint) else (f,))]
        groups = {int(g) for f in ids for g in structure.unit_places(np.maximum(f, 0))[0]}
        if groups & produced:
            found.append(index)
    return tuple(found)


def _added_sources(
    structure: TracedStructure, placed: Sequence[_PlacedSlot]
) -> dict[tuple[str, str], UnitSource]:
    """The layer sides that placed slots without a traced group switch off: an input
    selection its layer's inputs one by one; a normaliser's output its layer's outputs and
    its readers' inputs one by one; a branch gate every output of its layers, and of the
    products of two activations that read them (``("outputs", "product{i}")``)."""
    layers = {_layer_name(layer.kernel): layer for layer in structure.layers}
    added: dict[tuple[str, str], UnitSource] = {}
    for p in placed:
        if p.group is not None:
            continue
        if p.tags:
            for side, source in _query_sources(structure, layers, p):
                added[side] = added.get(side, ()) + (source,)
            continue
        if p.branch:
            sides = [(("outputs", name), WHOLE_SIDE) for name in p.branch] + [
                (("outputs", f"product{i}"), WHOLE_SIDE)
                for i in _branch_products(structure, layers, p.branch)]
        elif p.summed is None:
            sides = [(("inputs", p.slot.layer), 1)]
        else:
            sides = [(("outputs", p.slot.layer), 1),
                     *((("inputs", reader), 1) for reader in p.readers)]
        for side, tile in sides:
            added[side] = added.get(side, ()) + ((p.slot.name, tile),)
    return added


def _query_sources(
    structure: TracedStructure, layers: Mapping[str, TracedLayer], placed: _PlacedSlot
) -> Iterator[tuple[tuple[str, str], tuple[str, int | UnitIndex]]]:
    """The layer sides that query heads switch off: the kernel slices of their rows and
    columns, each index with its head."""
    for s in (*placed.slices, *placed.carried):
        name = _layer_name(s.path)
        layer = layers.get(name)
        if layer is None or layer.kernel != s.path:
            continue  # a bias: counted with its layer's outputs
        shape, in_axes, out_axes = _kernel_axes(structure, name, layer)
        axes = in_axes if s.axis in in_axes else out_axes
        sizes = tuple(shape[a] for a in axes)
        where = _placement(np.asarray(s.indices), np.asarray(s.units), sizes, axes.index(s.axis),
                           placed.slot.shape[0])
        yield ("inputs" if axes is in_axes else "outputs", name), (placed.slot.name, where)


def _placed_slots(
    structure: TracedStructure, placements: Sequence[GatePlacement]
) -> tuple[_PlacedSlot, ...]:
    """Every placement resolved, in order. The input units of a layer that are a group which
    an output placement gates too are an input selection of the layer's rows (two gates in
    series: LeNet-5's conv2 channels and fc1's inputs on an image small enough to leave one
    position). A group placed twice otherwise is refused, and so is a slot name given twice,
    except to placements with the same ``heads`` and drop rate (one slot of heads over several
    layers)."""
    layers = {_layer_name(layer.kernel): layer for layer in structure.layers}
    resolved = [(placement, _place(structure, layers, placement)) for placement in placements]
    output_groups = {p.group for placement, p in resolved if placement.side == "output"}
    placed: list[_PlacedSlot] = []
    given: list[GatePlacement] = []
    for placement, p in resolved:
        if placement.side == "input" and p.group in output_groups:
            p = dataclasses.replace(p, group=None)
        p = _unit_cost(structure, p, placement)
        if placement.heads and any((q.slot.name, q.group, q.tags) == (p.slot.name, p.group, p.tags)
                                   for q in placed):
            continue  # the query and the value projections' heads axis (or tags): one slot
        placed.append(p)
        given.append(placement)
    names = [p.slot for p in given]

    def shared(name: str) -> bool:
        kinds = {(p.heads, p.droprate_init) for p in given if p.slot == name}
        return len(kinds) == 1 and next(iter(kinds))[0] > 0

    problems = sorted({
        f"slot name {name}" for name in names if names.count(name) > 1 and not shared(name)
    })
    targets = [
        f"traced group {p.group}" if p.group is not None
        else f"the outputs of {p.summed.removesuffix('.bias')!r}" if p.summed
        else f"the branch of layer {p.slot.layer!r}" if p.branch
        else f"the inputs of layer {p.slot.layer!r}"
        for p in placed
    ]
    problems += sorted({t for t in targets if targets.count(t) > 1})
    if problems:
        raise ConfigError(
            f"gate placements: {', '.join(problems)} placed twice (only placements with the "
            "same heads and drop rate share a slot name)"
        )
    return tuple(placed)


def _added_parameters(
    structure: TracedStructure, placed: Sequence[_PlacedSlot]
) -> tuple[str, ...]:
    """The layers' biases and the writes of stream placements that are no layer's kernel (see
    :attr:`TracedModel.added`)."""
    kernels = {layer.kernel for layer in structure.layers}
    writes = {s.path for p in placed if p.stream for s in p.slices} - kernels
    return tuple(sorted({layer.bias for layer in structure.layers if layer.bias} | writes))


def open_mask(z: jax.Array) -> jax.Array:
    """1 where a gate is open (nonzero), 0 where it is closed: what a stream's readers' rows
    are multiplied by."""
    return (z != 0).astype(z.dtype)


def _layer_name(kernel_path: str) -> str:
    """The name of the layer whose kernel is the parameter ``kernel_path``: its module,
    ``"blocks.0.conv"`` for ``"blocks.0.conv.kernel"`` (``"tokens"`` for an ``nnx.Embed``'s
    ``"tokens.embedding"``), or the parameter's own path when it is called otherwise (a module
    holding several weights)."""
    module, _, name = kernel_path.rpartition(".")
    return module if module and name in ("kernel", "embedding") else kernel_path


def _placement(
    indices: np.ndarray, units: np.ndarray, sizes: tuple[int, ...], position: int, group_size: int
) -> int | UnitIndex:
    """Where a group's units sit among the units of a layer side whose axes have ``sizes``
    (flattened in C order): index ``indices[k]`` of axis ``position`` goes with unit
    ``units[k]``. A tile count when the group repeats over the whole side in order (channel
    fastest), else the explicit :class:`UnitIndex`."""
    total = math.prod(sizes)
    grid = np.moveaxis(np.arange(total).reshape(sizes), position, 0)
    flat = grid[np.asarray(indices, np.int64)].reshape(len(indices), -1)
    unit_of = np.broadcast_to(np.asarray(units, np.int64)[:, None], flat.shape)
    order = np.argsort(flat, axis=None)
    flat, unit_of = flat.reshape(-1)[order], unit_of.reshape(-1)[order]
    tiled = (
        flat.size == total
        and total % group_size == 0
        and np.array_equal(unit_of, np.arange(total) % group_size)
    )
    if tiled:
        return total // group_size
    return UnitIndex(tuple(flat.tolist()), tuple(unit_of.tolist()), group_size)


def _slot_names(structure: TracedStructure) -> dict[int, str]:
    """Slot name of every removable group (prunable, no normaliser's statistic reads it): its
    first producer's module, followed by the producing axis (``"attn.query.axis1"``, the
    heads) where one module produces several groups."""
    removable = [g for g in structure.groups if g.removable]
    modules = [_layer_name(g.producers[0][0]) for g in removable]
    return {
        g.index: module if modules.count(module) == 1 else f"{module}.axis{g.producers[0][1]}"
        for g, module in zip(removable, modules)
    }


def _unit_params(structure: TracedStructure, group: UnitGroup) -> float:
    """Params removed with one unit of ``group`` (all its units alike)."""
    removed = structure.count().params - structure.count({group.index: 0.0}).params
    return removed / group.size


def _layer_axes(
    name: str, shape: tuple[int, ...], kind: str, outputs: set[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The input and output axes of a traced kernel: a convolution's second to last and last
    (the others are its window); a dense product's output axes are those producing units
    (several for a projection into heads, ``(in, heads, head_dim)``), all before them its
    inputs (several for a projection out of heads, ``(heads, head_dim, out)``); a matrix
    stored ``(out, in)`` and applied transposed (a tied embedding as the output head) has its
    output axis first.

    Raises:
      ConfigError: for a kernel not laid out (..., inputs, outputs) or (out, in).
    """
    last = len(shape) - 1
    if kind == "conv":
        in_axes, out_axes = (last - 1,), (last,)
    elif outputs == {0} and last == 1:
        in_axes, out_axes = (1,), (0,)
    elif outputs:
        in_axes, out_axes = tuple(range(min(outputs))), tuple(range(min(outputs), last + 1))
    else:
        in_axes, out_axes = tuple(range(last)), (last,)
    complete = kind == "conv" or not outputs or outputs == set(out_axes)
    if not in_axes or not outputs <= set(out_axes) or not complete:
        raise ConfigError(
            f"traced model: layer {name!r} has a kernel of shape {shape} whose outputs are on "
            f"axes {sorted(outputs)}; the accounting needs kernels laid out (..., inputs, "
            "outputs) like nnx.Linear, nnx.LinearGeneral and nnx.Conv, or matrices (outputs, "
            "inputs)"
        )
    return in_axes, out_axes


def _kernel_axes(
    structure: TracedStructure, name: str, layer: TracedLayer
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The shape of traced layer ``name``'s kernel and its input and output axes
    (:func:`_layer_axes`)."""
    shape = structure.param_shapes[layer.kernel]
    outputs = {axis for g in structure.groups for path, axis in g.producers if path == layer.kernel}
    return (shape, *_layer_axes(name, shape, layer.kind, outputs))


Heads = Mapping[int, np.ndarray]
"""Per group gated by heads (:attr:`GatePlacement.heads`), the head (gate) of each unit."""


def _placed_sources(
    structure: TracedStructure,
    slots: dict[int, str],
    sizes: tuple[int, ...],
    found: Iterable[tuple[int, int, np.ndarray, np.ndarray]],
    heads: Heads,
) -> UnitSource:
    """The gated ones among ``found`` (``(position, group, indices, units)``: index
    ``indices[k]`` of axis ``position`` of a side with axes of ``sizes`` carries unit
    ``units[k]`` of ``group``), each placed among the units of the side flattened; a group
    gated by heads places its units' heads."""
    sources = []
    for position, group, indices, units in found:
        if group not in slots:
            continue
        head = heads.get(group)
        gates, size = (units, structure.groups[group].size) if head is None else (
            head[units], int(head.max()) + 1)
        sources.append((slots[group], _placement(indices, gates, sizes, position, size)))
    return tuple(sources)


def _side_sources(
    structure: TracedStructure,
    slots: dict[int, str],
    path: str,
    axes: tuple[int, ...],
    heads: Heads,
) -> UnitSource:
    """The gated groups with members on ``axes`` of parameter ``path``, placed among the
    units of those axes flattened."""
    found = (
        (position, group.index, np.asarray(member.indices), np.asarray(member.units))
        for position, axis in enumerate(axes)
        for group in structure.groups
        if (member := group.member(path, axis)) is not None
    )
    sizes = tuple(structure.param_shapes[path][a] for a in axes)
    return _placed_sources(structure, slots, sizes, found, heads)


def _whole_sides(sources: UnitSource, size: int) -> UnitSource:
    """``sources`` with a tile of :data:`WHOLE_SIDE` made the side's ``size``."""
    return tuple((name, size if tile == WHOLE_SIDE else tile) for name, tile in sources)


def traced_layers(
    structure: TracedStructure,
    slots: dict[int, str],
    granularity: Granularity,
    added: Mapping[tuple[str, str], UnitSource] | None = None,
    heads: Heads | None = None,
) -> tuple[Layer, ...]:
    """The :class:`Layer` of every traced layer, in network order; ``slots`` names the gated
    groups (their units switch layer units off at unit granularity, or their heads' gates
    do for the groups in ``heads``), ``added`` the slots that are no traced group but switch
    off a layer's ``("inputs" | "outputs", layer name)``: one unit per index, or with a tile
    of :data:`WHOLE_SIDE` one unit for the whole side (input selections, normalisers' outputs
    and branch gates, :class:`GatePlacement`). A dense kernel
    with several input or output axes is one layer of shape ``(inputs, outputs)``, each side
    flattened in C order.

    Raises:
      ConfigError: for a layer the geometry cannot describe.
    """
    producer_axes = {p for g in structure.groups for p in g.producers}
    added = added or {}
    names = [_layer_name(layer.kernel) for layer in structure.layers]
    if len(set(names)) != len(names):
        shared = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(
            f"traced model: the kernels of {shared} are read by several products (tied or "
            "shared weights), which the layer accounting cannot count; use one kernel per product"
        )
    layers = []
    for name, layer, count in zip(names, structure.layers, structure.layer_counts()):
        shape, in_axes, out_axes = _kernel_axes(structure, name, layer)
        positions = count.macs / count.weights
        if positions != round(positions):
            raise ConfigError(
                f"traced model: layer {name!r} has {count.macs} MACs for {count.weights} weights, "
                "not a whole number of output positions"
            )
        unit = granularity == "unit"
        reads_itself = any((layer.kernel, axis) in producer_axes for axis in in_axes)
        window = shape[: min(in_axes + out_axes)]
        fan_in, fan_out = (math.prod(shape[a] for a in axes) for axes in (in_axes, out_axes))
        order = (*range(len(window)), *in_axes, *out_axes)
        layers.append(
            Layer(
                name,
                (*window, fan_in, fan_out),
                int(round(positions)),
                has_bias=layer.bias is not None,
                inputs=_whole_sides(added.get(("inputs", name), ()), fan_in)
                + (_side_sources(structure, slots, layer.kernel, in_axes, heads or {})
                   if unit and not reads_itself else ()),
                outputs=_whole_sides(added.get(("outputs", name), ()), fan_out)
                + (_side_sources(structure, slots, layer.kernel, out_axes, heads or {})
                   if unit else ()),
                kernel_slot=name if granularity == "weight" and not layer.reparametrised
                else None,
                kernel_axes=None if order == tuple(range(len(shape))) else order,
            )
        )
    return tuple(layers)


MAX_PRODUCT_UNITS = 1 << 20
"""The most unit combinations an activation product may span in the layer accounting."""


def traced_products(
    structure: TracedStructure,
    slots: dict[int, str],
    heads: Heads | None = None,
    added: Mapping[tuple[str, str], UnitSource] | None = None,
    tagged: Mapping[int, tuple[str, int, int]] | None = None,
) -> tuple[Layer, ...]:
    """The products of two activations (attention's ``Q K^T`` and ``A V``) as
    :attr:`~sparsejax.models.base.GatedModel.activation_products`: a product whose MACs are
    ``n * prod_f sum(kept units of factor f)`` (``n`` its fixed sizes per example) is a layer
    ``product{i}`` of shape ``(units of the first factor, units of the others combined)`` at
    ``n`` positions, each factor's gated units placed on its side (and the query heads of
    ``tagged``, ``tag: (slot, head, heads)``, on the positions of a :class:`Joint` factor),
    and the slots in ``added`` (as for :func:`traced_layers`: a branch gate) on its outputs.

    Raises:
      ConfigError: for a product the accounting cannot hold (a fraction of a position per
        example, more than :data:`MAX_PRODUCT_UNITS` unit combinations).
    """
    products = []
    for index, factors in enumerate(structure.products):
        fixed = math.prod(int(f) for f in factors if isinstance(f, int))
        unit_factors = [f for f in factors if not isinstance(f, int)]
        positions = fixed / structure.batch_size
        combinations = math.prod(f.size for f in unit_factors[1:])
        if positions != round(positions) or combinations > MAX_PRODUCT_UNITS:
            raise ConfigError(
                f"traced model: product {index} of two activations ({fixed} fixed MACs over a "
                f"batch of {structure.batch_size}, {combinations} unit combinations) cannot be "
                "counted by the layer accounting"
            )
        sides = [unit_factors[:1], unit_factors[1:]]
        sources = [_factor_sources(structure, slots, side, heads or {}, tagged or {})
                   for side in sides]
        name = f"product{index}"
        products.append(
            Layer(
                name,
                (math.prod(f.size for f in sides[0]), combinations),
                int(round(positions)),
                has_bias=False,
                inputs=sources[0],
                outputs=_whole_sides((added or {}).get(("outputs", name), ()), combinations)
                + sources[1],
            )
        )
    return tuple(products)


def _factor_sources(
    structure: TracedStructure,
    slots: dict[int, str],
    factors: list[np.ndarray | Joint],
    heads: Heads,
    tagged: Mapping[int, tuple[str, int, int]],
) -> UnitSource:
    """The gated groups among the unit ids of ``factors`` (and the gated query heads among
    the tags of a :class:`Joint`), placed among their combinations (C order)."""

    def found(position: int, ids: np.ndarray) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        ids = ids.reshape(-1)
        groups, units = structure.unit_places(np.where(ids < 0, 0, ids))
        groups = np.where(ids < 0, -1, groups)
        for group in sorted(set(groups.tolist())):
            where = np.flatnonzero(groups == group)
            yield position, group, where, units[where]

    every = (item for position, f in enumerate(factors)
             for ids in (f.ids if isinstance(f, Joint) else (f,)) for item in found(position, ids))
    sizes = tuple(f.size for f in factors)
    sources = _placed_sources(structure, slots, sizes, every, heads)
    for position, f in enumerate(factors):
        if not isinstance(f, Joint):
            continue
        tags = f.tags.reshape(-1)
        by_slot: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for index, tag in enumerate(tags.tolist()):
            if tag in tagged:
                name, head, count = tagged[tag]
                by_slot.setdefault((name, count), []).append((index, head))
        for (name, count), pairs in by_slot.items():
            indices, units = map(np.asarray, zip(*pairs))
            sources += ((name, _placement(indices, units, sizes, position, count)),)
    return sources


def _check_counts(
    structure: TracedStructure, layers: tuple[Layer, ...], products: tuple[Layer, ...]
) -> None:
    """The layer accounting of the dense network must give the trace's params and FLOPs
    (computed from the geometry alone, also while the model is built on shapes only)."""
    traced = structure.count()
    with jax.ensure_compile_time_eval():
        declared = count_network(layers, {}, products)
    for what, exact in (("params", traced.params), ("flops", traced.flops)):
        value = float(declared[what])
        if abs(value - exact) > COUNT_TOLERANCE * max(exact, 1.0):
            raise ConfigError(
                f"traced model: the layers account for {value:.0f} {what} but the trace finds "
                f"{exact:.0f} (parameters read outside a dense or conv layer are not supported "
                "yet)"
            )


def _heads_slots(placed: Sequence[_PlacedSlot]) -> dict[str, list[_PlacedSlot]]:
    """The placed slots with heads, by name: the placements (one per layer) that share it."""
    found: dict[str, list[_PlacedSlot]] = {}
    for p in placed:
        if p.heads is not None:
            found.setdefault(p.slot.name, []).append(p)
    return found


def _carried(
    structure: TracedStructure, placed: Sequence[_PlacedSlot]
) -> tuple[tuple[int, str], ...]:
    """``(group, slot name)`` of the groups of a slot with heads that no layer reads (queries
    and keys, read by the scores) while another group of the slot is read by one (the values,
    read by the output projection): they go with their heads, and the gates act only where
    a layer reads the heads' units."""
    carried = []
    for name, parts in _heads_slots(placed).items():
        read = [bool(layer_readers(structure, structure.groups[p.group])) for p in parts]
        if any(read):
            carried += [(p.group, name) for p, r in zip(parts, read) if not r]
    return tuple(carried)


def _joined_slots(
    structure: TracedStructure,
    placed: Sequence[_PlacedSlot],
    gated: Sequence[tuple[str, tuple[GatedSlice, ...]]],
) -> list[GateSlot]:
    """One gate slot per placed slot name, in order. A slot with heads names the first kernel
    its gates act on (``gated``), along that axis (the output projection's rows), and removes
    per gate the params of one head of each of its groups."""
    slots = {p.slot.name: p.slot for p in reversed(placed)}
    kernels = {layer.kernel for layer in structure.layers}
    for name, parts in _heads_slots(placed).items():
        acting = next(s for s in dict(gated)[name] if s.path in kernels)
        closed = structure.count({p.group: 0.0 for p in parts}).params
        slots[name] = dataclasses.replace(
            slots[name],
            layer=_layer_name(acting.path),
            axis=acting.axis,
            kernel_shape=structure.param_shapes[acting.path],
            group_params=(structure.count().params - closed) / slots[name].shape[0],
        )
    return [slots[name] for name in dict.fromkeys(p.slot.name for p in placed)]


def _joined_slices(
    placed: Sequence[_PlacedSlot], carried: Sequence[tuple[int, str]]
) -> tuple[tuple[str, tuple[GatedSlice, ...]], ...]:
    """Per slot name, in order, the slices its gates act on: those of every placement with
    that name but the carried groups'."""
    skipped = {group for group, _ in carried}
    slices: dict[str, tuple[GatedSlice, ...]] = {}
    for p in placed:
        kept = () if p.group in skipped else p.slices
        slices[p.slot.name] = slices.get(p.slot.name, ()) + kept
    return tuple(slices.items())


@dataclasses.dataclass(frozen=True)
class StreamGates:
    """Where the gates of a stream placement act besides its writes (:class:`GatePlacement`
    with ``stream``): ``slot``, its ``group``, the ``(kernel path, axis)`` of its first
    producer (which names the group in any trace of the module), the ``rows`` of the kernels
    that read it (multiplied by the open mask z != 0) and the ``lookups``, the embedding tables
    gathered into the stream (tied ones among the rows too), whose gathered rows the gates
    multiply: per example as well, and a tied table's head reads it ungated."""

    slot: str
    group: int
    producer: tuple[str, int]
    rows: tuple[GatedSlice, ...]
    lookups: tuple[GatedSlice, ...]


@dataclasses.dataclass(frozen=True)
class QueryHeads:
    """A slot of query heads inside key/value groups (:func:`_place_query_heads`): ``slot``,
    the query-head ``tags`` of its gates in order
    (:mod:`~sparsejax.structure.trace.tags`), the ``rows`` its gates act on (the output
    projection's) and the ``carried`` slices that go with the heads (the query projection's
    columns and bias), each index with its head."""

    slot: str
    tags: tuple[int, ...]
    rows: tuple[GatedSlice, ...]
    carried: tuple[GatedSlice, ...]

    @property
    def slices(self) -> tuple[GatedSlice, ...]:
        return self.rows + self.carried


class TracedModel(GatedModel):
    """A plain NNX module ``net`` (images NHWC -> logits, or with an integer ``input_dtype``
    token ids ``(batch, T)`` -> logits ``(batch, T, num_classes)``) gated and counted from its
    trace; see the module docstring. ``droprate_init`` is the initial drop rate of the gates
    that no placement sets (weight gates, the slots of every removable group).

    Attributes:
      net: the wrapped module; its parameters are trained as they are (gates scale them only
        while the forward pass runs).
      structure: the :class:`~sparsejax.structure.trace.TracedStructure` of ``net`` in
        evaluation mode on one example of ``input_shape`` and ``input_dtype``.
      group_slots: ``(group index, slot name)`` of every gated group (unit granularity).
      placed: whether the slots come from :class:`GatePlacement` s (``placements``) rather
        than one per prunable group.
      selections: ``(slot name, rows)`` of every input selection: the slot's gates act on
        these rows of its layer's kernel alone.
      reader_rows: ``(slot name, rows)`` of every reader of a normaliser's gated output: the
        rows of its kernel that read the output, which a closed gate leaves only zeros to
        meet (the rows slimming drops).
      unit_heads: ``(group index, head of each unit)`` of every group gated by heads.
      query_heads: the :class:`QueryHeads` of every slot of query heads inside key/value
        groups.
      carried: ``(group index, slot name)`` of the groups of a slot of heads that its gates
        do not act on (queries and keys); they go with their heads.
      spanning: the placed slots whose members (:meth:`slot_members`) are every layer slice
        of their groups: those of heads, of ``whole_unit`` s and of streams.
      branches: ``(slot name, layers)`` of every branch gate: the traced layers it switches
        off, the one its gate multiplies first.
      streams: the :class:`StreamGates` of every stream placement.
      added: the gated parameters added to (or concatenated with) activations rather than
        read as kernels: the layers' biases and a stream's other writes (position
        embeddings, a class token), where gates drawn per example act.
    """

    def __init__(
        self,
        net: nnx.Module,
        *,
        rngs: nnx.Rngs,
        input_shape: tuple[int, ...],
        num_classes: int,
        gate_factory: GateFactory | None = None,
        granularity: Granularity = "unit",
        name: str = "traced model",
        placements: Sequence[GatePlacement] | None = None,
        input_dtype: jnp.dtype = jnp.float32,
        droprate_init: float = DROPRATE_INIT,
    ):
        check_granularity(granularity)
        if placements is not None and granularity != "unit":
            raise ConfigError(
                "gate placements place unit gates; at weight granularity every kernel entry "
                "gets its own gate, so leave placements out"
            )
        self.granularity = granularity
        self.droprate_init = droprate_init
        self.net = net
        self.structure = _trace(net, input_shape, jnp.dtype(input_dtype), num_classes, name)
        self.placed = placements is not None
        if self.placed:
            placed = _placed_slots(self.structure, placements)
            slots = {p.group: p.slot.name for p in placed if p.group is not None}
        else:
            placed = ()
            slots = _slot_names(self.structure) if granularity == "unit" else {}
        self.unit_heads = tuple((p.group, p.heads) for p in placed if p.heads is not None)
        heads = {group: np.asarray(head) for group, head in self.unit_heads}
        self.query_heads = tuple(QueryHeads(p.slot.name, p.tags, p.slices, p.carried)
                                 for p in placed if p.tags)
        tagged = {tag: (p.slot.name, head, len(p.tags))
                  for p in placed for head, tag in enumerate(p.tags)}
        added = _added_sources(self.structure, placed)
        layers = traced_layers(self.structure, slots, granularity, added, heads)
        self.activation_products = traced_products(self.structure, slots, heads, added, tagged)
        _check_counts(self.structure, layers, self.activation_products)
        self.layer_params = tuple(
            (layer.name, traced.kernel, traced.bias)
            for layer, traced in zip(layers, self.structure.layers)
        )
        self.group_slots = tuple(slots.items())
        self.summed = tuple((p.slot.name, p.summed) for p in placed if p.summed)
        self.selections = tuple(
            (p.slot.name, p.slices[0])
            for p in placed if p.group is None and not p.summed and not p.branch and not p.tags
        )
        self.reader_rows = tuple((p.slot.name, rows) for p in placed for rows in p.reader_rows)
        self.branches = tuple((p.slot.name, p.branch) for p in placed if p.branch)
        self.streams = tuple(
            StreamGates(p.slot.name, p.group, self.structure.groups[p.group].producers[0],
                        p.masked, p.lookups)
            for p in placed if p.stream
        )
        self.carried = _carried(self.structure, placed)
        self.added = _added_parameters(self.structure, placed)
        self.spanning = tuple(dict.fromkeys(
            p.slot for p in placements or () if p.heads or p.whole_unit or p.stream))
        if self.placed:
            self.gated = _joined_slices(placed, self.carried)
            spans = set(self.spanning) | {name for name, _ in self.branches}
            unit_slots = [
                SpanSlot(*(getattr(slot, f.name) for f in dataclasses.fields(slot)))
                if slot.name in spans else slot
                for slot in _joined_slots(self.structure, placed, self.gated)
            ]
        else:
            unit_slots = [self._unit_slot(g, name, layers) for g, name in self.group_slots]
            self.gated = self._gated_slices(slots)
        self._declare(
            list(layers),
            unit_slots,
            droprate_init=droprate_init,
            gate_factory=gate_factory,
            rngs=rngs,
            couplings=self._couplings(),
            kernel_shapes={
                layer.name: self.structure.param_shapes[traced.kernel]
                for layer, traced in zip(layers, self.structure.layers)
            },
        )

    def notes(self) -> tuple[str, ...]:
        """One line per traced group that keeps every unit (one per unprunable or caveat
        group, the logits left out), naming its producing layers and the operation, with its
        source line, that keeps it whole; none when the slots are placed or per weight."""
        if self.placed or self.granularity != "unit":
            return ()
        return tuple(
            f"kept whole: {', '.join(_layer_name(path) for path, _ in g.producers)} "
            f"({g.size} units): {g.obstacle.describe()}"
            for g in self.structure.groups
            if not g.removable and g.obstacle != OUTPUT_BLOCKER
        )

    def _unit_slot(self, group: int, name: str, layers: tuple[Layer, ...]) -> GateSlot:
        traced = self.structure.groups[group]
        path, axis = traced.producers[0]
        producer = next(layer for layer in layers if layer.name == _layer_name(path))
        return GateSlot(
            name,
            producer.name,
            (traced.size,),
            axis,
            producer.has_bias,
            self.droprate_init,
            self.structure.param_shapes[path],
            group_params=_unit_params(self.structure, traced),
        )

    def slot_members(self, slot: GateSlot) -> tuple[SlotMember, ...]:
        """A unit slot's first producer's kernel slice and its bias's, along the axes the trace
        found (a head's bias is a row of a ``(heads, head_dim)`` bias); the kernel at weight
        granularity; for a placed slot of heads or of ``whole_unit`` s, every layer's kernel
        and bias slice in its groups, each index with its gate; for a branch gate, every
        kernel and bias of its layers."""
        if slot.name in self.spanning:
            return self._group_members(slot.name)
        branch = dict(self.branches).get(slot.name)
        if branch is not None:
            return tuple(
                SlotMember(f"{layer}.{name}", 0, (0,) * self.structure.param_shapes[path][0])
                for layer, kernel, bias in self.layer_params if layer in branch
                for name, path in (("kernel", kernel), ("bias", bias)) if path
            )
        if slot.axis is None or self.placed:
            return super().slot_members(slot)
        group = self.structure.groups[next(g for g, n in self.group_slots if n == slot.name)]
        kernel = group.producers[0][0]
        bias = next(layer.bias for layer in self.structure.layers if layer.kernel == kernel)
        owned = {(kernel, slot.axis): "kernel"}
        owned |= {(m.path, m.axis): "bias" for m in group.members if m.path == bias}
        members = []
        for member in group.members:
            name = owned.get((member.path, member.axis))
            if name is None:
                continue
            size = self.structure.param_shapes[member.path][member.axis]
            if member.indices == tuple(range(size)):
                units = None if member.units == member.indices else member.units
                members.append(SlotMember(f"{slot.layer}.{name}", member.axis, units))
        return tuple(members)

    def _groups_of(self, name: str) -> list[int]:
        """The traced groups whose units the gates of slot ``name`` switch off."""
        return [group for group, slot in self.group_slots if slot == name]

    def _gates_of(self, group: int, units: Sequence[int]) -> tuple[int, ...]:
        """The gate of each of ``units`` of ``group``: its head's for a group gated by heads,
        else its own."""
        heads = dict(self.unit_heads).get(group)
        return tuple(units) if heads is None else tuple(heads[u] for u in units)

    def _group_members(self, name: str) -> tuple[SlotMember, ...]:
        """Every layer kernel or bias slice that spans a whole axis in the groups of slot
        ``name`` (or among the slices of its query heads), each index with its gate."""
        layer_of = {kernel: (layer, "kernel") for layer, kernel, _ in self.layer_params}
        layer_of |= {bias: (layer, "bias") for layer, _, bias in self.layer_params if bias}
        query = next((q for q in self.query_heads if q.slot == name), None)
        if query is not None:
            return tuple(
                SlotMember(f"{layer_of[s.path][0]}.{layer_of[s.path][1]}", s.axis, s.units)
                for s in query.slices
                if s.path in layer_of
                and s.indices == tuple(range(self.structure.param_shapes[s.path][s.axis]))
            )
        return tuple(
            SlotMember(f"{layer_of[m.path][0]}.{layer_of[m.path][1]}", m.axis,
                       self._gates_of(group, m.units))
            for group in self._groups_of(name)
            for m in self.structure.groups[group].members
            if m.path in layer_of
            and m.indices == tuple(range(self.structure.param_shapes[m.path][m.axis]))
        )

    def group_values(self, values: Mapping[str, np.ndarray]) -> dict[int, np.ndarray]:
        """Per-slot unit values (``values``, by slot name) as per-unit values of the gated
        traced groups (a head's value for each of its units)."""
        return {
            group: np.asarray(values[name])[np.asarray(
                self._gates_of(group, range(self.structure.groups[group].size)))]
            for group, name in self.group_slots if name in values
        }

    def scale_units(self, slot: GateSlot, factors: jax.Array) -> None:
        """Multiply every parameter slice the trace ties to unit j of ``slot`` by
        ``factors[j]``, in place: its producers' kernel slices and biases, its normalisers'
        scales and biases and every reader's rows, so that a 0 removes the unit whatever its
        activation makes of zero (sigmoid(0) is not 0) and the readers' rows no longer train.
        An input selection scales its layer's rows; a slot of heads every group's slices,
        each index by its head's factor (query heads inside key/value groups: their rows,
        columns and biases); a branch gate its layer's output columns and bias
        (the branch's output)."""
        groups = self._groups_of(slot.name)
        if not groups:
            query = next((q.slices for q in self.query_heads if q.slot == slot.name), None)
            slices = query or dict(self.gated)[slot.name]
        else:
            slices = tuple(
                GatedSlice(m.path, m.axis, m.indices, self._gates_of(group, m.units))
                for group in groups
                for m in self.structure.groups[group].members
            )
        for s in slices:
            variable = variable_at(self.net, s.path)
            variable[...] = scaled_slice(variable[...], s, factors)

    def _gated_slices(
        self, slots: dict[int, str]
    ) -> tuple[tuple[str, tuple[GatedSlice, ...]], ...]:
        """Where each slot's gates act: the consumers' rows (unit granularity), the kernel
        (weight granularity; none for a kernel computed from its parameter)."""
        if self.granularity == "weight":
            return tuple(
                (_layer_name(layer.kernel), (GatedSlice(layer.kernel, None),))
                for layer in self.structure.layers if not layer.reparametrised
            )
        return tuple(
            (name, gated_slices(self.structure, self.structure.groups[group]))
            for group, name in slots.items()
        )

    def _couplings(self) -> tuple[ChannelCoupling, ...]:
        """The groups with several producers (residual streams, and the kernels a product or a
        depthwise convolution ties), fixed when not removable."""
        names = _slot_names(self.structure)
        return tuple(
            ChannelCoupling(
                names.get(g.index, f"group{g.index}"),
                tuple(_layer_name(path) for path, _ in g.producers),
                fixed=not g.removable,
                stream=g.stream,
            )
            for g in self.structure.groups
            if len(g.producers) > 1
        )

    def forward(self, x: jax.Array, z: dict[str, jax.Array], *, train: bool) -> jax.Array:
        """``net(x)`` in NNX training (``train``) or evaluation mode, with the gate values
        ``z`` multiplied into the parameters they gate, or, for unit gates drawn per example
        (``(batch, units)``, Dep-L0), into each example's inputs of those parameters or, for
        a normaliser's output, into the example's sum with the normaliser's bias
        (:func:`~sparsejax.structure.example_gates.run_with_example_gates`). A stream's
        open mask multiplies the rows that read it, and its reductions run over its open units
        (the jaxpr evaluated with them rewritten, in the same function)."""
        if train:
            self.net.train()
        else:
            self.net.eval()
        shared, per_example = [], []
        summed = dict(self.summed)
        for name, slices in self.gated:
            if name in z:
                drawn = self.granularity == "unit" and z[name].ndim == 2
                if drawn and name in summed:  # the normaliser's output: scaled where it is summed
                    slices = tuple(s for s in slices if s.path == summed[name])
                (per_example if drawn else shared).extend((s, z[name]) for s in slices)
        streams, lookups = [], []
        for stream in self.streams:
            if stream.slot in z:
                mask = open_mask(z[stream.slot])
                streams.append((stream.producer, mask))
                (per_example if mask.ndim == 2 else shared).extend((s, mask) for s in stream.rows)
                lookups.extend((s, z[stream.slot]) for s in stream.lookups)
        with parameters_gated(self.net, shared):
            if per_example or streams:
                return run_with_example_gates(
                    self.net, x, per_example, set(self.added), sums=set(summed.values()),
                    streams=streams, lookups=lookups,
                )
            return self.net(x)

    def layer_module(self, name: str) -> LayerParameters:
        """The kernel and bias variables of the traced layer ``name``."""
        for layer, kernel, bias in self.layer_params:
            if layer == name:
                bias_variable = None if bias is None else variable_at(self.net, bias)
                return LayerParameters(variable_at(self.net, kernel), bias_variable)
        raise KeyError(f"the traced model has no layer {name!r}")


def _trace(
    net: nnx.Module,
    input_shape: tuple[int, ...],
    input_dtype: jnp.dtype,
    num_classes: int,
    name: str,
) -> TracedStructure:
    """The structure of ``net`` in evaluation mode, after checking that it maps a batch of
    inputs of ``input_shape`` to logits: ``(batch, num_classes)`` for images (floating-point
    inputs), ``(batch, T, num_classes)`` for token sequences (integer inputs of shape ``(T,)``:
    a prediction per token)."""
    if not isinstance(net, nnx.Module):
        raise ConfigError(
            f"{name} returned an object of type {type(net).__name__}, not a Flax NNX module"
        )
    if jax.tree.leaves(nnx.state(net, nnx.RngState)):
        raise ConfigError(
            f"{name} keeps random-number state (an nnx.Rngs stream, e.g. nnx.Dropout(rngs=...)), "
            "which the engine cannot place on devices or checkpoint yet; build the model without "
            "dropout"
        )
    net.eval()
    tokens = jnp.issubdtype(input_dtype, jnp.integer)
    kind = "token sequences" if tokens else "images"
    inputs = jax.ShapeDtypeStruct((1, *input_shape), input_dtype)
    shown = ", ".join(map(str, input_shape))
    graphdef, state = nnx.split(net)
    try:
        logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, inputs)
    except Exception as error:  # the user's model failing on its inputs is the user's to fix
        message = " ".join(str(error).split())
        raise ConfigError(
            f"{name} fails on {kind} of shape (batch, {shown}) and dtype {input_dtype.name}: "
            f"{type(error).__name__}: {message[:300]}"
        ) from error
    expected = (1, *input_shape, num_classes) if tokens else (1, num_classes)
    shape = getattr(logits, "shape", None)
    if shape != expected:
        wanted = ", ".join(map(str, ("batch", *expected[1:])))
        raise ConfigError(
            f"{name} maps {kind} of shape (1, {shown}) to an output of shape {shape}, not "
            f"logits of shape ({wanted})"
        )
    return trace_structure(net, inputs, apply=lambda model, x: model(x))


def load_factory(spec: str) -> Factory:
    """The factory ``FACTORY`` of module ``MODULE`` for ``spec = "MODULE:FACTORY"``, imported
    from the current directory or ``PYTHONPATH``; it must accept ``FACTORY(*, rngs,
    num_classes)``.

    Raises:
      ConfigError: for a module that cannot be imported, a missing or non-callable attribute,
        or a factory with another signature.
    """
    module_name, attribute, factory = import_named("model", spec, "FACTORY")
    if not callable(factory):
        what = "no attribute" if factory is None else "no callable"
        raise ConfigError(f"--model={spec}: module {module_name!r} has {what} {attribute!r}")
    try:
        inspect.signature(factory).bind(rngs=None, num_classes=1)
    except TypeError as error:
        raise ConfigError(
            f"--model={spec}: {attribute}{inspect.signature(factory)} cannot be called as "
            f"{attribute}(*, rngs, num_classes) ({error})"
        ) from error
    except ValueError:  # a builtin without a signature: let the call decide
        pass
    return factory


def build_traced_model(
    spec: str,
    *,
    rngs: nnx.Rngs,
    num_classes: int,
    input_shape: tuple[int, ...],
    gate_factory: GateFactory | None = None,
    granularity: Granularity = "unit",
    use_placements: bool = True,
    input_dtype: jnp.dtype = jnp.float32,
) -> TracedModel:
    """The :class:`TracedModel` of the plain module ``FACTORY(rngs=..., num_classes=...)`` for
    ``spec = "MODULE:FACTORY"`` (:func:`load_factory`). The factory's ``nnx.Rngs`` has a
    ``params`` and a ``dropout`` stream, both derived from ``rngs.params``. The module's own
    ``gate_placements`` (:func:`declared_placements`) give the unit slots when
    ``use_placements`` (at unit granularity); else every prunable group is one."""
    key = rngs.params()
    net_rngs = nnx.Rngs(params=jax.random.fold_in(key, 0), dropout=jax.random.fold_in(key, 1))
    net = load_factory(spec)(rngs=net_rngs, num_classes=num_classes)
    return _gated_net(
        net, f"--model={spec}", rngs=rngs, input_shape=input_shape, num_classes=num_classes,
        gate_factory=gate_factory, granularity=granularity, use_placements=use_placements,
        input_dtype=input_dtype,
    )


def build_zoo_model(
    name: str,
    *,
    rngs: nnx.Rngs,
    gate_factory: GateFactory | None = None,
    granularity: Granularity = "unit",
    use_placements: bool = True,
    input_dtype: jnp.dtype = jnp.float32,
    **options,
) -> TracedModel:
    """The :class:`TracedModel` of the zoo model registered as ``name``
    (:data:`~sparsejax.models.MODELS`; ``options`` go to its constructor), its gates drawn from
    ``rngs`` after its parameters and placed by its own ``gate_placements`` when
    ``use_placements`` (at unit granularity).

    Raises:
      ValueError: for a name the zoo does not have.
    """
    return gate_zoo_network(
        build_model(name, rngs=rngs, **options), name, rngs=rngs, gate_factory=gate_factory,
        granularity=granularity, use_placements=use_placements, input_dtype=input_dtype,
    )


def gate_zoo_network(
    net: nnx.Module,
    name: str,
    *,
    rngs: nnx.Rngs,
    gate_factory: GateFactory | None = None,
    granularity: Granularity = "unit",
    use_placements: bool = True,
    input_dtype: jnp.dtype = jnp.float32,
) -> TracedModel:
    """The :class:`TracedModel` of ``net``, a plain zoo network (a class of the zoo's models,
    at any size: ``WideResNet(depth=10,
    ...)``), gated as :func:`build_zoo_model` gates the registered ones: its gates drawn from
    ``rngs`` and placed by its ``gate_placements`` when ``use_placements`` (at unit
    granularity); ``name`` names it in errors. A network of token ids says so with its
    ``input_dtype`` attribute (``lm_tiny``), which overrides ``input_dtype``."""
    return _gated_net(
        net, name, rngs=rngs, input_shape=net.input_shape, num_classes=net.num_classes,
        gate_factory=gate_factory, granularity=granularity, use_placements=use_placements,
        input_dtype=getattr(net, "input_dtype", input_dtype),
    )


def _gated_net(
    net: nnx.Module,
    name: str,
    *,
    rngs: nnx.Rngs,
    input_shape: tuple[int, ...],
    num_classes: int,
    gate_factory: GateFactory | None,
    granularity: Granularity,
    use_placements: bool,
    input_dtype: jnp.dtype,
) -> TracedModel:
    """The :class:`TracedModel` of ``net``, with its own placements where asked for, or
    always where its ``prunes_placed`` attribute is True (the transformers, whose placed heads
    and FFN units are what GReg and gmp prune too), and, for the gates no placement sets
    (weight gates, one slot per group), the initial drop rate of its ``droprate_init``
    attribute where it has one (WRN's 0.3)."""
    return TracedModel(
        net,
        rngs=rngs,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        gate_factory=gate_factory,
        granularity=granularity,
        name=name,
        input_dtype=input_dtype,
        placements=(
            declared_placements(net, name)
            if granularity == "unit" and (use_placements or getattr(net, "prunes_placed", False))
            else None
        ),
        droprate_init=getattr(net, "droprate_init", DROPRATE_INIT),
    )


def declared_placements(net: nnx.Module, name: str) -> tuple[GatePlacement, ...] | None:
    """The module's own ``gate_placements`` attribute (a sequence of :class:`GatePlacement`:
    where its paper puts the gates), or None to gate every prunable group.

    Raises:
      ConfigError: for an attribute that is not a sequence of :class:`GatePlacement`.
    """
    placements = getattr(net, "gate_placements", None)
    if placements is None:
        return None
    if not isinstance(placements, (tuple, list)) or not all(
        isinstance(p, GatePlacement) for p in placements
    ):
        raise ConfigError(
            f"{name}: gate_placements must be a tuple of "
            f"sparsejax.GatePlacement(slot, layer, side), got {placements!r:.200}"
        )
    return tuple(placements)


def is_model_spec(name: str) -> bool:
    """Whether ``name`` names a custom model (``MODULE:FACTORY``) rather than a zoo model."""
    return ":" in name


def check_model_name(name: str) -> None:
    """Refuse, with a :class:`ConfigError`, a name that is neither a registered model nor a
    loadable ``MODULE:FACTORY``."""
    if is_model_spec(name):
        load_factory(name)
    elif name not in MODELS:
        raise ConfigError(
            f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}, or "
            "MODULE:FACTORY for a factory of a plain NNX model in an importable module"
        )


def build_any_model(name: str, **kwargs) -> TracedModel:
    """A zoo model (:func:`build_zoo_model`) or, for ``MODULE:FACTORY``, the
    :class:`TracedModel` of the factory's module (:func:`build_traced_model`)."""
    check_model_name(name)
    if is_model_spec(name):
        return build_traced_model(name, **kwargs)
    return build_zoo_model(name, **kwargs)


__all__ = [
    "GatePlacement",
    "LayerParameters",
    "TracedModel",
    "build_any_model",
    "build_zoo_model",
    "build_traced_model",
    "check_model_name",
    "declared_placements",
    "is_model_spec",
    "load_factory",
    "traced_layers",
]
