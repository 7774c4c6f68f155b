"""Running a traced jaxpr with fewer units: every variable holds only its kept positions.

The walk of :mod:`sparsejax.structure.trace` labelled every dimension of every variable of the
forward pass with units (its :class:`~sparsejax.structure.trace.values.Frame`). Given which units
are kept, a dimension keeps the positions whose unit is kept (positions of no unit always stay),
so each variable has a narrower shape. :class:`Narrowed` evaluates the jaxpr on such narrower
arrays, equation by equation, rebinding each primitive with the parameters that name sizes
rewritten (``broadcast_in_dim`` and ``reshape`` shapes, ``split`` sizes, ``iota`` shapes, the
group count of a depthwise convolution) and slicing an operand that has all positions where the
equation's other operands or its output keep fewer (a constant added to a narrowed activation).
Sub-jaxprs of calls are run inline and scan bodies under ``lax.scan``, each with the frame its
walk made. Reductions run over a narrowed dimension only for a stream placed with its
normalisers (:class:`~sparsejax.models.placement.GatePlacement` with ``stream``): the other
groups whose units a reduction reads are kept whole (see
:func:`~sparsejax.structure.slim_trace.widths.physical_keep`), so a mean keeps its divisor;
a stream's sums are scaled by ``d / n``, ``n`` of its ``d`` units kept, as the gated model
takes them over its open units. A product's batch dimension that no unit labels but whose operands
hold part of it (heads split from a flat projection, the head removed) gets the missing
positions back as zeros (see :func:`_dot_general`).

Dropped rows. Besides its units, a variable may keep fewer positions where a kernel's rows are
left out (:mod:`.rows`): ``positions`` gives them, and every variable holds the positions both
keep.

Batch size. The program is traced at a batch size ``traced_batch`` that no other dimension is a
multiple of; any size in a shape parameter that is a multiple of it is rewritten as the same
multiple of the actual batch, so the function accepts any batch (also a symbolic one for
``jax.export``). Operations without a rule are rebound with their parameters as traced, so one
whose parameters name the batch size runs only at ``traced_batch``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

from sparsejax.structure.trace.rules import ELEMENTWISE, gather_slices
from sparsejax.structure.trace.units import NO_UNIT
from sparsejax.structure.trace.values import UNLABELLED, Frame, Value
from sparsejax.structure.trace.walk import SUB_JAXPR_PARAMS, scan_sizes, sub_jaxpr

Kept = tuple[np.ndarray | None, ...]
"""Per dimension of a variable: the original positions it keeps, or None for all of them."""



class SlimmingError(RuntimeError):
    """The traced program cannot be run with the chosen units removed (an internal limit)."""


def kept_positions(
    value: Value,
    shape: tuple[int, ...],
    unit_values: np.ndarray,
    unit_roots: np.ndarray,
    tag_values: np.ndarray | None = None,
) -> Kept:
    """The kept positions of each dimension of a variable with ``value``'s fields, when unit
    ``u`` is kept iff ``unit_values[u] > 0`` (``unit_values[-1]`` is 1: no unit), and of its
    query-head tags, tag ``t`` kept iff ``tag_values[t] > 0``. A dimension along which a field
    holds the same units (merged: ``unit_roots``) and the same values at every position keeps
    all of them: the query heads of a key/value group, which share its key's units (unless
    their own tags close some of them)."""
    kept: list[np.ndarray | None] = [None] * len(shape)
    labels = [(f, unit_values, unit_roots) for f in value.fields]
    if tag_values is not None:
        labels += [(t, tag_values, None) for t in value.tags]
    for field, values, roots in labels:
        ids = np.where(field.ids == NO_UNIT, -1, field.ids)
        mask = values[ids] > 0
        for k, dim in enumerate(field.dims):
            if (roots is not None and ids.shape[k] > 1 and _constant_along(roots[ids], k)
                    and _constant_along(mask, k)):
                continue
            others = tuple(j for j in range(mask.ndim) if j != k)
            projection = mask.any(axis=others) if others else mask
            if not projection.all():
                chosen = np.flatnonzero(projection)
                kept[dim] = chosen if kept[dim] is None else np.intersect1d(kept[dim], chosen)
    return tuple(kept)


def _constant_along(values: np.ndarray, axis: int) -> bool:
    """Whether ``values`` is the same at every position of ``axis``."""
    return bool(np.all(values == np.take(values, [0], axis=axis)))


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (
        a is not None and b is not None and a.shape == b.shape and bool(np.all(a == b))
    )


def conform(x: jax.Array, have: Kept, want: Kept, what: str) -> jax.Array:
    """``x`` (holding the positions ``have``) reduced to the positions ``want`` per dimension;
    size-1 dimensions (broadcast) stay."""
    for dim, (h, w) in enumerate(zip(have, want)):
        if _same(h, w) or x.shape[dim] == 1:
            continue
        if w is None:
            raise SlimmingError(f"{what}: an operand lacks positions the result keeps")
        index = w if h is None else np.searchsorted(h, w)
        if h is not None and not np.array_equal(h[np.minimum(index, len(h) - 1)], w):
            raise SlimmingError(f"{what}: an operand lacks positions the result keeps")
        x = jnp.take(x, jnp.asarray(index), axis=dim)
    return x


def opened(closed) -> tuple[object, tuple]:
    """The jaxpr of a closed jaxpr and its constants (one class in later jax versions, where a
    jaxpr's ``.jaxpr`` is itself)."""
    return getattr(closed, "jaxpr", closed), tuple(getattr(closed, "consts", ()) or ())


def called_jaxpr(eqn) -> tuple[object, Sequence] | None:
    """The jaxpr a call primitive runs, with its constants."""
    sub = sub_jaxpr(eqn)
    if sub is None:
        return None
    for name in SUB_JAXPR_PARAMS:
        closed = eqn.params.get(name)
        if closed is not None and opened(closed)[0] is sub:
            return opened(closed)
    return sub, ()


class Narrowed:
    """Evaluates a traced jaxpr with the units whose ``unit_values`` are 0 (and the query
    heads whose ``tag_values`` are 0) removed and only the ``positions`` given
    (``{(id(frame), var): {dim: kept positions}}``, :mod:`.rows`) kept."""

    def __init__(
        self,
        unit_values: np.ndarray,
        unit_roots: np.ndarray,
        traced_batch: int,
        positions: Mapping[tuple[int, object], Mapping[int, np.ndarray]] | None = None,
        tag_values: np.ndarray | None = None,
    ):
        self.unit_values, self.unit_roots = unit_values, unit_roots
        self.traced_batch = traced_batch
        self.positions = dict(positions or {})
        self.tag_values = tag_values

    def kept(self, frame: Frame, var) -> Kept:
        """The positions ``var`` holds per dimension: those of its kept units that the given
        ``positions`` keep too."""
        shape = tuple(getattr(var.aval, "shape", ()))
        if isinstance(var, core.Literal):
            return (None,) * len(shape)
        kept = list(kept_positions(frame.env.get(var, UNLABELLED), shape, self.unit_values,
                                   self.unit_roots, self.tag_values))
        for dim, chosen in self.positions.get((id(frame), var), {}).items():
            kept[dim] = chosen if kept[dim] is None else np.intersect1d(kept[dim], chosen)
        return tuple(kept)

    def size(self, traced: int, batch) -> object:
        """A traced size in terms of the actual ``batch`` (a multiple of the traced batch)."""
        if traced and traced % self.traced_batch == 0:
            return batch * (traced // self.traced_batch)
        return traced

    def shape(self, var, kept: Kept, batch) -> tuple:
        return tuple(
            self.size(s, batch) if k is None else len(k)
            for s, k in zip(var.aval.shape, kept)
        )

    def run(self, jaxpr, consts: Sequence, frame: Frame, args: Sequence, batch) -> list:
        """The outputs of ``jaxpr`` on ``args``, each holding its invar's kept positions;
        ``frame`` is the walk of this call of ``jaxpr``, ``batch`` the actual batch size."""
        env: dict = {
            var: conform(c, (None,) * jnp.ndim(c), self.kept(frame, var), "constant")
            for var, c in zip(jaxpr.constvars, consts)
        }
        env.update(zip(jaxpr.invars, args))
        children = iter(frame.children)

        def read(var):
            return var.val if isinstance(var, core.Literal) else env[var]

        for eqn in jaxpr.eqns:
            ins = [read(var) for var in eqn.invars]
            ins_kept = [self.kept(frame, var) for var in eqn.invars]
            outs_kept = [self.kept(frame, var) for var in eqn.outvars]
            called = called_jaxpr(eqn)
            if called is not None:
                sub, sub_consts = called
                child = next(children)
                ins = [
                    conform(x, h, self.kept(child, v), eqn.primitive.name)
                    for x, h, v in zip(ins, ins_kept, sub.invars)
                ]
                outs = self.run(sub, sub_consts, child, ins, batch)
            elif eqn.primitive.name == "scan":
                outs = self._scan(eqn, ins, ins_kept, next(children), batch)
            else:
                outs = self._bind(eqn, ins, ins_kept, outs_kept, batch)
            for var, out, kept in zip(eqn.outvars, outs, outs_kept):
                env[var] = self._check(eqn, var, out, kept, batch)
        return [read(var) for var in jaxpr.outvars]

    def _check(self, eqn, var, out, kept: Kept, batch):
        expected = self.shape(var, kept, batch)
        if tuple(out.shape) == expected:
            return out
        if tuple(out.shape) == tuple(self.size(s, batch) for s in var.aval.shape):
            return conform(out, (None,) * len(kept), kept, eqn.primitive.name)
        raise SlimmingError(
            f"{eqn.primitive.name}: result of shape {tuple(out.shape)}, expected {expected}"
        )

    def _scan(self, eqn, ins: list, ins_kept: list[Kept], child: Frame, batch) -> list:
        """``lax.scan`` of the body run narrowed; each initial carry reduced to the positions
        the body starts with (a recurrent state's kept units, zero at the start)."""
        params = eqn.params
        body, body_consts = opened(params["jaxpr"])
        consts, carries = scan_sizes(eqn)
        ins = list(ins)
        for k in range(consts, consts + carries):
            ins[k] = conform(ins[k], ins_kept[k], self.kept(child, body.invars[k]), "scan")

        def step(carry, xs):
            outs = self.run(body, body_consts, child, [*ins[:consts], *carry, *xs], batch)
            return outs[:carries], outs[carries:]

        carry, ys = lax.scan(
            step, ins[consts:consts + carries], ins[consts + carries:],
            length=params["length"], reverse=params["reverse"], unroll=params["unroll"],
        )
        return [*carry, *ys]

    def _bind(self, eqn, ins: list, ins_kept: list[Kept], outs_kept: list[Kept], batch) -> list:
        name = eqn.primitive.name
        rule = _RULES.get(name)
        if rule is not None:
            return rule(self, eqn, ins, ins_kept, outs_kept, batch)
        if name in ELEMENTWISE:
            ndim = len(eqn.outvars[0].aval.shape)
            ins = [
                conform(x, h, outs_kept[0], name) if jnp.ndim(x) == ndim else x
                for x, h in zip(ins, ins_kept)
            ]
        return _rebind(eqn, ins, eqn.params)


def _rebind(eqn, ins: Sequence, params: dict) -> list:
    out = eqn.primitive.bind(*ins, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


Rule = Callable[..., list]
"""``rule(narrowed, eqn, ins, ins_kept, outs_kept, batch)``: the outputs of ``eqn`` on the
narrowed inputs ``ins``."""


def _broadcast_in_dim(self: Narrowed, eqn, ins, ins_kept, outs_kept, batch) -> list:
    dims = eqn.params["broadcast_dimensions"]
    operand_shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    want = tuple(
        outs_kept[0][d] if operand_shape[i] == out_shape[d] else None
        for i, d in enumerate(dims)
    )
    ins = [conform(ins[0], ins_kept[0], want, "broadcast_in_dim"), *ins[1:]]
    shape = self.shape(eqn.outvars[0], outs_kept[0], batch)
    return _rebind(eqn, ins, {**eqn.params, "shape": shape})


def _reshape(self: Narrowed, eqn, ins, ins_kept, outs_kept, batch) -> list:
    shape = self.shape(eqn.outvars[0], outs_kept[0], batch)
    return _rebind(eqn, ins, {**eqn.params, "new_sizes": shape, "dimensions": None})


def _iota(self: Narrowed, eqn, ins, ins_kept, outs_kept, batch) -> list:
    shape = tuple(self.size(s, batch) for s in eqn.params["shape"])
    return _rebind(eqn, ins, {**eqn.params, "shape": shape})


def _split(self: Narrowed, eqn, ins, ins_kept, outs_kept, batch) -> list:
    axis = eqn.params["axis"]
    sizes = tuple(self.shape(var, kept, batch)[axis]
                  for var, kept in zip(eqn.outvars, outs_kept))
    return _rebind(eqn, ins, {**eqn.params, "sizes": sizes})


def _concatenate(self: Narrowed, eqn, ins, ins_kept, outs_kept, batch) -> list:
    axis = eqn.params["dimension"]
    want = tuple(None if d == axis else k for d, k in enumerate(outs_kept[0]))
    ins = [
        conform(x, tuple(None if d == axis else k for d, k in enumerate(h)), want, "concatenate")
        for x, h in zip(ins, ins_kept)
    ]
    return _rebind(eqn, ins, eqn.params)


def _holds(have: np.ndarray | None, want: np.ndarray | None) -> bool:
    """Whether positions ``have`` (None: all) include the positions ``want``."""
    return have is None or (want is not None and bool(np.all(np.isin(want, have))))


def _cut(x: jax.Array, kept: list, dim: int, want: np.ndarray, what: str) -> jax.Array:
    """``x`` (holding ``kept``) with dimension ``dim`` reduced to ``want``; ``kept`` updated."""
    target = list(kept)
    target[dim] = want
    x = conform(x, tuple(kept), tuple(target), what)
    kept[dim] = want
    return x


def _pair_operands(ins, ins_kept, pairs, what: str) -> tuple[list, list[Kept]]:
    """Make paired dimensions (contracted or batch dimensions of a product) hold the same
    positions: the operand that holds more of them (a constant, or an activation whose
    kernel's rows were dropped) is cut to its partner's. Returns the operands and the
    positions they hold."""
    lhs, rhs = ins[0], ins[1]
    lk, rk = list(ins_kept[0]), list(ins_kept[1])
    for a, b in pairs:
        if _same(lk[a], rk[b]):
            continue
        if _holds(lk[a], rk[b]):
            lhs = _cut(lhs, lk, a, rk[b], what)
        elif _holds(rk[b], lk[a]):
            rhs = _cut(rhs, rk, b, lk[a], what)
        else:
            raise SlimmingError(f"{what}: paired dimensions keep different positions")
    return [lhs, rhs, *ins[2:]], [tuple(lk), tuple(rk), *ins_kept[2:]]


def _restored(x: jax.Array, dim: int, held: np.ndarray, size: int) -> jax.Array:
    """``x``, which holds positions ``held`` of dimension ``dim``, with the other positions of
    that dimension (``size`` in all) put back as zeros."""
    shape = list(x.shape)
    shape[dim] = size
    index = [slice(None)] * x.ndim
    index[dim] = jnp.asarray(held)
    return jnp.zeros(shape, x.dtype).at[tuple(index)].set(x)


def _dot_general(self: Narrowed, eqn, ins, ins_kept, outs_kept, batch) -> list:
    """A product on the paired operands. A batch dimension that the operands hold in part
    while the result has no units on it (the heads of a flat projection, whose units the
    product sums over) gets its other positions back as zeros: each is a sum over removed
    units only, zero where the gates zeroed those units, and otherwise read only by a later
    product that pairs it with removed units (a closed head's values)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    pairs = list(zip(lc, rc)) + list(zip(lb, rb))
    ins, (lk, _, *_) = _pair_operands(ins, ins_kept, pairs, "dot_general")
    out = _rebind(eqn, ins, eqn.params)[0]
    for dim, operand_dim in enumerate(lb):
        held = lk[operand_dim]
        if held is not None and outs_kept[0][dim] is None:
            out = _restored(out, dim, held, eqn.outvars[0].aval.shape[dim])
    return [out]


def _conv(self: Narrowed, eqn, ins, ins_kept, outs_kept, batch) -> list:
    """The input features pair with the kernel's input axis; a depthwise convolution (one
    channel per group) keeps one group per kept channel."""
    numbers = eqn.params["dimension_numbers"]
    lhs_feature, rhs_in = numbers.lhs_spec[1], numbers.rhs_spec[1]
    groups = eqn.params["feature_group_count"]
    params = eqn.params
    if groups == 1:
        ins, _ = _pair_operands(ins, ins_kept, [(lhs_feature, rhs_in)], "conv_general_dilated")
    else:
        per_group = eqn.invars[0].aval.shape[lhs_feature] // groups
        params = {**params, "feature_group_count": ins[0].shape[lhs_feature] // per_group}
    return _rebind(eqn, ins, params)


def _slice(self: Narrowed, eqn, ins, ins_kept, outs_kept, batch) -> list:
    """A slice reads positions ``start + stride * j``: on a narrowed dimension it becomes a
    gather of the kept positions it reads; elsewhere it stays a slice (the batch rescaled)."""
    x = ins[0]
    in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    params = eqn.params
    strides = params["strides"] or (1,) * len(in_shape)
    start, limit, step, takes = [], [], [], []
    for d, (have, want) in enumerate(zip(ins_kept[0], outs_kept[0])):
        first, last, stride = params["start_indices"][d], params["limit_indices"][d], strides[d]
        if have is None and want is None:
            whole = first == 0 and stride == 1 and last == in_shape[d]
            start.append(0 if whole else first)
            limit.append(x.shape[d] if whole else last)
            step.append(stride)
            continue
        read = first + stride * (np.arange(out_shape[d]) if want is None else want)
        takes.append((d, read if have is None else np.searchsorted(have, read)))
        start.append(0)
        limit.append(x.shape[d])
        step.append(1)
    x = lax.slice(x, tuple(start), tuple(limit), tuple(step))
    for d, index in takes:
        x = jnp.take(x, jnp.asarray(index), axis=d)
    return [x]


def _gather(self: Narrowed, eqn, ins, ins_kept, outs_kept, batch) -> list:
    """Slices that take a narrowed dimension whole take what is left of it."""
    sizes = list(eqn.params["slice_sizes"])
    for d in gather_slices(eqn):
        sizes[d] = ins[0].shape[d]
    return _rebind(eqn, ins, {**eqn.params, "slice_sizes": tuple(sizes)})


def _reduce_sum(self: Narrowed, eqn, ins, ins_kept, outs_kept, batch) -> list:
    """A sum over dimensions that lost units is a sum over a stream's open units
    (:func:`~sparsejax.structure.slim_trace.widths.physical_keep` narrows no other reduced
    group), which the gated model scales to the full width: ``sum * d / n`` for the ``n`` of
    ``d`` units kept."""
    (out,) = _rebind(eqn, ins, eqn.params)
    shape = eqn.invars[0].aval.shape
    scale = 1.0
    for axis in eqn.params["axes"]:
        kept = ins_kept[0][axis]
        if kept is not None:
            scale *= shape[axis] / max(len(kept), 1)
    return [out if scale == 1.0 else (out * scale).astype(out.dtype)]


_RULES: dict[str, Rule] = {
    "reduce_sum": _reduce_sum,
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "iota": _iota,
    "split": _split,
    "concatenate": _concatenate,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "slice": _slice,
    "gather": _gather,
}
"""Primitives whose parameters name sizes or pair dimensions of two operands; every other
primitive is rebound as traced (elementwise ones after their operands are conformed to the
result's positions)."""
