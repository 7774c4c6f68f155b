"""Gates drawn per example on a plain NNX module (Dep-L0 on a traced model), and sums over a
stream's open units.

A gate shared by the batch acts on its unit's consumers by scaling their kernel rows
(:func:`~sparsejax.structure.sparsify.parameters_gated`). A gate drawn per example cannot scale
parameters the batch shares, but scaling row ``i`` of a kernel for example ``b`` is scaling
that example's input unit ``i``:

    y_b = x_b (diag(z_b) W) = (x_b * z_b) W

(for a convolution, the input channel at every position), and scaling output column ``j`` of
a kernel and its bias is scaling that example's output unit ``j`` (a unit no kernel reads, such
as a query/key dimension of attention, is gated where it is produced):

    y_b = (x_b W + c) diag(z_b) = (x_b W) diag(z_b) + c diag(z_b).

:func:`run_with_example_gates` therefore evaluates the jaxpr of ``module(x)`` equation by
equation: a ``dot_general`` or ``conv_general_dilated`` whose kernel is a gated parameter gets
its activation operand (gated input axis) or its result (gated output axis) multiplied by the
example's gate values along the matching dimension, and a gated bias is multiplied where it is
added (or, for a normaliser's bias whose output the gates scale, the sum is). Parameters are
followed through casts, copies, broadcasts and reshapes that only add or drop size-1 dimensions;
plain calls (``jit``, ``remat``) are evaluated inline, other calls (custom derivatives, such as
``relu``'s) are bound as they are. The module's state that is not a parameter (BatchNorm
statistics) is updated as ``module(x)`` would update it. The jaxpr is traced with its
convolutions on the whole batch (:func:`~sparsejax.models.batch_chunks.whole_batch`), so that
every one sees the examples, and a plain one is then run, gates applied, on slices of the batch
as the model's own layers run on a CPU (:func:`~sparsejax.models.batch_chunks.convolve`).

Streams. A residual stream gated with the normalisers that read it (a transformer's hidden
dimension) needs its normalisers' statistics over its open units: the same evaluation, given
the stream's open mask (shared or per example), walks the jaxpr with the structure analysis
and takes every ``reduce_sum`` over the stream's units as ``sum(x * m) * d / n`` (the mean
that follows divides by ``d``), whatever module computes it (:class:`_Streams`). A parameter
concatenated to activations (a class token written into the stream) is gated per example
where it is concatenated, and a table looked up into the stream that a kernel of the stream
also reads (a tied embedding) has the rows it gathers scaled, shared or per example.

Gates that cannot be placed this way are refused with a
:class:`~sparsejax.errors.ConfigError`: a grouped convolution's gated axis, an activation whose
first dimension is not the examples, a gated parameter reshaped before use, or one the
evaluation never met where it acts (read inside a call with its own derivative rule), so that
no gate is silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core

from sparsejax.errors import ConfigError
from sparsejax.models.batch_chunks import convolve, whole_batch
from sparsejax.models.column_gradient import DIMENSIONS
from sparsejax.structure.slim_trace.interpret import opened
from sparsejax.structure.sparsify import GatedSlice, slice_factors
from sparsejax.structure.trace.analyze import dotted_path, walk_state_function
from sparsejax.structure.trace.rules import gather_slices
from sparsejax.structure.trace.units import NO_UNIT, UnitTable
from sparsejax.structure.trace.values import Frame
from sparsejax.structure.trace.walk import SUB_JAXPR_PARAMS, sub_jaxpr

INLINED_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "remat2",
                           "checkpoint"})
"""Calls evaluated equation by equation (their kernels are gated like the caller's)."""
ALIASES = frozenset({"convert_element_type", "copy", "copy_p"})
"""Primitives whose output is their operand, as far as which parameter it is goes."""
PRODUCTS = frozenset({"dot_general", "conv_general_dilated"})
"""Primitives whose kernel operand's rows a gate scales."""
SHARED_GATES = "use batch-shared gates (set config.per_example_gates=False where the method has it)"
"""How to get around a gate that cannot be drawn per example."""


Stream = tuple[tuple[str, int], jax.Array]
"""A residual stream whose sums run over its open units: the ``(kernel path, axis)`` of its
first producer, and its open mask, ``(units,)`` or per example ``(batch, units)``."""

Tracked = tuple[str, tuple[int | None, ...]]
"""A variable that is a gated parameter: its path, and the variable's dimension that holds each
axis of the parameter (None where a reshape dropped a size-1 axis)."""


def _scaled(x: jax.Array, factors: jax.Array, examples: int, dim: int) -> jax.Array:
    """``x`` times ``(batch, size)`` factors placed on its dimensions ``examples`` and ``dim``
    (a size-1 example dimension broadcasts to the batch)."""
    shape = [1] * x.ndim
    shape[examples], shape[dim] = factors.shape
    return x * factors.reshape(shape).astype(x.dtype)


def _followed(eqn, dims: tuple[int | None, ...]) -> tuple[int | None, ...] | None:
    """Where the parameter axes ``dims`` of a gated parameter's variable sit in the output of
    ``eqn``: through casts and copies, broadcasts, transpositions, and reshapes that only add or
    drop size-1 dimensions; None for any other equation."""
    name = eqn.primitive.name
    if name in ALIASES:
        return dims
    if name == "broadcast_in_dim":
        mapping = eqn.params["broadcast_dimensions"]
        return tuple(None if d is None else mapping[d] for d in dims)
    if name == "transpose":
        order = list(eqn.params["permutation"])
        return tuple(None if d is None else order.index(d) for d in dims)
    if name == "reshape" and eqn.params.get("dimensions") is None:
        old, new = eqn.invars[0].aval.shape, eqn.params["new_sizes"]
        old_sized = [i for i, size in enumerate(old) if size != 1]
        new_sized = [i for i, size in enumerate(new) if size != 1]
        if [old[i] for i in old_sized] == [new[i] for i in new_sized]:
            where = dict(zip(old_sized, new_sized))
            return tuple(None if d is None else where.get(d) for d in dims)
    return None


def _product_dimension(eqn, kernel_operand: int, axis: int) -> tuple[str, int, int]:
    """Where a gate on the kernel operand's dimension ``axis`` of the product ``eqn`` acts:
    ``("input", dimension, example dimension)`` of the other operand when the product contracts
    ``axis`` (the gate scales what the kernel reads), ``("output", dimension, example
    dimension)`` of the result when ``axis`` is an output axis (a unit no kernel reads, such as
    a query/key dimension of attention, gated where it is produced)."""
    what = f"{eqn.primitive.name} reading a gated kernel"
    if eqn.primitive.name == "conv_general_dilated":
        lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
        if eqn.params["feature_group_count"] == 1 and axis == rhs_spec[1]:
            return "input", lhs_spec[1], lhs_spec[0]
        if eqn.params["batch_group_count"] == 1 and axis == rhs_spec[0]:
            return "output", out_spec[1], out_spec[0]
        raise ConfigError(
            f"per-example gates: a {what} along axis {axis} (not the input channels of an "
            f"ungrouped convolution, nor its output channels) cannot be gated per example; "
            f"{SHARED_GATES}"
        )
    lhs_ndim, rhs_ndim = (len(v.aval.shape) for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contracted = {0: tuple(lc), 1: tuple(rc)}
    batched = {0: tuple(lb), 1: tuple(rb)}
    other = 1 - kernel_operand
    if 0 in contracted[other] + batched[other]:
        raise ConfigError(
            f"per-example gates: a {what} contracts the first dimension of its activation, so "
            f"the examples are not its first dimension; {SHARED_GATES}"
        )
    if axis in contracted[kernel_operand]:
        return "input", contracted[other][contracted[kernel_operand].index(axis)], 0
    free = {
        side: [d for d in range(ndim) if d not in contracted[side] + batched[side]]
        for side, ndim in ((0, lhs_ndim), (1, rhs_ndim))
    }
    position = {(side, d): len(lb) + side * len(free[0]) + k
                for side in (0, 1) for k, d in enumerate(free[side])}
    if (kernel_operand, axis) not in position:
        raise ConfigError(f"per-example gates: a {what} along its batch axis {axis}; "
                          f"{SHARED_GATES}")
    return "output", position[(kernel_operand, axis)], position[(other, 0)]


class _Streams:
    """The streams of one evaluation, found on the walk of its jaxpr: a sum over a stream's
    units is a mean over its open units (CoFi's LayerNorm over the kept hidden dimensions, Xia
    et al. 2022): ``sum(x * m) * d / n`` along each such dimension, for the open mask ``m`` of
    ``n`` of its ``d`` units, so that a normaliser's mean and mean square are those of the
    network without the closed units."""

    def __init__(self, units: UnitTable, streams: Sequence[Stream]):
        self.units = units
        self.masks = []
        seeds = {(seed.path, seed.axis): ids for seed, ids in zip(units.seeds, units.seed_ids)}
        for producer, mask in streams:
            if producer not in seeds:
                raise ConfigError(f"stream gates: the forward pass reads no {producer[0]}")
            where = {units.find(int(u)): k for k, u in enumerate(seeds[producer].tolist())}
            self.masks.append((where, mask))

    def _placed(self, ids: np.ndarray) -> tuple[np.ndarray, jax.Array] | None:
        """The stream unit at each position of a dimension of unit ``ids`` and its stream's
        mask, when they are one stream's units; None when none is."""
        roots = [self.units.find(int(u)) if u != NO_UNIT else NO_UNIT for u in ids.tolist()]
        for where, mask in self.masks:
            found = [where.get(root) for root in roots]
            if all(k is not None for k in found):
                return np.asarray(found), mask
            if any(k is not None for k in found):
                raise ConfigError("stream gates: a sum runs over a stream's units and others; "
                                  "only sums over the stream alone can skip its closed units")
        return None

    def _stream_dims(self, eqn, frame: Frame) -> list[tuple[int, np.ndarray, jax.Array]]:
        """``(dimension, stream unit per position, mask)`` of each reduced dimension of
        ``eqn``'s operand that holds a stream."""
        value = frame.env.get(eqn.invars[0])
        found = []
        for field in () if value is None else value.fields:
            reduced = set(field.dims) & set(eqn.params["axes"])
            if not reduced:
                continue
            placed = self._placed(np.ravel(field.ids))
            if placed is None:
                continue
            if len(field.dims) > 1:
                raise ConfigError("stream gates: a sum runs over a stream's units joined with "
                                  "another dimension; sum over the stream's units alone")
            found.append((field.dims[0], *placed))
        return found

    def reduce(self, eqn, x: jax.Array, frame: Frame) -> jax.Array | None:
        """The sum of ``eqn`` (a ``reduce_sum``) over the open units of the streams it reduces,
        scaled to their full width; None when it reduces no stream."""
        found = self._stream_dims(eqn, frame)
        if not found:
            return None
        axes = tuple(eqn.params["axes"])
        scale = 1.0
        for dim, order, mask in found:
            factors = mask[..., order]
            if factors.ndim == 2:
                x = _scaled(x, factors, 0, dim)
                count = jnp.sum(factors, axis=-1)
                count = count.reshape(-1, *([1] * (x.ndim - len(axes) - 1)))
            else:
                shape = [1] * x.ndim
                shape[dim] = -1
                x = x * factors.reshape(shape).astype(x.dtype)
                count = jnp.sum(factors)
            scale = scale * len(order) / jnp.maximum(count, 1)
        return (jnp.sum(x, axis=axes) * scale).astype(x.dtype)

    def refuse_inside(self, eqn, frame: Frame) -> None:
        """Refuse a stream sum inside a call that is run as it is (a custom derivative rule),
        where it cannot be rewritten."""
        sub = sub_jaxpr(eqn) if eqn.primitive.name != "scan" else eqn.params["jaxpr"].jaxpr
        children = iter(frame.children)
        for inner in sub.eqns:
            walked = sub_jaxpr(inner) is not None or inner.primitive.name == "scan"
            child = next(children) if walked else None
            if child is not None:
                self.refuse_inside(inner, child)
            elif inner.primitive.name == "reduce_sum" and self._stream_dims(inner, frame):
                raise ConfigError(
                    f"stream gates: a sum over a stream's units inside {eqn.primitive.name} "
                    "(a function with its own derivative rule, or a loop) cannot skip its "
                    "closed units; compute the normaliser's statistics outside it"
                )


class _Evaluation:
    """One evaluation of a jaxpr with the per-example gates of ``gated`` (parameter path ->
    its slices and their ``(batch, units)`` gate values); ``biases`` are the gated paths that
    are added to a product's output rather than read as its kernel; ``applied`` collects the
    gated parameters met where they act."""

    def __init__(
        self,
        gated: Mapping[str, Sequence[tuple[GatedSlice, jax.Array]]],
        biases: set[str],
        sums: set[str],
        streams: _Streams | None = None,
        lookups: Mapping[str, Sequence[tuple[GatedSlice, jax.Array]]] | None = None,
    ):
        self.gated = gated
        self.biases = biases
        self.sums = sums
        self.streams = streams
        self.lookups = lookups or {}
        self.applied: set[str] = set()

    def run(
        self, jaxpr, consts: Sequence, args: Sequence, tracked: dict, frame: Frame | None = None
    ) -> list:
        """The outputs of ``jaxpr`` on ``args``; ``tracked`` maps its variables that are gated
        parameters to where their axes are (:data:`Tracked`); ``frame`` is the walk of this
        call of ``jaxpr`` (the fields of its variables), where streams are given."""
        env: dict = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        children = iter(frame.children) if frame is not None else None

        def read(var):
            return var.val if isinstance(var, core.Literal) else env[var]

        def tracking(var) -> Tracked | None:
            return None if isinstance(var, core.Literal) else tracked.get(var)

        for eqn in jaxpr.eqns:
            ins = [read(var) for var in eqn.invars]
            operands = [tracking(var) for var in eqn.invars]
            walked = sub_jaxpr(eqn) is not None or eqn.primitive.name == "scan"
            child = next(children) if children is not None and walked else None
            called = _inlined(eqn)
            if called is not None:
                sub, sub_consts = called
                inner = {s: t for s, t in zip(sub.invars, operands) if t is not None}
                outs = self.run(sub, sub_consts, ins, inner, child)
            else:
                if child is not None:
                    self.streams.refuse_inside(eqn, child)
                outs = self._evaluate(eqn, ins, operands, frame)
                if operands and operands[0] is not None:
                    dims = _followed(eqn, operands[0][1])
                    if dims is not None:
                        tracked[eqn.outvars[0]] = (operands[0][0], dims)
            env.update(zip(eqn.outvars, outs))
        return [read(var) for var in jaxpr.outvars]

    def _evaluate(
        self, eqn, ins: list, operands: list[Tracked | None], frame: Frame | None
    ) -> list:
        """The outputs of ``eqn``, with the gates of a gated kernel on what it reads or on the
        product's output, those of a gated bias on the bias where it is added (or
        concatenated), and a sum over a stream's units taken over its open units."""
        name = eqn.primitive.name
        if name == "reduce_sum" and frame is not None:
            reduced = self.streams.reduce(eqn, ins[0], frame)
            if reduced is not None:
                return [reduced]
        if name == "gather" and operands[0] is not None and operands[0][0] in self.lookups:
            return [self._looked_up(eqn, ins, operands[0])]
        outputs = []
        for operand, tracked in enumerate(operands if name == "concatenate" else operands[:2]):
            if tracked is None or tracked[0] not in self.gated:
                continue
            path, dims = tracked
            is_bias = path in self.biases or path in self.sums
            if name not in (("add", "add_any", "concatenate") if is_bias else PRODUCTS):
                continue
            for s, z in self.gated[path]:
                dim = dims[s.axis]
                if dim is None:
                    raise ConfigError(f"per-example gates: {path} is reshaped before it is used; "
                                      f"{SHARED_GATES}")
                if is_bias:
                    side = "output" if path in self.sums else "bias"
                    examples, x = 0, ins[operand]
                else:
                    side, dim, examples = _product_dimension(eqn, operand, dim)
                    x = ins[1 - operand]
                if dim == examples:
                    raise ConfigError(f"per-example gates: {path} is gated along the examples' "
                                      f"dimension; {SHARED_GATES}")
                if side == "output":
                    outputs.append((s, z, dim, examples))
                    continue
                if x.shape[examples] not in ((1, z.shape[0]) if is_bias else (z.shape[0],)):
                    raise ConfigError(
                        f"per-example gates: {path} meets an activation of shape {x.shape}, "
                        f"whose first dimension is not the {z.shape[0]} examples; {SHARED_GATES}"
                    )
                scaled = _scaled(x, slice_factors(s, z, x.shape[dim]), examples, dim)
                ins[operand if is_bias else 1 - operand] = scaled
            self.applied.add(path)
        out = _split_convolution(eqn, ins) if name == "conv_general_dilated" else None
        out = _bind(eqn, ins) if out is None else out
        outs = list(out) if eqn.primitive.multiple_results else [out]
        for s, z, dim, examples in outputs:
            outs[0] = _scaled(outs[0], slice_factors(s, z, outs[0].shape[dim]), examples, dim)
        return outs


    def _looked_up(self, eqn, ins: list, tracked: Tracked) -> jax.Array:
        """The rows of a stream's reader gathered into the stream (a tied embedding table's
        lookup), times the stream's gates along the features they carry."""
        path, dims = tracked
        out = _bind(eqn, ins)
        features = gather_slices(eqn)
        for s, z in self.lookups[path]:
            dim = features.get(dims[s.axis])
            if dim is None:
                raise ConfigError(f"stream gates: the lookup of {path} picks positions along its "
                                  "features; look rows up whole")
            factors = slice_factors(s, z, out.shape[dim])
            if factors.ndim == 2:
                out = _scaled(out, factors, 0, dim)
            else:
                shape = [1] * out.ndim
                shape[dim] = -1
                out = out * factors.reshape(shape).astype(out.dtype)
        self.applied.add(path)
        return out


def _split_convolution(eqn, ins: Sequence) -> jax.Array | None:
    """A plain NHWC / HWIO convolution (no dilation, batch groups or precision options) run as
    the model's layers run it, on slices of the batch on a CPU
    (:func:`~sparsejax.models.batch_chunks.convolve`); None for any other."""
    params = eqn.params
    x, kernel = ins
    plain = (
        all(d == 1 for d in (*params["lhs_dilation"], *params["rhs_dilation"]))
        and params["batch_group_count"] == 1
        and params.get("precision") is None
        and params.get("preferred_element_type") is None
        and params["dimension_numbers"]
        == jax.lax.conv_dimension_numbers(x.shape, kernel.shape, DIMENSIONS)
    )
    if not plain:
        return None
    return convolve(
        x, kernel, window_strides=tuple(params["window_strides"]),
        padding=tuple(tuple(pair) for pair in params["padding"]), dimension_numbers=DIMENSIONS,
        feature_group_count=params["feature_group_count"],
    )


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
    module: nnx.Module,
    x: jax.Array,
    gated: Sequence[tuple[GatedSlice, jax.Array]],
    biases: set[str] = frozenset(),
    sums: set[str] = frozenset(),
    streams: Sequence[Stream] = (),
    lookups: Sequence[tuple[GatedSlice, jax.Array]] = (),
) -> jax.Array:
    """``module(x)`` with every slice of ``gated`` (gate values of shape ``(batch, units)``)
    applied to each example (module docstring), and the module's non-parameter state updated;
    ``biases`` are the paths of the gated parameters that are biases (added to a product's
    output, or concatenated to an activation: a class token) rather than kernels, ``sums``
    those of gated biases whose whole sum the gates scale (a normaliser's bias: its output
    gated). Every sum over the units of one of ``streams`` runs over its open units
    (:class:`_Streams`). ``lookups`` are slices of parameters whose gathered rows the gates
    scale (shared ``(units,)`` or per example), where the rest of the forward pass reads the
    parameter ungated: a tied embedding table, looked up into a stream and read by its head.

    Raises:
      ConfigError: for a gate that cannot be applied per example (module docstring).
    """
    by_path: dict[str, list[tuple[GatedSlice, jax.Array]]] = {}
    for s, z in gated:
        by_path.setdefault(s.path, []).append((s, z))
    looked_up: dict[str, list[tuple[GatedSlice, jax.Array]]] = {}
    for s, z in lookups:
        looked_up.setdefault(s.path, []).append((s, z))
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    param_keyed, param_def = jax.tree_util.tree_flatten_with_path(params)
    rest_leaves, rest_def = jax.tree_util.tree_flatten(rest)

    def forward(param_leaves, rest_leaves, x):
        model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(param_def, param_leaves),
                          jax.tree_util.tree_unflatten(rest_def, rest_leaves))
        logits = model(x)
        return logits, jax.tree_util.tree_leaves(nnx.state(model, nnx.Not(nnx.Param)))

    param_leaves = [leaf for _, leaf in param_keyed]
    with whole_batch():  # a convolution split along the batch would hide the examples
        closed = jax.make_jaxpr(forward)(param_leaves, rest_leaves, x)
    jaxpr, consts = opened(closed)
    tracked = {}
    for var, (path, leaf) in zip(jaxpr.invars, param_keyed):
        if dotted_path(path) in by_path or dotted_path(path) in looked_up:
            tracked[var] = (dotted_path(path), tuple(range(jnp.ndim(leaf))))
    frame, walked = None, None
    if streams:
        named = [(dotted_path(path), leaf) for path, leaf in param_keyed]
        named += [(f"state{k}", leaf) for k, leaf in enumerate(rest_leaves)]
        ctx, _ = walk_state_function(jaxpr, named, {})
        frame, walked = ctx.root, _Streams(ctx.units, streams)
    evaluation = _Evaluation(by_path, set(biases), set(sums), walked, looked_up)
    outs = evaluation.run(jaxpr, consts, [*param_leaves, *rest_leaves, x], tracked, frame)
    missed = sorted((set(by_path) | set(looked_up)) - evaluation.applied)
    if missed:
        raise ConfigError(
            f"per-example gates: {missed} were not met where they act (a kernel read through a "
            f"reshape, or inside a function with its own derivative rule); {SHARED_GATES}"
        )
    nnx.update(module, jax.tree_util.tree_unflatten(rest_def, outs[1:]))
    return outs[0]
