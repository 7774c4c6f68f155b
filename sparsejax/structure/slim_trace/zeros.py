"""Which kernel rows only ever multiply zeros: the activations that are identically zero.

A unit whose own output is zero for every input (its filter and bias zero, or a BatchNorm with
scale and bias zero, then ReLU) contributes nothing to the kernels that read it, even where
their rows are not zero (a neuron that the ``stochastic`` method's L1 penalty killed from its
inputs). Such a unit can go exactly like one whose readers' rows are zero.

:func:`zero_rows` finds them by running the evaluation forward pass once on *nonzero
indicators* instead of values (an abstract interpretation at batch size 1): a parameter's
indicator is ``value != 0``, the input's is 1 everywhere, and each primitive maps indicators to
the indicator of its result, soundly (an entry marked 0 is 0 for every input):

- a product (``dot_general``, ``conv_general_dilated``), a sum (reductions, sum pooling) or a
  data movement (reshape, transpose, slice, pad, concatenation, broadcast, max pooling) is the
  same primitive on the indicators, nonzero where the result is positive: an output entry is
  nonzero only if some product of nonzero operands reaches it;
- ``mul`` is nonzero where both operands are, ``div`` where the numerator is, ``add``, ``sub``,
  ``max``, ``min`` and ``select_n`` where either is;
- a unary function keeps its operand's zeros when it maps 0 to 0 (ReLU's ``max(x, 0)``,
  ``tanh``, ``neg``, a dtype conversion), and is nonzero everywhere otherwise (``exp``,
  ``logistic``);
- calls are run inline; every other primitive (a scan, a gather, a comparison) gives 1.

At each product that reads a parameter along a summed axis (a kernel's rows), the indicator of
the other operand, reduced to that axis, says which rows ever meet a nonzero value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core

from sparsejax.structure.slim_trace.interpret import called_jaxpr, opened
from sparsejax.structure.slim_trace.rows import PASS_THROUGH, contracted, var_shape
from sparsejax.structure.sparsify import evaluation_copy
from sparsejax.structure.trace.analyze import dotted_path, forward_jaxpr
from sparsejax.structure.trace.rules import UNARY

Rows = dict[tuple[str, int], np.ndarray]
"""``(parameter path, axis) -> True`` for each row that meets a nonzero value somewhere."""

_SAME_ON_INDICATORS = frozenset({
    "dot_general", "conv_general_dilated", "reduce_sum", "reduce_max", "reduce_window_sum",
    "reduce_window_max", "reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim",
    "slice", "pad", "concatenate", "rev", "copy", "copy_p",
})
"""Primitives whose result on 0/1 indicators is positive exactly where a nonzero operand entry
reaches it."""
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


class _Indicators:
    """The indicator run of one program (traced under ``jax.jit``); ``rows`` collects what the
    kernels' rows meet, as boolean arrays."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], jax.Array] = {}

    def run(self, jaxpr, consts, args: list, params: Mapping[object, str]) -> list:
        """Indicators of ``jaxpr``'s outputs; ``params``: its inputs that are parameters, by
        path."""
        env: dict = {v: _indicator(c) for v, c in zip(jaxpr.constvars, consts)}
        env.update(zip(jaxpr.invars, args))
        names = dict(params)

        def read(var):
            return _indicator(var.val) if isinstance(var, core.Literal) else env[var]

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

    def _equation(self, eqn, ins: list, names: Mapping[object, str]) -> list:
        name = eqn.primitive.name
        called = called_jaxpr(eqn)
        if called is not None:
            sub, consts = called
            inner = {v: names[o] for o, v in zip(eqn.invars, sub.invars)
                     if not isinstance(o, core.Literal) and o in names}
            return self.run(sub, consts, ins, inner)
        if name in ("dot_general", "conv_general_dilated"):
            self._record(eqn, ins, names)
        if name in _SAME_ON_INDICATORS:
            out = eqn.primitive.bind(*[jnp.asarray(x, jnp.float32) for x in ins], **eqn.params)
            outs = out if eqn.primitive.multiple_results else [out]
            return [jnp.asarray(o > 0, jnp.float32) for o in outs]
        if name == "mul":
            return [ins[0] * ins[1]]
        if name == "div":
            return [jnp.broadcast_to(ins[0], var_shape(eqn.outvars[0]))]
        if name in _EITHER or name == "select_n":
            cases = ins[1:] if name == "select_n" else ins
            return [jnp.broadcast_to(jnp.max(jnp.stack(jnp.broadcast_arrays(*cases)), 0),
                                     var_shape(eqn.outvars[0]))]
        if name in _OPERAND_ZERO_KEPT or (name in UNARY and _maps_zero_to_zero(eqn)):
            return [ins[0]]
        if name == "reduce_min":
            return [jnp.max(ins[0], axis=eqn.params["axes"])]
        return [jnp.ones(var_shape(var), jnp.float32) for var in eqn.outvars]

    def _record(self, eqn, ins: list, names: Mapping[object, str]) -> None:
        """For each parameter operand, which rows along a summed axis meet a nonzero entry of
        the other operand."""
        for pair in contracted(eqn):
            for side in (0, 1):
                kernel = eqn.invars[1 - side]
                if isinstance(kernel, core.Literal) or kernel not in names:
                    continue
                other = ins[side] > 0
                axes = tuple(d for d in range(other.ndim) if d != pair[side])
                met = jnp.any(other, axis=axes)
                key = (names[kernel], pair[1 - side])
                self.rows[key] = self.rows[key] | met if key in self.rows else met


def _indicator(value) -> jax.Array:
    """1 where ``value`` is not 0; 1 everywhere for values that are no numbers (PRNG keys)."""
    value = jnp.asarray(value)
    if not (jnp.issubdtype(value.dtype, jnp.number) or value.dtype == jnp.bool_):
        return jnp.ones(value.shape, jnp.float32)
    return jnp.asarray(value != 0, jnp.float32)


def _call(model: nnx.Module, x: jax.Array) -> jax.Array:
    return model(x)


def zero_rows(
    model: nnx.Module,
    example_input: jax.Array | jax.ShapeDtypeStruct,
    apply: Callable[[nnx.Module, jax.Array], jax.Array] = _call,
) -> Rows:
    """For every parameter that a product reads along a summed axis, True for each of its rows
    that meets a value other than zero for some input, in ``model``'s evaluation forward pass
    ``apply(model, x)`` with its current parameters (see the module docstring); a row marked
    False only ever multiplies zeros."""
    x = jax.ShapeDtypeStruct((1, *example_input.shape[1:]), example_input.dtype)
    closed, keyed, _ = forward_jaxpr(evaluation_copy(model), x, apply)
    jaxpr, consts = opened(closed)
    leaves = [leaf for _, leaf in keyed]
    paths = [dotted_path(path) for path, _ in keyed]

    @jax.jit
    def met(indicators: list[jax.Array]) -> dict[tuple[str, int], jax.Array]:
        run = _Indicators()
        run.run(jaxpr, consts, indicators, dict(zip(jaxpr.invars, paths)))
        return run.rows

    rows = met([*(_indicator(v) for v in leaves), jnp.ones(x.shape, jnp.float32)])
    return {key: np.asarray(value) for key, value in rows.items()}
