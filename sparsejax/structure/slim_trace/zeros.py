"""Which kernel rows only ever multiply zeros, or one constant: the activations that are
identically zero, and those that do not depend on the input.

A unit whose own output is zero for every input (its filter and bias zero, or a BatchNorm with
scale and bias zero, then ReLU) contributes nothing to the kernels that read it, even where
their rows are not zero (a neuron that the ``stochastic`` method's L1 penalty killed from its
inputs). Such a unit can go exactly like one whose readers' rows are zero. A unit whose output
is a nonzero constant (a dead filter with a bias, a BatchNorm's shift, ``sigmoid(0)``) can go
too where its readers are dense products with a bias: ``x W + b`` equals ``x' W' + (b + c W_c)``
without the rows ``W_c`` that meet the constants ``c``, the fold the zoo's surgery makes.

:func:`read_rows` finds both by running the evaluation forward pass once on three values per
entry instead of one (an abstract interpretation at batch size 1): its value at a zero input,
a *nonzero indicator* (1 where it may be nonzero for some input) and a *varies indicator* (1
where it may depend on the input). Parameters vary nowhere and are nonzero where their value
is; the input varies everywhere. Each primitive maps the indicators soundly (an entry marked 0
is so for every input), and an entry that does not vary is nonzero where its value is:

- a product (``dot_general``, ``conv_general_dilated``) is nonzero where the product of the
  nonzero indicators is positive, and varies where one operand varies against a possibly
  nonzero entry of the other; a sum (reductions, sum pooling) or a data movement (reshape,
  transpose, slice, pad, concatenation, broadcast, max pooling) is the same primitive on each
  indicator;
- ``mul`` is nonzero where both operands are and varies as a product does, ``div`` is nonzero
  where the numerator is; ``add``, ``sub``, ``max``, ``min`` and ``select_n`` are nonzero where
  either is; any elementwise function varies where an operand does;
- a unary function keeps its operand's zeros when it maps 0 to 0 (ReLU's ``max(x, 0)``,
  ``tanh``, ``neg``, a dtype conversion), and is nonzero everywhere otherwise (``exp``,
  ``logistic``);
- calls are run inline; every other primitive (a scan, a gather) is nonzero and varies
  everywhere.

At each product that reads a parameter along a summed axis (a kernel's rows), the other
operand, reduced to that axis, says which rows ever meet a nonzero value and, for a matrix
product summing one axis, which rows meet one constant at every position, and its value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core

from sparsejax.structure.slim_trace.interpret import called_jaxpr, opened
from sparsejax.structure.slim_trace.rows import PASS_THROUGH, contracted, var_shape
from sparsejax.structure.sparsify import evaluation_copy
from sparsejax.structure.trace.analyze import (
    Apply,
    call_model,
    dotted_path,
    forward_jaxpr,
)
from sparsejax.structure.trace.rules import BINARY, UNARY

Rows = dict[tuple[str, int], np.ndarray]
"""``(parameter path, axis) -> True`` for each row that meets a nonzero value somewhere."""


@dataclasses.dataclass(frozen=True)
class RowReads:
    """What the rows of the kernels meet (:func:`read_rows`).

    Attributes:
      met: :data:`Rows`.
      constant: ``(parameter path, axis) -> (mask, values)`` for a parameter that one matrix
        product reads, summing over that axis alone: True in ``mask`` for each row that meets
        the same finite value, ``values[row]``, at every position for every input.
    """

    met: Rows
    constant: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]


class _Entry(NamedTuple):
    """A variable of the abstract run: its value at a zero input and its nonzero and varies
    indicators (float 0/1 arrays of its shape)."""

    value: jax.Array
    nonzero: jax.Array
    varies: jax.Array


_SAME_ON_INDICATORS = frozenset({
    "dot_general", "conv_general_dilated", "reduce_sum", "reduce_max", "reduce_window_sum",
    "reduce_window_max", "reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim",
    "slice", "pad", "concatenate", "rev", "copy", "copy_p",
})
"""Primitives whose result on 0/1 indicators is positive exactly where a nonzero operand entry
reaches it."""
_PRODUCTS = frozenset({"dot_general", "conv_general_dilated"})
_EITHER = frozenset({"add", "add_any", "sub", "max", "min"})
_OPERAND_ZERO_KEPT = frozenset({"convert_element_type", "stop_gradient", "reduce_precision"})


def _maps_zero_to_zero(eqn) -> bool:
    """Whether the unary primitive of ``eqn`` gives 0 at 0."""
    dtype = getattr(eqn.invars[0].aval, "dtype", jnp.float32)
    try:
        with jax.ensure_compile_time_eval():
            return bool(eqn.primitive.bind(np.zeros((), dtype), **eqn.params) == 0)
    except Exception:  # a parameter the scalar cannot take: assume the worst
        return False


class _Abstract:
    """The abstract run of one program (traced under ``jax.jit``); ``rows`` collects what the
    kernels' rows meet, ``constant`` which meet one constant, both as arrays."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], jax.Array] = {}
        self.constant: dict[tuple[str, int], tuple[jax.Array, jax.Array]] = {}
        self.reads: dict[tuple[str, int], int] = {}

    def run(self, jaxpr, consts, args: list, params: Mapping[object, str]) -> list:
        """Entries of ``jaxpr``'s outputs; ``params``: its inputs that are parameters, by
        path."""
        env: dict = {v: _constant(c) for v, c in zip(jaxpr.constvars, consts)}
        env.update(zip(jaxpr.invars, args))
        names = dict(params)

        def read(var):
            return _constant(var.val) if isinstance(var, core.Literal) else env[var]

        for eqn in jaxpr.eqns:
            ins = [read(var) for var in eqn.invars]
            outs = self._equation(eqn, ins, names)
            source = eqn.invars[0] if eqn.invars else None
            if (eqn.primitive.name in PASS_THROUGH | _OPERAND_ZERO_KEPT
                    and not isinstance(source, core.Literal) and source in names):
                names[eqn.outvars[0]] = names[source]
            for var, out in zip(eqn.outvars, outs):
                env[var] = out
        return [read(var) for var in jaxpr.outvars]

    def _equation(self, eqn, ins: list[_Entry], names: Mapping[object, str]) -> list[_Entry]:
        called = called_jaxpr(eqn)
        if called is not None:
            sub, consts = called
            inner = {v: names[o] for o, v in zip(eqn.invars, sub.invars)
                     if not isinstance(o, core.Literal) and o in names}
            return self.run(sub, consts, ins, inner)
        if eqn.primitive.name in _PRODUCTS:
            self._record(eqn, ins, names)
        values = eqn.primitive.bind(*[e.value for e in ins], **eqn.params)
        values = values if eqn.primitive.multiple_results else [values]
        indicators = _indicators(eqn, ins)
        return [_Entry(value, _known(value, nonzero, varies), varies)
                for value, (nonzero, varies) in zip(values, indicators)]

    def _record(self, eqn, ins: list[_Entry], names: Mapping[object, str]) -> None:
        """For each parameter operand, which rows along a summed axis meet a nonzero entry of
        the other operand and, in a matrix product summing that axis alone, one constant."""
        pairs = contracted(eqn)
        for pair in pairs:
            for side in (0, 1):
                kernel = eqn.invars[1 - side]
                if isinstance(kernel, core.Literal) or kernel not in names:
                    continue
                other = ins[side]
                key = (names[kernel], pair[1 - side])
                met = _along(other.nonzero, pair[side]).max(axis=1) > 0
                self.rows[key] = self.rows[key] | met if key in self.rows else met
                self.reads[key] = self.reads.get(key, 0) + 1
                if eqn.primitive.name == "dot_general" and len(pairs) == 1:
                    self.constant[key] = _constant_rows(other, pair[side])


