"""Tracing a Flax NNX model and finding its prunable unit groups."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.batch_chunks import whole_batch
from sparsejax.structure.trace.result import TracedStructure
from sparsejax.structure.trace.units import OUTPUT_BLOCKER, Seed, make_field
from sparsejax.structure.trace.values import UNLABELLED, Context, Frame, Value
from sparsejax.structure.trace.walk import walk

Apply = Callable[[nnx.Module, jax.Array], jax.Array]
"""A model's forward pass on an input batch, ``apply(model, x)``."""


def call_model(model: nnx.Module, x: jax.Array) -> jax.Array:
    """The default :data:`Apply`: ``model(x)``."""
    return model(x)


def dotted_path(path: tuple) -> str:
    """``"blocks.0.conv1.kernel"`` from a state path, or from a pytree key path ending in the
    variable's ``value``."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey):
        path = path[:-1]
    parts = (getattr(key, "key", getattr(key, "idx", key)) for key in path)
    return ".".join(str(part) for part in parts)


@dataclasses.dataclass(frozen=True)
class TracedProgram:
    """A traced forward pass with what the analysis found: ``jaxpr`` (closed; its inputs are the
    state leaves named ``paths``, in order, then the input; its outputs the leaves of
    ``out_tree``), the :class:`Frame` of its walk (every variable's fields), and the
    :class:`TracedStructure` read off them."""

    structure: TracedStructure
    jaxpr: object
    frame: Frame
    paths: tuple[str, ...]
    out_tree: jax.tree_util.PyTreeDef


def trace_structure(
    model: nnx.Module,
    example_input: jax.Array | jax.ShapeDtypeStruct,
    *,
    apply: Apply = call_model,
) -> TracedStructure:
    """The prunable unit groups of ``model`` and its costs, from the jaxpr of its forward pass.

    ``apply(model, x)`` runs the forward pass (default ``model(x)``; pass e.g.
    ``lambda m, x: m(x, train=False)`` to choose a mode). Only shapes are used, nothing runs:
    ``model`` may be abstract (``nnx.eval_shape``). Every floating-point state array is an input
    of the traced function and each of its dimensions a run of units; the rules of :mod:`.rules`
    merge the units that must be removed together, and groups form around the output axes of the
    kernels of convolutions and matrix products. Units that reach the model's output, and units
    touched by a primitive without a rule, are blocked (the group reports which operation, and
    where). FLOPs are per example: the traced total divided by the leading dimension of
    ``example_input``.
    """
    return trace_program(model, example_input, apply=apply).structure


def forward_jaxpr(
    model: nnx.Module,
    example_input: jax.Array | jax.ShapeDtypeStruct,
    apply: Apply = call_model,
) -> tuple[object, list[tuple[tuple, jax.Array]], object]:
    """The closed jaxpr of ``apply(model, x)`` as a function of the model's state arrays (in
    state order) and ``x`` of ``example_input``'s shape, convolutions on the whole batch; with
    each array's state path (:func:`dotted_path` names it) and the output's shape tree."""
    graphdef, state = nnx.split(model)
    keyed, treedef = jax.tree_util.tree_flatten_with_path(state)

    def forward(arrays: list[jax.Array], x: jax.Array) -> jax.Array:
        return apply(nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, arrays)), x)

    x = jax.ShapeDtypeStruct(example_input.shape, example_input.dtype)
    with whole_batch():
        closed, out_shape = jax.make_jaxpr(forward, return_shape=True)(
            [leaf for _, leaf in keyed], x
        )
    return closed, keyed, out_shape


def walk_state_function(
    jaxpr, named: Sequence[tuple[str, jax.Array]], is_param: Mapping[str, bool]
) -> tuple[Context, list[Value]]:
    """The walk of ``jaxpr``, a function of the state arrays ``named`` (dotted path, array), in
    order, then of a model input: every dimension of a floating state array a run of fresh
    units (the parameters' ids recorded, by ``is_param``); the context and the outputs'
    values."""
    ctx = Context()
    inputs, param_ids = [], {}
    for name, leaf in named:
        shape = tuple(leaf.shape)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            inputs.append(UNLABELLED)
            continue
        ids = [ctx.units.new_units(Seed(name, axis, size)) if size > 1 else size
               for axis, size in enumerate(shape)]
        fields = tuple(
            make_field((axis,), i) for axis, i in enumerate(ids) if not isinstance(i, int)
        )
        inputs.append(Value(fields, param=name, sources=frozenset({name})))
        if is_param.get(name, False):
            param_ids[name] = tuple(ids)
    ctx.param_ids = param_ids
    outs = walk(ctx, jaxpr, [*inputs, UNLABELLED])
    return ctx, outs


def trace_program(
    model: nnx.Module,
    example_input: jax.Array | jax.ShapeDtypeStruct,
    *,
    apply: Apply = call_model,
) -> TracedProgram:
    """:func:`trace_structure`, keeping the jaxpr and the fields of all its variables (what
    slimming needs to run the jaxpr with fewer units)."""
    is_param = {dotted_path(path): isinstance(v, nnx.Param)
                for path, v in nnx.to_flat_state(nnx.state(model))}
    closed, keyed, out_shape = forward_jaxpr(model, example_input, apply)
    paths = tuple(dotted_path(path) for path, _ in keyed)
    ctx, outs = walk_state_function(
        closed.jaxpr, [(p, leaf) for p, (_, leaf) in zip(paths, keyed)], is_param)
    for out in outs:
        for field in out.fields:
            ctx.units.block(field.ids, OUTPUT_BLOCKER)
    structure = TracedStructure(
        ctx.units, ctx.counted_layers(), ctx.other_macs, ctx.param_ids, example_input.shape[0],
        ctx.head_splits, tuple(dict.fromkeys(l.kernel for l in ctx.layers if l.kind == "lookup")),
        ctx.tagged, ctx.links,
    )
    return TracedProgram(
        structure, closed, ctx.root, paths, jax.tree_util.tree_structure(out_shape)
    )
