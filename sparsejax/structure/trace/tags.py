"""Query heads that share a key: tags on the positions of each head, from its scores to the
output projection.

In grouped-query attention (Ainslie et al. 2023) the M query heads of a group share one key and
value head. The scores product ties query feature j of every head of the group to key feature
j, so the query projection's columns are merged with the key's units: a query head is no unit.
It still has positions of its own (its scores, attention weights and mixed values, and its rows
of the output projection), and a *tag* labels them:

- **Made** by a product of two activations where one operand's field spans dimensions that the
  product sums over and free dimensions besides (the M query heads that meet each key): one
  tag per position of those free dimensions and of the field's batch dimensions (the groups),
  and every unit id of the field at a position is recorded with that position's tag (the
  query projection's columns; the ids at the same positions as them, :class:`PositionLinks`,
  the other half of a rotary embedding's features, go with them).
- **Followed** through elementwise operations, broadcasts, transposes, squeezes, reductions
  over other dimensions, reshapes and the free and batch dimensions of products.
- **Recorded** where a product sums a tagged dimension against a parameter (the output
  projection): the parameter's unit ids there take the tags (its rows, one head's per tag).

Tags merge and block no units. They say where a query head's positions are: for gates placed
on heads inside key/value groups (:class:`~sparsejax.models.placement.GatePlacement`) and for
the costs of products of two activations by head (:class:`~.values.Joint` factors).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from sparsejax.structure.trace.rules import ELEMENTWISE, REDUCTIONS, reshaped_alone
from sparsejax.structure.trace.units import NO_UNIT, Field, relabel
from sparsejax.structure.trace.values import Context, Factor, Joint, Value, field_on


def _shape(var) -> tuple[int, ...]:
    return tuple(getattr(var.aval, "shape", ()))


def _relabelled(tags: Sequence[Field], mapping: dict[int, int]) -> tuple[Field, ...]:
    return tuple(t for t in (relabel(t, mapping) for t in tags) if t is not None)


def _first_per_dims(tags: Sequence[Field]) -> tuple[Field, ...]:
    """One tag field per set of dimensions (the first); fields that overlap one kept are
    dropped."""
    kept: list[Field] = []
    for tag in tags:
        if not any(set(tag.dims) & set(k.dims) for k in kept):
            kept.append(tag)
    return tuple(kept)


def followed(eqn, ins: Sequence[Value]) -> tuple[tuple[Field, ...], ...] | None:
    """The tags of the outputs of ``eqn`` (not a product) from its inputs' tags, one tuple
    per output; None when no input has tags."""
    if not any(value.tags for value in ins):
        return None
    name, outs = eqn.primitive.name, len(eqn.outvars)
    out_shape = _shape(eqn.outvars[0])
    if name in ELEMENTWISE:
        same = [t for var, v in zip(eqn.invars, ins) if _shape(var) == out_shape for t in v.tags]
        return (_first_per_dims(same),) * outs
    tags = ins[0].tags
    if name == "broadcast_in_dim":
        mapping = dict(enumerate(eqn.params["broadcast_dimensions"]))
    elif name == "transpose":
        mapping = {source: target for target, source in enumerate(eqn.params["permutation"])}
    elif name in ("squeeze", *REDUCTIONS):
        ndim = len(_shape(eqn.invars[0]))
        removed = {d % ndim for d in eqn.params.get("dimensions", eqn.params.get("axes", ()))}
        kept = [d for d in range(ndim) if d not in removed]
        mapping = {source: target for target, source in enumerate(kept)}
    elif name == "reshape":
        in_shape = _shape(eqn.invars[0])
        moved = (reshaped_alone(t, in_shape, out_shape) for t in tags)
        return (tuple(t for t in moved if t is not None),) * outs
    else:
        return ((),) * outs
    return (_relabelled(tags, mapping),) * outs


@dataclasses.dataclass(frozen=True)
class _Product:
    """A matrix product's dimensions: each operand's contracted and batch dimensions and
    their partners, and where the free and batch dimensions go in the output."""

    contracted: tuple[tuple[int, ...], tuple[int, ...]]
    batch: tuple[tuple[int, ...], tuple[int, ...]]
    out: tuple[dict[int, int], dict[int, int]]
    shapes: tuple[tuple[int, ...], tuple[int, ...]]

    @classmethod
    def of(cls, eqn) -> _Product:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lc, rc, lb, rb = map(tuple, (lc, rc, lb, rb))
        shapes = (_shape(eqn.invars[0]), _shape(eqn.invars[1]))
        lfree = [d for d in range(len(shapes[0])) if d not in lc + lb]
        rfree = [d for d in range(len(shapes[1])) if d not in rc + rb]
        lhs_out = {d: k for k, d in enumerate(lb)} | {d: len(lb) + k for k, d in enumerate(lfree)}
        rhs_out = {d: k for k, d in enumerate(rb)} | {
            d: len(lb) + len(lfree) + k for k, d in enumerate(rfree)}
        return cls((lc, rc), (lb, rb), (lhs_out, rhs_out), shapes)

    def partner(self, side: int, dim: int) -> int:
        """The dimension of the other operand paired with ``dim`` of operand ``side``."""
        for own, other in ((self.contracted[side], self.contracted[1 - side]),
                           (self.batch[side], self.batch[1 - side])):
            if dim in own:
                return other[own.index(dim)]
        raise KeyError(dim)

    def keys(self, side: int, dims: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """The product's index of each of ``dims`` of operand ``side``: a paired dimension is
        the left operand's, so that both operands name it alike."""
        return tuple((0, self.partner(1, d)) if side == 1 and self._paired(1, d) else (side, d)
                     for d in dims)

    def _paired(self, side: int, dim: int) -> bool:
        return dim in self.contracted[side] + self.batch[side]


