"""Gates drawn per example on a plain NNX module (Dep-L0 on a traced model).

A gate shared by the batch acts on its unit's consumers by scaling their kernel rows
(:func:`~sparsejax.structure.sparsify.parameters_gated`). A gate drawn per example cannot scale
parameters the batch shares, but scaling row ``i`` of a kernel for example ``b`` is scaling
that example's input unit ``i``:

    y_b = x_b (diag(z_b) W) = (x_b * z_b) W

(for a convolution, the input channel at every position). :func:`run_with_example_gates`
therefore evaluates the jaxpr of ``module(x)`` equation by equation and multiplies the
activation operand of every ``dot_general`` and ``conv_general_dilated`` whose kernel is a
gated parameter, along the dimension the kernel's gated axis contracts with, by the example's
gate values. The kernel is recognised through casts and copies; plain calls (``jit``,
``remat``) are evaluated inline, other calls (custom derivatives) are bound as they are. The
module's state that is not a parameter (BatchNorm statistics) is updated as ``module(x)``
would update it.

Gates that cannot be placed this way are refused with a
:class:`~sparsejax.errors.ConfigError`: a gated axis that a product does not contract (the
units of attention's queries and keys, gated on their projection's outputs), a grouped
convolution read through its gated input axis, an activation whose first dimension is not the
examples, or a gated parameter the evaluation never met as a kernel (read inside a call with
its own derivative rule, or through a reshape).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core

from sparsejax.errors import ConfigError
from sparsejax.structure.slim_trace.interpret import opened
from sparsejax.structure.sparsify import GatedSlice
from sparsejax.structure.trace.analyze import dotted_path
from sparsejax.structure.trace.walk import SUB_JAXPR_PARAMS

INLINED_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "remat2",
                           "checkpoint"})
"""Calls evaluated equation by equation (their kernels are gated like the caller's)."""
ALIASES = frozenset({"convert_element_type", "copy", "copy_p"})
"""Primitives whose output is their operand, as far as which parameter it is goes."""
PRODUCTS = frozenset({"dot_general", "conv_general_dilated"})
"""Primitives whose kernel operand's rows a gate scales."""
SHARED_GATES = "use batch-shared gates (set config.per_example_gates=False where the method has it)"
"""How to get around a gate that cannot be drawn per example."""


def example_factors(s: GatedSlice, z: jax.Array, size: int) -> jax.Array:
    """``(batch, size)`` factors of an activation dimension of ``size`` read by the kernel axis
    of ``s``: ``z[:, units[k]]`` at index ``indices[k]``, 1 elsewhere."""
    factors = jnp.ones((z.shape[0], size), z.dtype)
    return factors.at[:, np.asarray(s.indices)].set(z[:, np.asarray(s.units)])


def _read_dimension(eqn, kernel_operand: int, axis: int) -> tuple[int, int]:
    """(the activation's dimension that the kernel's ``axis`` contracts with, the activation's
    example dimension) of the product ``eqn``."""
    what = f"{eqn.primitive.name} reading a gated kernel"
    if eqn.primitive.name == "conv_general_dilated":
        lhs_spec, rhs_spec, _ = eqn.params["dimension_numbers"]
        if axis != rhs_spec[1] or eqn.params["feature_group_count"] != 1:
            raise ConfigError(
                f"per-example gates: a {what} along axis {axis} (not the input channels of an "
                f"ungrouped convolution) cannot be gated per example; {SHARED_GATES}"
            )
        return lhs_spec[1], lhs_spec[0]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    kernel_contracted, other_contracted = (rc, lc) if kernel_operand == 1 else (lc, rc)
    other_batch = lb if kernel_operand == 1 else rb
    if axis not in kernel_contracted:
        raise ConfigError(
            f"per-example gates: units gated on a kernel's output axis {axis} (e.g. attention's "
            f"query and key dimensions, which no kernel reads) cannot be gated per example; "
            f"{SHARED_GATES}"
        )
    dim = other_contracted[list(kernel_contracted).index(axis)]
    if 0 in tuple(other_contracted) + tuple(other_batch):
        raise ConfigError(
            f"per-example gates: a {what} contracts the first dimension of its activation, so "
            f"the examples are not its first dimension; {SHARED_GATES}"
        )
    return dim, 0


class _Evaluation:
    """One evaluation of a jaxpr with the per-example gates of ``gated`` (parameter path ->
    its slices and their ``(batch, units)`` gate values); ``applied`` collects the gated
    parameters met as kernels."""

    def __init__(self, gated: Mapping[str, Sequence[tuple[GatedSlice, jax.Array]]]):
        self.gated = gated
        self.applied: set[str] = set()

    def run(self, jaxpr, consts: Sequence, args: Sequence, kernels: dict) -> list:
        """The outputs of ``jaxpr`` on ``args``; ``kernels`` maps its variables that are
        parameters to their paths."""
        env: dict = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))

        def read(var):
            return var.val if isinstance(var, core.Literal) else env[var]

        def path_of(var) -> str | None:
            return None if isinstance(var, core.Literal) else kernels.get(var)

        for eqn in jaxpr.eqns:
            ins = [read(var) for var in eqn.invars]
            name = eqn.primitive.name
            called = _inlined(eqn)
            if called is not None:
                sub, sub_consts = called
                inner = {s: path_of(v) for v, s in zip(eqn.invars, sub.invars) if path_of(v)}
                outs = self.run(sub, sub_consts, ins, inner)
            else:
                if name in PRODUCTS:
                    ins = self._gate_inputs(eqn, ins, [path_of(v) for v in eqn.invars])
                out = _bind(eqn, ins)
                outs = list(out) if eqn.primitive.multiple_results else [out]
                if name in ALIASES and path_of(eqn.invars[0]):
                    kernels[eqn.outvars[0]] = path_of(eqn.invars[0])
            env.update(zip(eqn.outvars, outs))
        return [read(var) for var in jaxpr.outvars]

    def _gate_inputs(self, eqn, ins: list, paths: list[str | None]) -> list:
        for operand, path in enumerate(paths[:2]):
            if path not in self.gated:
                continue
            other = 1 - operand
            for s, z in self.gated[path]:
                dim, examples = _read_dimension(eqn, operand, s.axis)
                x = ins[other]
                if x.shape[examples] != z.shape[0]:
                    raise ConfigError(
                        f"per-example gates: {path} reads an activation of shape {x.shape}, "
                        f"whose first dimension is not the {z.shape[0]} examples; {SHARED_GATES}"
                    )
                factors = example_factors(s, z, x.shape[dim])
                shape = [1] * x.ndim
                shape[examples], shape[dim] = x.shape[examples], x.shape[dim]
                ins[other] = x * factors.reshape(shape).astype(x.dtype)
            self.applied.add(path)
        return ins


