"""Slimming the trained model of a ``--model=MODULE:FACTORY`` run from its trace.

Such a run trains a :class:`~sparsejax.structure.traced_model.TracedModel`: the user's plain NNX
module ``net`` with gates multiplied into the kernel slices their units feed. Its slim network is
the :class:`~sparsejax.structure.slim_trace.SlimFunction` of ``net`` with those test-time gate
values folded in (:func:`slim_traced_model`): every gated slice is multiplied by its gate exactly
as the gated forward pass does (:func:`~sparsejax.structure.sparsify.parameters_gated`; one value
per unit, or per kernel entry at weight granularity). A unit goes when no kernel reads it any
more: every row that reads it, in every kernel its gates act on, is zero after folding (a
closed unit gate, closed weight gates or pruned weights on all of its rows), only ever meets
zeros, or meets a constant that its dense layer's bias absorbs
(:func:`~sparsejax.structure.slim_trace.unread.units_left`), so removing it is exact; the
query and key units of a closed head (a slot of heads, whose gates act on the values' rows
in the output projection) go with it, and a closed branch gate takes every group inside its
branch along (:func:`closed_branch_groups`; what is then left of the branch, empty kernels, a
zero bias and the normaliser that fed it, is not stored:
:mod:`~sparsejax.structure.slim_trace.dead`). The
rows of an input selection (a placed slot on inputs that are no group of their own: pixels, a
concatenation other layers read whole) go the same way, row by row, as do the rows that read a
normaliser's output whose gates closed (a placement with ``norm``: the stem of the CIFAR
ResNets, one member of a residual stream that stays whole) (:func:`selected_rows`). A stream
placed with the normalisers that read it (a transformer's hidden dimension) keeps exactly its
open units: the constants its readers meet are found on the gated forward pass, whose sums
over the stream run over its open units, and the slim network scales those sums to the full
width; an embedding table looked up into the stream has its gathered rows scaled by the gates
in the program the slim network is cut from (a tied table's head reads it ungated).
:func:`~sparsejax.structure.slim_trace.slim_traced` cuts the arrays, on the groups of the
model's own trace; ``round_to=K`` keeps back the removed units with the highest P(gate != 0)
until every slimmed group has a multiple of K units. The largest logit difference
to the gated model in evaluation mode is measured on a batch of the run's test images
(:func:`check_images`) and recorded in the report.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.data.sources import BatchSource
from sparsejax.slim.folding import test_gate_values
from sparsejax.structure.example_gates import run_with_example_gates
from sparsejax.structure.slim_trace import SlimFunction, slim_traced
from sparsejax.structure.slim_trace.unread import live_rows, units_left
from sparsejax.structure.slim_trace.zeros import Rows
from sparsejax.structure.sparsify import parameters_gated, variable_at
from sparsejax.structure.traced_model import QueryHeads, TracedModel, open_mask

CHECK_EXAMPLES = 256
"""Test examples (images or token sequences) the slim network is compared on with the gated
model."""


def check_images(data: BatchSource, examples: int = CHECK_EXAMPLES) -> np.ndarray:
    """The first ``examples`` test images of ``data`` (all of them when it has fewer), as the
    run's evaluation reads them."""
    images, _ = data.test_batch(np.arange(min(examples, data.num_test)))
    return np.asarray(images)


def selected_rows(
    model: TracedModel, met: Rows | None = None
) -> dict[str, tuple[int, np.ndarray]]:
    """Per input selection of ``model`` (:class:`~sparsejax.structure.traced_model.GatePlacement`
    on inputs that are no group of their own) and per reader of a normaliser's gated output (a
    placement with ``norm``), its kernel's axis and True for each row that is still read (as
    in :func:`~sparsejax.structure.slim_trace.unread.read_units`): the rows the slim network
    keeps."""
    return {s.path: (s.axis, live_rows(model.net, s, met or {}))
            for _, s in (*model.selections, *model.reader_rows)}


def closed_branch_groups(model: TracedModel, values: dict[str, np.ndarray]) -> list[int]:
    """The traced groups inside the residual branches whose gate is closed in ``values``:
    those that only the branch's layers before its gated one produce (a closed attention
    sublayer's queries, keys and values)."""
    kernels = {layer: kernel for layer, kernel, _ in model.layer_params}
    found = []
    for name, layers in model.branches:
        if name in values and not np.any(values[name]):
            inner = {kernels[layer] for layer in layers[1:]}
            found += [g.index for g in model.structure.groups
                      if all(path in inner for path, _ in g.producers)]
    return found


def _key_groups(model: TracedModel, query: QueryHeads) -> list[list[int]]:
    """The heads of ``query`` by key/value group (heads whose rows read the same value
    units), each group's heads in the order of their rows."""
    rows = query.rows[0]
    member = next(m for g in model.structure.groups if (m := g.member(rows.path, rows.axis)))
    unit_of = dict(zip(member.indices, member.units))
    units: dict[int, set[int]] = {}
    for index, head in zip(rows.indices, rows.units):
        units.setdefault(head, set()).add(unit_of[index])
    groups: dict[frozenset[int], list[int]] = {}
    for head in units:  # rows.indices ascend: heads in the order their rows first come
        groups.setdefault(frozenset(units[head]), []).append(head)
    return list(groups.values())


def _carried_units(
    model: TracedModel, query: QueryHeads, heads: list[int]
) -> dict[int, np.ndarray]:
    """Per traced group, True for the units that the carried slices of ``heads`` hold (the
    query and key units of their query columns)."""
    found: dict[int, np.ndarray] = {}
    for s in query.carried:
        for group in model.structure.groups_of(s.path, s.axis):
            traced = model.structure.groups[group]
            member = traced.member(s.path, s.axis)
            unit_of = dict(zip(member.indices, member.units))
            units = found.setdefault(group, np.zeros(traced.size, bool))
            units[[unit_of[i] for i, h in zip(s.indices, s.units) if h in heads]] = True
    return found


