"""One propagation rule per primitive family: how the fields of an equation's inputs become the
fields of its outputs, which units it merges, and which it blocks.

A rule takes the context, the equation and the :class:`Value` of each input, and returns the
:class:`Value` of each output. Primitives without a rule are handled by the walker
(:mod:`.walk`): they block the units they touch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from sparsejax.structure.trace.units import NO_UNIT, Field, make_field, relabel
from sparsejax.structure.trace.values import (
    Context,
    LayerRecord,
    Value,
    factors,
    field_on,
)

Rule = Callable[[Context, object, Sequence[Value]], list[Value]]


def _shape(var) -> tuple[int, ...]:
    return tuple(var.aval.shape)


def _out_shape(eqn) -> tuple[int, ...]:
    return _shape(eqn.outvars[0])


def elementwise(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """Operands of the output's shape tie their units position by position (a residual sum, a
    normaliser's scale); scalar operands carry none."""
    ndim = len(_out_shape(eqn))
    fields = [f for var, v in zip(eqn.invars, ins) if len(_shape(var)) == ndim for f in v.fields]
    return [Value(ctx.merge_fields(fields))] * len(eqn.outvars)


def cast(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """A unary op that keeps the values' identity (a dtype cast, a copy)."""
    return [Value(ins[0].fields, param=ins[0].param)]


def _block_unit_free_summands(ctx: Context, eqn, ins: Sequence[Value]) -> None:
    """In a sum (or max / min) of arrays of the output's shape, a field of one operand on
    dimensions where another operand varies but carries no unit is blocked: removing the units
    would not remove that operand's values there (a token-mixing output added to a stream whose
    token positions come from the image). An operand broadcast along those dimensions (a
    normaliser's mean) leaves them free."""
    shape = _out_shape(eqn)
    full = [v for var, v in zip(eqn.invars, ins) if _shape(var) == shape]
    for value in full:
        for field in value.fields:
            for other in full:
                covered = any(set(field.dims) <= set(f.dims) for f in other.fields)
                if other is not value and not covered and not set(field.dims) <= other.constant:
                    ctx.block([field], "summed with values of no unit")


def summed(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """An elementwise difference, maximum or minimum (:func:`_block_unit_free_summands`)."""
    _block_unit_free_summands(ctx, eqn, ins)
    return elementwise(ctx, eqn, ins)


def _mark_joined_units(ctx: Context, eqn, ins: Sequence[Value]) -> None:
    """Record units that a sum of two activations joins while they are still apart (a residual
    addition: a block's output onto its stream), not a parameter added (a bias) nor a value
    combined with what it was computed from (a normaliser's centring)."""
    shape = _out_shape(eqn)
    summands = [v for var, v in zip(eqn.invars, ins) if _shape(var) == shape and v.param is None]
    find = ctx.units.find
    for i, value in enumerate(summands):
        for field in value.fields:
            for other in summands[i + 1:]:
                match = field_on(other, field.dims)
                if match is None:
                    continue
                pairs = zip(np.ravel(field.ids).tolist(), np.ravel(match.ids).tolist())
                if any(a != NO_UNIT and b != NO_UNIT and find(a) != find(b) for a, b in pairs):
                    ctx.units.mark_joined(np.concatenate([np.ravel(field.ids),
                                                          np.ravel(match.ids)]))


def add(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """An elementwise sum; a parameter added to a layer's output is that layer's bias; units
    of two activations joined by it make a residual stream (:func:`_mark_joined_units`)."""
    _block_unit_free_summands(ctx, eqn, ins)
    _mark_joined_units(ctx, eqn, ins)
    (out,) = elementwise(ctx, eqn, ins)
    a, b = ins
    layer, bias = (a.layer, b.param) if a.layer is not None else (b.layer, a.param)
    if layer is not None and bias is not None and ctx.layers[layer].bias is None:
        ctx.layers[layer] = dataclasses.replace(ctx.layers[layer], bias=bias)
    return [out]


def broadcast_in_dim(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """Fields move to the dimensions the operand's map to (a bias vector onto the channels)."""
    mapping = dict(enumerate(eqn.params["broadcast_dimensions"]))
    fields = tuple(f for f in (relabel(f, mapping) for f in ins[0].fields) if f is not None)
    operand = _shape(eqn.invars[0])
    varying = {mapping[d] for d, size in enumerate(operand) if size > 1}
    constant = frozenset(d for d in range(len(_out_shape(eqn))) if d not in varying)
    return [Value(fields, param=ins[0].param, constant=constant)]


def transpose(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """Fields follow the permutation."""
    mapping = {source: target for target, source in enumerate(eqn.params["permutation"])}
    fields = tuple(f for f in (relabel(f, mapping) for f in ins[0].fields) if f is not None)
    return [Value(fields, param=ins[0].param)]


def squeeze(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """Fields move down past the removed size-1 dimensions (which carry none)."""
    ndim = len(_shape(eqn.invars[0]))
    removed = {d % ndim for d in eqn.params["dimensions"]}
    kept = [d for d in range(ndim) if d not in removed]
    mapping = {source: target for target, source in enumerate(kept)}
    fields = tuple(f for f in (relabel(f, mapping) for f in ins[0].fields) if f is not None)
    return [Value(fields, param=ins[0].param)]


def _reshape_blocks(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> list[tuple[list[int], list[int]]]:
    """Runs of input and output dimensions (sizes > 1) whose sizes have equal products: a
    reshape maps each run onto its partner in row-major order."""
    a = [d for d, s in enumerate(in_shape) if s > 1]
    b = [d for d, s in enumerate(out_shape) if s > 1]
    blocks, i, j = [], 0, 0
    while i < len(a):
        ins, outs = [a[i]], [b[j]]
        pa, pb = in_shape[a[i]], out_shape[b[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ins.append(a[i])
                pa, i = pa * in_shape[a[i]], i + 1
            else:
                outs.append(b[j])
                pb, j = pb * out_shape[b[j]], j + 1
        blocks.append((ins, outs))
    return blocks


def reshape(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """Splitting a labelled dimension (features into heads x head_dim) gives a field over the new
    dimensions; merging (flattening H, W, C) repeats each unit over the merged positions, so a
    channel becomes a block of features. Two fields merged into one dimension are blocked."""
    in_shape, out_shape = _shape(eqn.invars[0]), _out_shape(eqn)
    blocks = _reshape_blocks(in_shape, out_shape)
    block_of = {d: k for k, (dims, _) in enumerate(blocks) for d in dims}
    components: list[tuple[set[int], list[Field]]] = []
    for field in ins[0].fields:
        touched = {block_of[d] for d in field.dims}
        joined = [c for c in components if c[0] & touched]
        for c in joined:
            components.remove(c)
            touched |= c[0]
        components.append((touched, [f for c in joined for f in c[1]] + [field]))
    fields = []
    for touched, members in components:
        if len(members) > 1:
            ctx.block(members, "reshape merges dimensions labelled by different fields")
            continue
        made = _reshaped(members[0], touched, blocks, in_shape, out_shape)
        if made is not None:
            fields.append(made)
    return [Value(tuple(fields), param=ins[0].param)]


def _reshaped(
    field: Field,
    touched: set[int],
    blocks: list[tuple[list[int], list[int]]],
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
) -> Field | None:
    """``field``, alone on the reshape blocks ``touched``, moved to the output's dimensions:
    its ids repeated over the unlabelled dimensions merged with its own."""
    in_dims = sorted(d for k in touched for d in blocks[k][0])
    out_dims = sorted(d for k in touched for d in blocks[k][1])
    spread = [in_shape[d] if d in field.dims else 1 for d in in_dims]
    ids = np.broadcast_to(field.ids.reshape(spread), [in_shape[d] for d in in_dims])
    return make_field(tuple(out_dims), ids.reshape([out_shape[d] for d in out_dims]))


def reshaped_alone(field: Field, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
    """A reshape's output field of ``field`` taken on its own (no other field shares its
    blocks)."""
    blocks = _reshape_blocks(in_shape, out_shape)
    touched = {k for k, (dims, _) in enumerate(blocks) if set(dims) & set(field.dims)}
    return _reshaped(field, touched, blocks, in_shape, out_shape)


def slice_(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """A (strided) slice keeps the units of the positions it reads."""
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(start)
    fields = []
    for field in ins[0].fields:
        index = tuple(slice(start[d], limit[d], strides[d]) for d in field.dims)
        made = make_field(field.dims, field.ids[index])
        if made is not None:
            fields.append(made)
    return [Value(tuple(fields))]


def pad(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """Padding unlabelled (spatial) dimensions; padding a labelled one places its units at a
    fixed offset in a wider dimension (a zero-padded shortcut), which ties both widths: the
    input's units are blocked, and so is whatever the padded dimension meets."""
    config = eqn.params["padding_config"]
    fields = []
    for field in ins[0].fields:
        if any(tuple(config[d]) != (0, 0, 0) for d in field.dims):
            reason = "padding along a unit dimension"
            ctx.block([field], reason)
            out_shape = _out_shape(eqn)
            fields += [ctx.opaque(d, out_shape[d], reason) for d in field.dims]
        else:
            fields.append(field)
    return [Value(tuple(fields))]


def concatenate(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """Joining along a dimension puts each operand's units at its offset (DenseNet); fields on
    other dimensions merge as in an elementwise op. A field on the joined dimension and
    others (heads x head features, as rotary position embeddings rejoin the two halves of
    each head's features) joins the same way when every operand's field there lies on the
    same dimensions; fields on other sets of dimensions that include it block."""
    axis = eqn.params["dimension"]
    joined = {field.dims for value in ins for field in value.fields if axis in field.dims}
    dims = (axis,) if (axis,) in joined else joined.pop() if len(joined) == 1 else None
    parts, others, any_part = [], [], False
    for var, value in zip(eqn.invars, ins):
        shape = _shape(var)
        part = np.full([shape[d] for d in dims or (axis,)], NO_UNIT, np.int64)
        for field in value.fields:
            if field.dims == dims:
                part, any_part = field.ids, True
            elif axis in field.dims:
                ctx.block([field], "concatenation along a dimension inside a multi-dim field")
            else:
                others.append(field)
        parts.append(part)
    fields = list(ctx.merge_fields(others))
    if any_part:
        fields.append(Field(dims, np.concatenate(parts, axis=dims.index(axis))))
    return [Value(tuple(fields))]


def split(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """The inverse of :func:`concatenate`: each output keeps its slice of the units."""
    axis = eqn.params["axis"]
    offsets = np.cumsum([0, *eqn.params["sizes"]])
    outs = []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        fields = []
        for field in ins[0].fields:
            if axis not in field.dims:
                fields.append(field)
                continue
            position = field.dims.index(axis)
            ids = np.take(field.ids, np.arange(start, stop), axis=position)
            made = make_field(field.dims, ids)
            if made is not None:
                fields.append(made)
        outs.append(Value(tuple(fields)))
    return outs


def reduce(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """A reduction drops the dimensions it reduces; a field on them is consumed, with a caveat:
    a statistic over units (LayerNorm's mean and variance, a max over features) keeps its
    value after their removal only if the slimmed network keeps the original count or the
    removed units' values."""
    ndim = len(_shape(eqn.invars[0]))
    axes = set(eqn.params["axes"])
    ctx.warn([f for f in ins[0].fields if set(f.dims) & axes], "reduction over units")
    kept = [d for d in range(ndim) if d not in axes]
    mapping = {source: target for target, source in enumerate(kept)}
    fields = tuple(f for f in (relabel(f, mapping) for f in ins[0].fields) if f is not None)
    return [Value(fields)] * len(eqn.outvars)


def reduce_window(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """Pooling: labelled dimensions pass when the window neither spans nor strides nor pads
    them; otherwise their units are blocked."""
    params = eqn.params
    fields = []
    for field in ins[0].fields:
        untouched = all(
            params["window_dimensions"][d] == 1
            and params["window_strides"][d] == 1
            and tuple(params["padding"][d]) == (0, 0)
            and params["base_dilation"][d] == 1
            and params["window_dilation"][d] == 1
            for d in field.dims
        )
        if untouched:
            fields.append(field)
        else:
            ctx.block([field], "pooling window spans a unit dimension")
    return [Value(tuple(fields))] * len(eqn.outvars)


REPARAMETRISED = (
    "kernel computed from its parameter (a reparametrised weight: weight standardisation or "
    "normalisation); a gate scales the parameter, which the computation would undo"
)


def reparametrised_kernel(
    ctx: Context, value: Value, shape: tuple[int, ...]
) -> tuple[str, int] | None:
    """The parameter that an operand of a product is computed from when it is a kernel computed
    from parameters alone (``w = (v - mean v) / std v``, ``w = g v / |v|``), and the number of
    leading axes the parameter has beyond the kernel's: the one of ``value``'s sources of the
    operand's ``shape``, else the one whose trailing axes are that shape (after the layer axes
    of a stack that a scan slices); None for an operand that depends on the model's input, or
    that no single parameter of its shape makes."""
    if value.param is not None or not value.sources:
        return None
    matches = []
    for path in value.sources:
        param_shape = ctx.param_shape(path) or ()
        stacked = len(param_shape) - len(shape)
        if stacked >= 0 and param_shape[stacked:] == shape:
            matches.append((path, stacked))
    candidates = [match for match in matches if match[1] == 0] or matches
    return candidates[0] if len(candidates) == 1 else None


def _reparametrised_layer(
    ctx: Context, fields: Sequence[Field], kernel: tuple[str, int], outputs: Sequence[int]
) -> None:
    """A product reads a kernel computed from parameter ``kernel = (path, stacked)``: the
    kernel's units (its ``fields``) are kept whole, and the parameter's axes ``outputs`` (of the
    kernel, after the ``stacked`` layer axes) produce the layer's units (named after the
    parameter, not after a gain the kernel was scaled by)."""
    path, stacked = kernel
    ctx.block(fields, REPARAMETRISED)
    ctx.mark_param_producers(path, [stacked + axis for axis in outputs])


def conv_general_dilated(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """A convolution ties the input's channels to the kernel's input axis and gives the output
    channels the kernel's output axis; a depthwise convolution (one input channel per group)
    ties input and output channels; other grouped convolutions keep their channels."""
    lhs, rhs = ins
    numbers = eqn.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = numbers.lhs_spec, numbers.rhs_spec, numbers.out_spec
    groups = eqn.params["feature_group_count"]
    rhs_shape, out_shape = _shape(eqn.invars[1]), _out_shape(eqn)
    channels = field_on(lhs, (lhs_spec[1],))
    kernel_in = field_on(rhs, (rhs_spec[1],))
    kernel_out = field_on(rhs, (rhs_spec[0],))
    known = {id(f) for f in (channels, kernel_in, kernel_out) if f is not None}
    lhs_other = [f for f in lhs.fields if id(f) not in known]
    window_dims = set(rhs_spec[2:])
    rhs_other = [f for f in rhs.fields if id(f) not in known and not set(f.dims) <= window_dims]
    ctx.block(lhs_other + rhs_other, "convolution over a labelled batch or spatial dimension")
    labelled = [f for f in (channels, kernel_in, kernel_out) if f is not None]
    depthwise = groups > 1 and rhs_shape[rhs_spec[1]] == 1 and rhs_shape[rhs_spec[0]] == groups
    if eqn.params["batch_group_count"] != 1 or (groups > 1 and not depthwise):
        ctx.block(labelled, "grouped convolution with several channels per group")
        kernel_in = channels = None
    elif depthwise and channels is not None and kernel_out is not None:
        ctx.units.merge(channels.ids, kernel_out.ids)
    elif groups == 1 and channels is not None and kernel_in is not None:
        ctx.units.merge(channels.ids, kernel_in.ids)
    produced = kernel_out if kernel_out is not None else (channels if depthwise else None)
    out_fields = () if produced is None else (Field((out_spec[1],), produced.ids),)
    in_factor = kernel_in if kernel_in is not None else (channels if groups == 1 else None)
    window = int(np.prod([rhs_shape[d] for d in rhs_spec[2:]], dtype=np.int64))
    positions = int(np.prod([out_shape[d] for d in out_spec[2:]], dtype=np.int64))
    macs = (
        positions * out_shape[out_spec[0]] * window,
        rhs_shape[rhs_spec[1]] if in_factor is None else in_factor.ids,
        rhs_shape[rhs_spec[0]] if kernel_out is None else kernel_out.ids,
    )
    computed_from = reparametrised_kernel(ctx, rhs, rhs_shape)
    if rhs.param is None and computed_from is None:
        ctx.other_macs.append(macs)
        return [Value(out_fields)]
    if computed_from is not None:
        _reparametrised_layer(ctx, rhs.fields, computed_from, (rhs_spec[0],))
    elif kernel_out is not None:
        ctx.units.mark_producers(kernel_out.ids)
    record = LayerRecord(rhs.param or computed_from[0], "conv", macs,
                         reparametrised=computed_from is not None)
    return [Value(out_fields, layer=ctx.add_layer(record))]


def _pair(
    ctx: Context, field: Field, axes: list[int], target: list[int], rhs: Value, rhs_free: set[int]
) -> None:
    """Merge the ``axes`` of a left operand's field with the right operand's field on their
    partner dimensions ``target``; along the field's other (free) axes every slice merges with
    it, so features reshaped into heads and contracted with one shared kernel tie feature j of
    every head to the kernel's row j. The same holds the other way round: a right field on
    the partner dimensions and on free ones (``rhs_free``: the query heads that share a key in
    grouped-query attention, when the keys come first) merges slice by slice with a left field
    whose dimensions are all paired. Partner dimensions without units tie nothing (a batch of
    heads against per-head values, a sum against an activation); partner fields on other
    dimensions block."""
    match = field_on(rhs, tuple(sorted(target)))
    if match is None:
        wider = next((f for f in rhs.fields if set(target) < set(f.dims)
                      and set(f.dims) - set(target) <= rhs_free), None)
        if wider is not None and len(axes) == field.ids.ndim:
            partners = [wider.dims.index(target[axes.index(k)]) for k in range(field.ids.ndim)]
            free = [j for j in range(wider.ids.ndim) if j not in partners]
            for ids in np.transpose(wider.ids, free + partners).reshape(-1, *field.ids.shape):
                ctx.units.merge(field.ids, ids)
            return
        overlap = [f for f in rhs.fields if set(f.dims) & set(target)]
        if overlap:
            ctx.block([field, *overlap], "matrix product pairs differently labelled dimensions")
        return
    free = [k for k in range(field.ids.ndim) if k not in axes]
    order = [axes[i] for i in np.argsort(target)]
    slices = np.transpose(field.ids, free + order).reshape(-1, *match.ids.shape)
    for ids in slices:
        ctx.units.merge(ids, match.ids)


def gather_slices(eqn) -> dict[int, int]:
    """The operand dimensions that every slice of a ``gather`` takes whole and that no index
    picks positions of (an embedding table's features, in ``jnp.take(table, ids, axis=0)``),
    each with the output dimension it becomes."""
    numbers = eqn.params["dimension_numbers"]
    shape, sizes = _shape(eqn.invars[0]), eqn.params["slice_sizes"]
    dropped = {*numbers.collapsed_slice_dims, *getattr(numbers, "operand_batching_dims", ())}
    sliced = [d for d in range(len(shape)) if d not in dropped]
    return {
        d: out for d, out in zip(sliced, numbers.offset_dims)
        if sizes[d] == shape[d] and d not in numbers.start_index_map
    }


def gather(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """Slices of an array at integer indices (an embedding lookup): a field on dimensions that
    every slice takes whole moves to the output dimensions they become; a field on a dimension
    the indices pick positions of, or that slices take in part, is blocked (which of its units
    are read depends on the indices), and so are any fields of the indices. A gather from a
    parameter that picks rows and takes the features after them whole (an embedding table)
    is a lookup layer that produces the units it moves."""
    whole = gather_slices(eqn)
    moved, blocked = [], list(ins[1].fields)
    for field in ins[0].fields:
        placed = relabel(field, whole)
        if placed is None:
            blocked.append(field)
        else:
            moved.append(placed)
    ctx.block(blocked, "positions picked by a gather's indices")
    picked = eqn.params["dimension_numbers"].start_index_map
    if ins[0].param is not None and moved and min(whole) > max(picked, default=-1):
        ctx.add_lookup(ins[0].param, np.concatenate([np.ravel(f.ids) for f in moved]))
    return [Value(tuple(moved))]


def dot_general(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """A matrix product ties each contracted (and batch) dimension of one operand to its
    partner in the other; fields on free dimensions pass to the output, fields that include a
    contracted dimension are consumed. The output axis of a parameter operand produces units;
    a product of two activations records the heads its batch dimensions split fields into
    (:meth:`~.values.Context.split_heads`)."""
    lhs, rhs = ins
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lc, rc, lb, rb = map(tuple, (lc, rc, lb, rb))
    lhs_shape, rhs_shape = _shape(eqn.invars[0]), _shape(eqn.invars[1])
    lfree = [d for d in range(len(lhs_shape)) if d not in lc + lb]
    rfree = [d for d in range(len(rhs_shape)) if d not in rc + rb]
    partner = dict(zip(lc + lb, rc + rb))
    for field in lhs.fields:
        paired = [k for k, d in enumerate(field.dims) if d in partner]
        if paired:
            _pair(ctx, field, paired, [partner[field.dims[k]] for k in paired], rhs, set(rfree))
    lhs_out = {d: k for k, d in enumerate(lb)} | {d: len(lb) + k for k, d in enumerate(lfree)}
    rhs_out = {d: k for k, d in enumerate(rb)} | {
        d: len(lb) + len(lfree) + k for k, d in enumerate(rfree)
    }
    outs = [relabel(f, lhs_out) for f in lhs.fields] + [relabel(f, rhs_out) for f in rhs.fields]
    fields = ctx.merge_fields([f for f in outs if f is not None])
    lhs_dims, rhs_dims = list(lfree), list(rfree)
    for left, right in ((lb, rb), (lc, rc)):
        on_left = any(set(f.dims) & set(left) for f in lhs.fields)
        if on_left or not any(set(f.dims) & set(right) for f in rhs.fields):
            lhs_dims += left
        else:
            rhs_dims += right
    macs = tuple(factors(lhs, lhs_dims, lhs_shape) + factors(rhs, rhs_dims, rhs_shape))
    kernel = rhs if rhs.param is not None else lhs
    computed_from = None
    if kernel.param is None:
        for operand, shape in ((rhs, rhs_shape), (lhs, lhs_shape)):
            computed_from = reparametrised_kernel(ctx, operand, shape)
            if computed_from is not None:
                kernel = operand
                break
    if kernel.param is None and computed_from is None:
        ctx.other_macs.append(macs)
        ctx.split_heads(lhs.fields, lb)
        ctx.split_heads(rhs.fields, rb)
        return [Value(fields)]
    free = rfree if kernel is rhs else lfree
    if computed_from is not None:
        _reparametrised_layer(ctx, kernel.fields, computed_from, free)
    else:
        for field in kernel.fields:
            if set(field.dims) <= set(free):
                ctx.units.mark_producers(field.ids)
    record = LayerRecord(kernel.param or computed_from[0], "dense", macs,
                         reparametrised=computed_from is not None)
    return [Value(fields, layer=ctx.add_layer(record))]


UNARY = (
    "abs", "acos", "acosh", "asin", "asinh", "atan", "atanh", "cbrt", "ceil", "cos", "cosh",
    "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "imag", "integer_pow",
    "is_finite", "log", "log1p", "logistic", "neg", "not", "real", "round", "rsqrt", "sign",
    "sin", "sinh", "sqrt", "square", "tan", "tanh", "reduce_precision",
)
BINARY = (
    "add_any", "and", "atan2", "div", "eq", "ge", "gt", "le", "lt", "max", "min", "mul", "ne",
    "nextafter", "or", "pow", "rem", "select_n", "sub", "xor", "clamp",
)
ELEMENTWISE = frozenset({
    *UNARY, *BINARY, "add", "convert_element_type", "copy", "copy_p", "stop_gradient",
})
"""Primitives whose operands have the result's shape (or are scalars)."""
REDUCTIONS = (
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "argmax", "argmin",
)
POOLING = ("reduce_window_sum", "reduce_window_max", "reduce_window_min")

RULES: dict[str, Rule] = {
    **{name: elementwise for name in UNARY + BINARY},
    **{name: reduce for name in REDUCTIONS},
    **{name: reduce_window for name in POOLING},
    "add": add,
    **{name: summed for name in ("sub", "max", "min")},
    "convert_element_type": cast,
    "copy": cast,
    "copy_p": cast,
    "stop_gradient": cast,
    "broadcast_in_dim": broadcast_in_dim,
    "transpose": transpose,
    "squeeze": squeeze,
    "reshape": reshape,
    "slice": slice_,
    "pad": pad,
    "concatenate": concatenate,
    "split": split,
    "conv_general_dilated": conv_general_dilated,
    "dot_general": dot_general,
    "gather": gather,
}
"""The primitives the analysis understands; call-like primitives are walked into instead."""