def _known(value: jax.Array, nonzero: jax.Array, varies: jax.Array) -> jax.Array:
    """The nonzero indicator sharpened where the entry does not vary: its value at the zero
    input is then its value for every input (a ReLU of a negative constant is 0)."""
    if not (jnp.issubdtype(value.dtype, jnp.number) or value.dtype == jnp.bool_):
        return nonzero
    return nonzero * jnp.where(varies > 0, 1.0, jnp.asarray(value != 0, jnp.float32))


def _along(array: jax.Array, axis: int) -> jax.Array:
    """``array`` as ``(size of axis, everything else)``."""
    moved = jnp.moveaxis(array, axis, 0)
    return moved.reshape(moved.shape[0], -1)


def _constant_rows(entry: _Entry, axis: int) -> tuple[jax.Array, jax.Array]:
    """Per index of ``axis``: whether ``entry`` is one finite constant there at every position,
    and that value."""
    values = _along(jnp.asarray(entry.value, jnp.float32), axis)
    first = values[:, 0]
    same = jnp.all(values == first[:, None], axis=1) & jnp.isfinite(first)
    return same & ~jnp.any(_along(entry.varies, axis) > 0, axis=1), first


def _indicators(eqn, ins: list[_Entry]) -> list[tuple[jax.Array, jax.Array]]:
    """The nonzero and varies indicators of each result of ``eqn`` (the module docstring)."""
    name = eqn.primitive.name
    shapes = [var_shape(var) for var in eqn.outvars]
    nonzero = [e.nonzero for e in ins]
    varies = [e.varies for e in ins]

    def same(operands: list[jax.Array]) -> list[jax.Array]:
        out = eqn.primitive.bind(*operands, **eqn.params)
        return [jnp.asarray(o > 0, jnp.float32)
                for o in (out if eqn.primitive.multiple_results else [out])]

    def either(operands: list[jax.Array], shape) -> jax.Array:
        return jnp.broadcast_to(jnp.max(jnp.stack(jnp.broadcast_arrays(*operands)), 0), shape)

    if name in _PRODUCTS:
        (nz,) = same(nonzero)
        crossed = eqn.primitive.bind(varies[0], nonzero[1], **eqn.params) \
            + eqn.primitive.bind(nonzero[0], varies[1], **eqn.params)
        return [(nz, jnp.asarray(crossed > 0, jnp.float32))]
    if name in _SAME_ON_INDICATORS:
        return list(zip(same(nonzero), same(varies)))
    if name == "mul":
        product = jnp.clip(varies[0] * nonzero[1] + nonzero[0] * varies[1], 0, 1)
        return [(nonzero[0] * nonzero[1], jnp.broadcast_to(product, shapes[0]))]
    if name == "div":
        return [(jnp.broadcast_to(nonzero[0], shapes[0]), either(varies, shapes[0]))]
    if name in _EITHER or name == "select_n":
        cases = nonzero[1:] if name == "select_n" else nonzero
        return [(either(cases, shapes[0]), either(varies, shapes[0]))]
    if name in _OPERAND_ZERO_KEPT or (name in UNARY and _maps_zero_to_zero(eqn)):
        return [(nonzero[0], varies[0])]
    if name in UNARY or name in BINARY:
        return [(jnp.ones(shapes[0], jnp.float32), either(varies, shapes[0]))]
    if name == "reduce_min":
        axes = eqn.params["axes"]
        return [(jnp.max(nonzero[0], axis=axes), jnp.max(varies[0], axis=axes))]
    return [(jnp.ones(shape, jnp.float32),) * 2 for shape in shapes]