def packed_query_heads(
    model: TracedModel, replaced: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], set[int], dict[int, np.ndarray]]:
    """The query heads inside key/value groups that slimming removes, and the arrays that keep
    the others (``model.net``'s values, or those of ``replaced``, gates folded). A head lives
    while some row of it that its gates act on (the output projection's) is not zero. Within
    each key/value group the live heads move to the first positions, their rows, columns and
    biases with them (the same function: the heads of a group differ only in their own
    slices), and every group keeps M' = the most live heads of any group, since the query
    projection is reshaped into groups of one size: a group with fewer keeps closed heads
    whose rows are zero. A group without a live
    head goes whole: its heads and the query and key units its queries carry (no score of it
    is read). Returns the moved arrays by path, the tags of the heads removed and, per traced
    group, the units no live head reads (where no head of a slot lives, M' = 0, these alone:
    its attention goes with its query and key units)."""
    moved: dict[str, np.ndarray] = {}
    closed: set[int] = set()
    unread: dict[int, np.ndarray] = {}

    def value(path: str) -> np.ndarray:
        return np.asarray(moved.get(path, replaced.get(path, variable_at(model.net, path)[...])))

    for query in model.query_heads:
        live = np.zeros(len(query.tags), bool)
        for s in query.rows:
            taken = np.moveaxis(np.take(value(s.path), s.indices, axis=s.axis), s.axis, 0)
            np.logical_or.at(live, np.asarray(s.units),
                             np.any(taken.reshape(len(s.indices), -1) != 0, axis=1))
        groups = _key_groups(model, query)
        kept = max(int(live[heads].sum()) for heads in groups)
        dead = [head for heads in groups if not live[heads].any() for head in heads]
        for group, units in _carried_units(model, query, dead).items():
            unread[group] = unread.get(group, np.zeros_like(units)) | units
        if not kept:
            continue
        closed |= {query.tags[head] for heads in groups
                   for head in (heads if not live[heads].any() else heads[kept:])}
        for s in query.slices:
            source = np.arange(value(s.path).shape[s.axis])
            at = {h: np.asarray(s.indices)[np.asarray(s.units) == h] for h in set(s.units)}
            for heads in groups:
                order = [h for h in heads if live[h]] + [h for h in heads if not live[h]]
                for position, head in zip(heads, order):
                    source[at[position]] = at[head]
            moved[s.path] = np.take(value(s.path), source, axis=s.axis)
    return moved, closed, unread


@nnx.jit
def _evaluation_logits(model: TracedModel, x: jax.Array) -> jax.Array:
    return model(x, train=False)


def slim_traced_model(
    model: TracedModel, check: np.ndarray, *, round_to: int = 1
) -> SlimFunction:
    """The slim network of ``model`` under its test-time gates (see the module docstring), its
    report holding ``max_logit_difference`` on the images ``check``."""
    values = test_gate_values(model)
    gated = [
        (s, jnp.asarray(values[name])) for name, slices in model.gated if name in values
        for s in slices
    ]
    streams = [stream for stream in model.streams if stream.slot in values]
    open_of = {stream.slot: open_mask(jnp.asarray(values[stream.slot])) for stream in streams}
    gated += [(s, open_of[stream.slot]) for stream in streams for s in stream.rows]
    scores = model.group_values({
        name: np.asarray(model.gates[name].prob_nonzero())
        for _, name in model.group_slots if name in values
    })
    example = jax.ShapeDtypeStruct((1, *check.shape[1:]), check.dtype)
    open_units = model.group_values(values)
    masks = [(stream.producer, open_of[stream.slot]) for stream in streams]
    lookups = [(s, jnp.asarray(values[stream.slot])) for stream in streams
               for s in stream.lookups]

    def forward(net: nnx.Module, x: jax.Array) -> jax.Array:
        """The gated model's forward pass on its folded parameters: its streams' sums over
        their open units, its looked-up tables' rows gated."""
        if not streams:
            return net(x)
        return run_with_example_gates(net, x, [], streams=masks, lookups=lookups)

    def slim_forward(net: nnx.Module, x: jax.Array) -> jax.Array:
        """The program the slim network cuts: the forward pass with its looked-up tables'
        rows gated (its sums run over the units it keeps)."""
        return run_with_example_gates(net, x, [], lookups=lookups) if lookups else net(x)

    with parameters_gated(model.net, gated):
        keep, replaced, met = units_left(model.net, model.structure, example, forward)
        for group, slot in model.carried:
            if slot in values:  # without gates (GReg, gmp) the zeroed slices tell
                keep[group] = keep[group] & (open_units[group] > 0)
        for group in closed_branch_groups(model, values):
            keep[group] = np.zeros_like(keep[group])
        for stream in streams:
            keep[stream.group] = open_units[stream.group] > 0
        packed, closed_tags, unread = packed_query_heads(model, replaced)
        for group, units in unread.items():
            keep[group] = keep[group] & ~units
        slim = slim_traced(
            model.net, example, structure=model.structure, keep=keep, scores=scores,
            round_to=round_to, rows=selected_rows(model, met), replaced={**replaced, **packed},
            streams=[stream.group for stream in streams], apply=slim_forward,
            closed_tags=closed_tags,
        )
    slim.check(_evaluation_logits(model, check), check)
    return slim
