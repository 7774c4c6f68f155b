"""Rows dropped from kernels, and the positions upstream that only those rows read.

A kernel may lose rows along an axis that a product sums over although the units of that axis
stay: an *input selection* (:class:`~sparsejax.structure.traced_model.GatePlacement`), such as
LeNet-300-100's pixels, which are no group, or DenseNet's per-layer gates on a concatenation
that other layers read whole. The rows are zero after the gates are folded, so leaving them out
of the product changes nothing, provided the product's other operand loses the same positions.

Two passes over the traced program find every position this removes (:func:`dropped_positions`):

- **forward**, the rows follow their kernel into calls and through dtype conversions; any other
  use of such a kernel is refused, since only a product summing over the dropped axis is
  unchanged by it;
- **backward**, a variable keeps the positions some use reads: the operand paired with the
  dropped rows reads only the kept rows, elementwise operations and broadcasts read what their
  result keeps, calls what their jaxpr reads, and every other use reads all positions. So a
  chain that only this product reads (a layer's own BatchNorm and ReLU before its convolution)
  narrows back to where it branches off, and its per-channel parameters narrow with it; the
  gather happens there.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from jax.extend import core

from sparsejax.structure.trace.rules import ELEMENTWISE
from sparsejax.structure.trace.values import Frame
from sparsejax.structure.trace.walk import sub_jaxpr

Key = tuple[int, object]
"""A variable of one walk of a jaxpr: ``(id(frame), var)``."""
Positions = dict[Key, dict[int, np.ndarray]]
"""Per variable, per dimension, the positions kept (sorted), where fewer than all."""
Need = tuple[np.ndarray | None, ...]
"""Per dimension of a variable, the positions read (boolean), or None for all of them."""

PASS_THROUGH = frozenset({"convert_element_type", "copy", "copy_p"})
"""Primitives whose result holds the operand's positions unchanged."""


class RowsError(RuntimeError):
    """A kernel whose rows are dropped is read other than by a product summing over them."""


def contracted(eqn) -> tuple[tuple[int, int], ...]:
    """The paired dimensions ``(lhs, rhs)`` a product sums over (a grouped convolution's
    input features are not summed across groups); empty for other primitives."""
    if eqn.primitive.name == "dot_general":
        (lc, rc), _ = eqn.params["dimension_numbers"]
        return tuple(zip(lc, rc))
    if eqn.primitive.name == "conv_general_dilated" and eqn.params["feature_group_count"] == 1:
        numbers = eqn.params["dimension_numbers"]
        return ((numbers.lhs_spec[1], numbers.rhs_spec[1]),)
    return ()


def _children(jaxpr, frame: Frame) -> dict[int, Frame]:
    """The walk's frame of each call or scan equation of ``jaxpr``, by equation index."""
    walked = [i for i, eqn in enumerate(jaxpr.eqns)
              if sub_jaxpr(eqn) is not None or eqn.primitive.name == "scan"]
    return dict(zip(walked, frame.children))


def _forward(jaxpr, frame: Frame, rows: Positions) -> None:
    """Carry the dropped rows of ``rows`` along their kernels (see the module docstring)."""
    children = _children(jaxpr, frame)
    for i, eqn in enumerate(jaxpr.eqns):
        sub = sub_jaxpr(eqn)
        for k, var in enumerate(eqn.invars):
            dropped = None if isinstance(var, core.Literal) else rows.get((id(frame), var))
            if dropped is None:
                continue
            if sub is not None:
                rows[(id(children[i]), sub.invars[k])] = dropped
            elif eqn.primitive.name in PASS_THROUGH:
                rows[(id(frame), eqn.outvars[0])] = dropped
            elif k > 1 or not set(dropped) <= {pair[k] for pair in contracted(eqn)}:
                raise RowsError(
                    f"{eqn.primitive.name} reads a kernel whose rows are dropped other than "
                    "as a product summing over them; keep those rows"
                )
        if sub is not None:
            _forward(sub, children[i], rows)


def _union(needs: list[Need], ndim: int) -> Need:
    """What several uses read together; all positions when there is no use."""
    if not needs:
        return (None,) * ndim
    return tuple(
        None if any(n[d] is None for n in needs) else np.logical_or.reduce([n[d] for n in needs])
        for d in range(ndim)
    )


def var_shape(var) -> tuple[int, ...]:
    """The shape of a jaxpr variable (() for a token or the like)."""
    return tuple(getattr(var.aval, "shape", ()))


def _elementwise(eqn, outs: list[Need]) -> tuple[list[Need], bool]:
    out = var_shape(eqn.outvars[0])
    operands = [
        tuple(outs[0][d] if s == out[d] else None for d, s in enumerate(var_shape(var)))
        if len(var_shape(var)) == len(out) else (None,) * len(var_shape(var))
        for var in eqn.invars
    ]
    return operands, True


def _broadcast_in_dim(eqn, outs: list[Need]) -> tuple[list[Need], bool]:
    dims, out = eqn.params["broadcast_dimensions"], var_shape(eqn.outvars[0])
    operand = tuple(
        outs[0][d] if s == out[d] else None for s, d in zip(var_shape(eqn.invars[0]), dims)
    )
    return [operand, *_all(eqn.invars[1:])], True