def _bind(eqn, ins: Sequence) -> object:
    """The primitive of ``eqn`` applied to ``ins`` with its parameters (``get_bind_params``
    gives the parameters, or ``(sub-functions, parameters)`` in older jax versions)."""
    bound = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    return eqn.primitive.bind(*subfuns, *ins, **params)


def _inlined(eqn) -> tuple[object, tuple] | None:
    """The jaxpr and constants of a plain call, evaluated inline."""
    if eqn.primitive.name not in INLINED_CALLS:
        return None
    for name in SUB_JAXPR_PARAMS:
        if eqn.params.get(name) is not None:
            return opened(eqn.params[name])
    return None


def run_with_example_gates(
    module: nnx.Module, x: jax.Array, gated: Sequence[tuple[GatedSlice, jax.Array]]
) -> jax.Array:
    """``module(x)`` with every slice of ``gated`` (input-axis slices of kernels, gate values of
    shape ``(batch, units)``) applied to the example's activations (module docstring), and the
    module's non-parameter state updated.

    Raises:
      ConfigError: for a gate that cannot be applied per example (module docstring).
    """
    by_path: dict[str, list[tuple[GatedSlice, jax.Array]]] = {}
    for s, z in gated:
        by_path.setdefault(s.path, []).append((s, z))
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    param_keyed, param_def = jax.tree_util.tree_flatten_with_path(params)
    rest_leaves, rest_def = jax.tree_util.tree_flatten(rest)

    def forward(param_leaves, rest_leaves, x):
        model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(param_def, param_leaves),
                          jax.tree_util.tree_unflatten(rest_def, rest_leaves))
        logits = model(x)
        return logits, jax.tree_util.tree_leaves(nnx.state(model, nnx.Not(nnx.Param)))

    param_leaves = [leaf for _, leaf in param_keyed]
    closed = jax.make_jaxpr(forward)(param_leaves, rest_leaves, x)
    jaxpr, consts = opened(closed)
    kernels = {
        var: dotted_path(path) for var, (path, _) in zip(jaxpr.invars, param_keyed)
    }
    evaluation = _Evaluation(by_path)
    outs = evaluation.run(jaxpr, consts, [*param_leaves, *rest_leaves, x], kernels)
    missed = sorted(set(by_path) - evaluation.applied)
    if missed:
        raise ConfigError(
            f"per-example gates: {missed} were not met as the kernel of a product (read through "
            f"a reshape, or inside a function with its own derivative rule); {SHARED_GATES}"
        )
    nnx.update(module, jax.tree_util.tree_unflatten(rest_def, outs[1:]))
    return outs[0]