def _constant(value) -> _Entry:
    """A value that is no input: nonzero where it is not 0 (everywhere for values that are no
    numbers, such as PRNG keys), varying nowhere."""
    value = jnp.asarray(value)
    if not (jnp.issubdtype(value.dtype, jnp.number) or value.dtype == jnp.bool_):
        nonzero = jnp.ones(value.shape, jnp.float32)
    else:
        nonzero = jnp.asarray(value != 0, jnp.float32)
    return _Entry(value, nonzero, jnp.zeros(value.shape, jnp.float32))


def read_rows(
    model: nnx.Module,
    example_input: jax.Array | jax.ShapeDtypeStruct,
    apply: Apply = call_model,
) -> RowReads:
    """For every parameter that a product reads along a summed axis, which of its rows meet a
    value other than zero for some input, and which meet one constant, in ``model``'s
    evaluation forward pass ``apply(model, x)`` with its current parameters (see the module
    docstring); a row marked False in ``met`` only ever multiplies zeros."""
    x = jax.ShapeDtypeStruct((1, *example_input.shape[1:]), example_input.dtype)
    closed, keyed, _ = forward_jaxpr(evaluation_copy(model), x, apply)
    jaxpr, consts = opened(closed)
    leaves = [leaf for _, leaf in keyed]
    paths = [dotted_path(path) for path, _ in keyed]

    @jax.jit
    def abstract(leaves: list[jax.Array]):
        run = _Abstract()
        given = jnp.zeros(x.shape, x.dtype)
        entries = [*(_constant(v) for v in leaves),
                   _Entry(given, jnp.ones(x.shape, jnp.float32), jnp.ones(x.shape, jnp.float32))]
        run.run(jaxpr, consts, entries, dict(zip(jaxpr.invars, paths)))
        once = {key: found for key, found in run.constant.items() if run.reads[key] == 1}
        return run.rows, once

    rows, constant = abstract(leaves)
    return RowReads(
        {key: np.asarray(value) for key, value in rows.items()},
        {key: (np.asarray(mask), np.asarray(values)) for key, (mask, values) in constant.items()},
    )