def _reshape(eqn, outs: list[Need]) -> tuple[list[Need], bool]:
    """A reshape that only adds or removes dimensions of size 1 maps the others in order;
    any other reshape reads everything and gives all positions."""
    shape, out = var_shape(eqn.invars[0]), var_shape(eqn.outvars[0])
    kept_in = [d for d, s in enumerate(shape) if s != 1]
    kept_out = [d for d, s in enumerate(out) if s != 1]
    if [shape[d] for d in kept_in] != [out[d] for d in kept_out]:
        return _all(eqn.invars), False
    need: list[np.ndarray | None] = [None] * len(shape)
    for a, b in zip(kept_in, kept_out):
        need[a] = outs[0][b]
    return [tuple(need), *_all(eqn.invars[1:])], True


def _reduce(eqn, outs: list[Need]) -> tuple[list[Need], bool]:
    """A reduction reads all of the dimensions it reduces and what its result keeps of the
    others."""
    axes = set(eqn.params["axes"])
    others = iter(outs[0])
    need = tuple(None if d in axes else next(others) for d in range(len(var_shape(eqn.invars[0]))))
    return [need], True


def _product(eqn, frame: Frame, rows: Positions) -> tuple[list[Need], bool]:
    """The operand paired with a kernel's dropped rows reads only the kept rows; the product
    gives all of its result's positions."""
    needs = [[None] * len(var_shape(v)) for v in eqn.invars]
    for pair in contracted(eqn):
        for side in (0, 1):
            kernel = eqn.invars[1 - side]
            dropped = None if isinstance(kernel, core.Literal) else rows.get((id(frame), kernel))
            if dropped is not None and pair[1 - side] in dropped:
                mask = np.zeros(var_shape(eqn.invars[side])[pair[side]], bool)
                mask[dropped[pair[1 - side]]] = True
                needs[side][pair[side]] = mask
    return [tuple(n) for n in needs], False


def _all(variables) -> list[Need]:
    return [(None,) * len(var_shape(v)) for v in variables]


def _record(read: Positions, frame: Frame, var, need: Need) -> None:
    partial = {d: np.flatnonzero(m) for d, m in enumerate(need) if m is not None and not m.all()}
    if partial:
        read[(id(frame), var)] = partial


_PASSING = {
    **dict.fromkeys(ELEMENTWISE, _elementwise),
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "reduce_sum": _reduce,
    "reduce_max": _reduce,
    "reduce_min": _reduce,
}
"""Rules ``(eqn, result needs) -> (operand needs, whether the result holds only what is
read)`` of the primitives that can pass a need back; a product reads part of its operands
(:func:`_product`); every other primitive reads all and gives all."""


def _backward(
    jaxpr, frame: Frame, rows: Positions, outs: list[Need], read: Positions
) -> list[Need]:
    """What ``jaxpr`` reads of its inputs when its outputs are read as ``outs``; records in
    ``read`` every variable that holds only part of its positions: those that some use reads,
    where its equation (or the caller, for an input) can give just those."""
    children = _children(jaxpr, frame)
    uses: dict[object, list[Need]] = {}

    def use(variables, needs) -> None:
        for var, need in zip(variables, needs):
            if not isinstance(var, core.Literal):
                uses.setdefault(var, []).append(need)

    use(jaxpr.outvars, outs)
    for i in reversed(range(len(jaxpr.eqns))):
        eqn = jaxpr.eqns[i]
        results = [_union(uses.get(var, []), len(var_shape(var))) for var in eqn.outvars]
        sub = sub_jaxpr(eqn)
        if sub is not None:
            operands = _backward(sub, children[i], rows, results, read)
            for var, inner in zip(eqn.outvars, sub.outvars):
                if not isinstance(inner, core.Literal) and (id(children[i]), inner) in read:
                    read[(id(frame), var)] = read[(id(children[i]), inner)]
        else:
            rule = _PASSING.get(eqn.primitive.name)
            if rule is not None:
                operands, passed = rule(eqn, results)
            elif contracted(eqn):
                operands, passed = _product(eqn, frame, rows)
            else:
                operands, passed = _all(eqn.invars), False
            if passed:
                for var, need in zip(eqn.outvars, results):
                    _record(read, frame, var, need)
        use(eqn.invars, operands)
    inputs = {var: _union(uses.get(var, []), len(var_shape(var)))
              for var in [*jaxpr.constvars, *jaxpr.invars]}
    for var, need in inputs.items():
        _record(read, frame, var, need)
    return [inputs[var] for var in jaxpr.invars]


def dropped_positions(
    jaxpr, frame: Frame, rows: Mapping[object, Mapping[int, np.ndarray]]
) -> Positions:
    """The positions each variable of ``jaxpr`` (walked as ``frame``) keeps when the inputs
    in ``rows`` (``{invar: {dim: kept positions}}``, kernels) drop the others: the kernels
    wherever they go, and every variable that only their products read in part (see the
    module docstring). Variables that keep everything are left out.

    Raises:
      RowsError: a kernel with dropped rows is read other than by a product summing over them.
    """
    kernels: Positions = {
        (id(frame), var): {d: np.asarray(p, np.int64) for d, p in dims.items()}
        for var, dims in rows.items()
    }
    _forward(jaxpr, frame, kernels)
    read: Positions = {}
    _backward(jaxpr, frame, kernels, [(None,) * len(var_shape(v)) for v in jaxpr.outvars], read)
    for key, dims in kernels.items():
        read.setdefault(key, {}).update(dims)
    return read