def _made(ctx: Context, product: _Product, side: int, value: Value) -> tuple[Field, ...]:
    """The tags a product of two activations makes on operand ``side``: per field that spans
    contracted and free dimensions, one tag per position of its free and batch dimensions,
    its unit ids recorded with them."""
    made = []
    contracted, batch = set(product.contracted[side]), set(product.batch[side])
    for field in value.fields:
        free = [d for d in field.dims if d not in contracted | batch]
        if not free or not set(field.dims) & contracted:
            continue
        tagged_dims = tuple(d for d in field.dims if d not in contracted)
        tags = ctx.new_tags(tuple(product.shapes[side][d] for d in tagged_dims))
        spread = [field.ids.shape[k] if d in tagged_dims else 1 for k, d in enumerate(field.dims)]
        ctx.tagged.append((field.ids, np.broadcast_to(tags.reshape(spread), field.ids.shape)))
        made.append(Field(tagged_dims, tags))
    return tuple(made)


def _record_rows(ctx: Context, product: _Product, side: int, tags: Sequence[Field],
                 kernel: Value) -> None:
    """Tags summed against a parameter (the output projection's rows): the parameter's unit
    ids at the partner positions take them."""
    contracted = set(product.contracted[side])
    for tag in tags:
        if not set(tag.dims) <= contracted:
            continue
        partners = [product.partner(side, d) for d in tag.dims]
        match = field_on(kernel, tuple(sorted(partners)))
        if match is not None:
            order = np.argsort(np.argsort(partners))
            ctx.tagged.append((np.transpose(match.ids, order), tag.ids))


def product(
    ctx: Context, eqn, ins: Sequence[Value], macs: tuple[Factor, ...], *, activations: bool
) -> tuple[tuple[Field, ...], tuple[Factor, ...]]:
    """A matrix product's output tags and cost factors (``macs`` as the rule found them): a
    product of two activations (``activations``) makes tags (:func:`_made`); a product with
    a parameter records the parameter's ids where it sums tags against them; either counts
    the positions of its tags jointly with the units there (:func:`joint_factors`)."""
    spec = _Product.of(eqn)
    tags = [value.tags for value in ins]
    if activations:
        tags = [(*tags[side], *_made(ctx, spec, side, ins[side])) for side in (0, 1)]
    if not any(tags):
        return (), macs
    for side in (0, 1):
        if ins[1 - side].param is not None:
            _record_rows(ctx, spec, side, tags[side], ins[1 - side])
    out = _first_per_dims([*_relabelled(tags[0], spec.out[0]),
                           *_relabelled(tags[1], spec.out[1])])
    return out, joint_factors(spec, ins, tags, macs)


def joint_factors(
    product: _Product,
    ins: Sequence[Value],
    tags: Sequence[Sequence[Field]],
    macs: tuple[Factor, ...],
) -> tuple[Factor, ...]:
    """The cost factors of a product of two activations with tags: the unit fields that the
    factors ``macs`` count (those whose ids appear there) and the tag fields, over the
    product's indices; fields that share an index with a tag field form one :class:`Joint`
    over their indices, the others stay as they are, and the indices no field covers are one
    fixed size."""
    sizes: dict[tuple[int, int], int] = {}
    for side in (0, 1):
        for d, size in enumerate(product.shapes[side]):
            sizes.setdefault(product.keys(side, (d,))[0], size)
    counted = {id(f) for f in macs if isinstance(f, np.ndarray)}
    units = [(product.keys(side, f.dims), f.ids) for side in (0, 1) for f in ins[side].fields
             if id(f.ids) in counted]
    marks = [(product.keys(side, t.dims), t.ids) for side in (0, 1) for t in tags[side]]
    joined_keys: set = set()
    for keys, _ in marks:
        joined_keys |= set(keys)
    changed = True
    while changed:
        changed = False
        for keys, _ in units:
            if set(keys) & joined_keys and not set(keys) <= joined_keys:
                joined_keys |= set(keys)
                changed = True
    order = sorted(joined_keys)
    shape = tuple(sizes[k] for k in order)

    def spread(keys: tuple, ids: np.ndarray) -> np.ndarray:
        moved = np.transpose(ids, np.argsort([order.index(k) for k in keys]))
        full = [sizes[k] if k in keys else 1 for k in order]
        return np.broadcast_to(moved.reshape(full), shape)

    inside = [spread(keys, ids) for keys, ids in units if set(keys) <= joined_keys]
    tag = np.full(shape, NO_UNIT, np.int64)
    for keys, ids in marks:
        tag = np.where(tag == NO_UNIT, spread(keys, ids), tag)
    outside = [ids for keys, ids in units if not set(keys) <= joined_keys]
    covered = joined_keys | {k for keys, _ in units for k in keys}
    fixed = math.prod(size for key, size in sizes.items() if key not in covered)
    return (Joint(tuple(inside), tag), *outside, fixed)


def with_tags(outs: Sequence[Value], tags: Sequence[tuple[Field, ...]]) -> list[Value]:
    """``outs`` with the tags ``tags`` (one tuple per output)."""
    return [dataclasses.replace(v, tags=t) if t else v for v, t in zip(outs, tags)]
