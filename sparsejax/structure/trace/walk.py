"""Walking a jaxpr: equations in order, into the sub-jaxprs of call-like primitives and scans,
and the fallback for primitives without a rule."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from jax.extend import core

Jaxpr = core.Jaxpr
JAXPR_TYPES = tuple({core.Jaxpr, getattr(core, "ClosedJaxpr", core.Jaxpr)})
"""A jaxpr parameter is a Jaxpr or a ClosedJaxpr (one class in later jax versions, where a
jaxpr's ``.jaxpr`` is itself)."""

from sparsejax.structure.trace import tags
from sparsejax.structure.trace.rules import RULES
from sparsejax.structure.trace.units import Field, UnitTable
from sparsejax.structure.trace.values import (
    CONSTANT,
    UNLABELLED,
    Context,
    Frame,
    PositionLinks,
    Value,
)

CALL_PRIMITIVES = frozenset({
    "pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint",
})
"""Primitives that call a jaxpr once on their own inputs and return its outputs (names differ
between jax versions). ``scan`` has its own walk (:func:`_scan`); ``while`` and ``cond`` (a body
run an unknown number of times, or one of several branches) are left to the unknown-primitive
fallback."""

SUB_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
"""Parameters under which call primitives keep the jaxpr they call."""

_LIBRARY_DIRS = tuple(
    os.sep + name + os.sep for name in ("jax", "jaxlib", "flax", "structure" + os.sep + "trace")
)


def describe_source(eqn) -> str:
    """``file:line (function)`` of the innermost caller outside jax, flax and this analysis."""
    traceback = getattr(eqn.source_info, "traceback", None)
    for frame in getattr(traceback, "frames", None) or ():
        if not any(part in frame.file_name for part in _LIBRARY_DIRS):
            return f"{frame.file_name}:{frame.line_num} ({frame.function_name})"
    return ""


def scan_sizes(eqn) -> tuple[int, int]:
    """How many of a scan's operands are constants and how many carries (the scanned arrays
    follow them): its ``num_consts`` and ``num_carry`` up to jax 0.11; from jax 0.12 on, the
    leaf counts of the first two parts (constants, carries, scanned) of its ``ft_in`` tree."""
    params = eqn.params
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carries, _ = params["ft_in"].unpack()
    return len(consts), len(carries)


def _same_shapes(outer, inner) -> bool:
    return len(outer) == len(inner) and all(
        getattr(a.aval, "shape", None) == getattr(b.aval, "shape", None)
        for a, b in zip(outer, inner)
    )


def sub_jaxpr(eqn) -> Jaxpr | None:
    """The jaxpr a call primitive calls, if ``eqn`` is one (its constants are not needed: they
    carry no units)."""
    if eqn.primitive.name not in CALL_PRIMITIVES:
        return None
    for name in SUB_JAXPR_PARAMS:
        sub = eqn.params.get(name)
        if not isinstance(sub, JAXPR_TYPES):
            continue
        sub = getattr(sub, "jaxpr", sub)
        if _same_shapes(eqn.invars, sub.invars) and _same_shapes(eqn.outvars, sub.outvars):
            return sub
    return None


def _unknown(ctx: Context, eqn, ins: Sequence[Value]) -> list[Value]:
    """A primitive without a rule blocks every unit of its inputs; its outputs get blocked
    opaque units, so that whatever they meet is blocked too."""
    touched = [f for value in ins for f in value.fields]
    if not touched:
        return [UNLABELLED] * len(eqn.outvars)
    ctx.block(touched, "no rule for this primitive")
    reason = "output of a primitive without a rule"
    return [
        Value(tuple(
            ctx.opaque(axis, size, reason)
            for axis, size in enumerate(getattr(var.aval, "shape", ())) if size > 1
        ))
        for var in eqn.outvars
    ]


def _shift(ctx: Context, value: Value, offset: int) -> Value:
    """``value`` with its dimensions renumbered by ``offset``: -1 takes one iteration's slice of
    a scanned input (a field on the scanned dimension is blocked; a slice of a parameter is still
    that parameter, and computed from the same ones), +1 stacks an output."""
    fields = []
    for field in value.fields:
        if offset < 0 and 0 in field.dims:
            ctx.block([field], "scan over a unit dimension")
        else:
            fields.append(Field(tuple(d + offset for d in field.dims), field.ids))
    if offset > 0:
        return Value(tuple(fields))
    return Value(tuple(fields), param=value.param, sources=value.sources)


@dataclasses.dataclass
class _Saved:
    """What a walk adds to the context, saved so that it can be undone (:func:`_scan`)."""

    units: UnitTable
    links: PositionLinks
    layers: int
    other_macs: int
    head_splits: int
    tagged: int
    children: int

    @classmethod
    def take(cls, ctx: Context) -> _Saved:
        """The context as it is now, within a walk."""
        return cls(ctx.units.copy(), ctx.links.copy(), len(ctx.layers), len(ctx.other_macs),
                   len(ctx.head_splits), len(ctx.tagged), len(ctx.stack[-1].children))

    def restore(self, ctx: Context) -> None:
        """Undo what was added since (once: the saved table becomes the context's)."""
        ctx.units, ctx.links = self.units, self.links
        del ctx.layers[self.layers:], ctx.other_macs[self.other_macs:]
        del ctx.head_splits[self.head_splits:], ctx.stack[-1].children[self.children:]
        del ctx.tagged[self.tagged:]
        for index in [k for k in ctx.lookup_units if k >= self.layers]:
            del ctx.lookup_units[index]

    def knows(self, fields: Sequence[Field]) -> bool:
        """Whether every unit of ``fields`` existed when this was taken."""
        known = len(self.units.parent)
        return all(bool(np.all(field.ids < known)) for field in fields)


def _gained(start: Value, end: Value) -> list[Field]:
    """The fields a carry ends an iteration with on dimensions where it started with none."""
    known = {dim for field in start.fields for dim in field.dims}
    return [field for field in end.fields if not set(field.dims) & known]


def _scan(ctx: Context, eqn, ins: Sequence[Value], source: str) -> list[Value]:
    """A scan runs its body on the same parameter slices in every iteration (a stack of
    layers: one unit is index j of every layer). The body is walked once, its costs counted
    ``length`` times, and each carry's units at the end of an iteration are merged with those at
    its start. A carry that gains units inside the body (a recurrent state, zero at the start:
    an LSTM's hidden units), which the next iteration reads, has the walk undone and the body
    walked again with those units at its start, so that what reads them (the recurrent
    kernels' rows) takes them too; a carry that still gains units, or gains units made inside
    the walk, is blocked."""
    params = eqn.params
    body = getattr(params["jaxpr"], "jaxpr", params["jaxpr"])
    consts, carries = scan_sizes(eqn)
    ctx.primitive, ctx.source = eqn.primitive.name, source
    xs = [_shift(ctx, value, -1) for value in ins[consts + carries:]]
    starts = list(ins[consts:consts + carries])
    saved = _Saved.take(ctx)
    outs = walk(ctx, body, [*ins[:consts], *starts, *xs], source)
    gained = [_gained(start, end) for start, end in zip(starts, outs[:carries])]
    if any(gained) and saved.knows([f for fields in gained for f in fields]):
        saved.restore(ctx)
        starts = [Value(start.fields + tuple(g)) for start, g in zip(starts, gained)]
        outs = walk(ctx, body, [*ins[:consts], *starts, *xs], source)
    ctx.primitive, ctx.source = eqn.primitive.name, source
    length = params["length"]
    for k in range(saved.layers, len(ctx.layers)):
        ctx.layers[k] = dataclasses.replace(ctx.layers[k], macs=(length, *ctx.layers[k].macs))
    ctx.other_macs[saved.other_macs:] = [
        (length, *macs) for macs in ctx.other_macs[saved.other_macs:]]
    final = []
    for start, end in zip(starts, outs[:carries]):
        merged = ctx.merge_fields([*start.fields, *end.fields])
        known = {field.dims for field in start.fields}
        ctx.block([f for f in merged if f.dims not in known], "scan carry gains units")
        final.append(Value(merged))
    return final + [_shift(ctx, value, 1) for value in outs[carries:]]


PRODUCTS = ("dot_general", "conv_general_dilated")
"""Primitives whose outputs are never a parameter's kernel computed from it: a kernel made
by multiplying parameters (``A @ B``, a learned query projected) is no reparametrised one."""


def _with_sources(ins: Sequence[Value], outs: Sequence[Value]) -> list[Value]:
    """``outs`` computed from the parameters of ``ins`` alone (:attr:`Value.sources`) when no
    input of the equation depends on a model input."""
    if any(value.sources is None for value in ins):
        return list(outs)
    sources = frozenset().union(*(value.sources for value in ins))
    return [dataclasses.replace(out, sources=sources) for out in outs]


def _rule(ctx: Context, eqn, values: Sequence[Value]) -> list[Value]:
    """The outputs of an equation without a sub-jaxpr: its rule's, with the query-head tags
    (:mod:`.tags`) followed, made and recorded."""
    name = eqn.primitive.name
    products = len(ctx.other_macs)
    outs = RULES.get(name, _unknown)(ctx, eqn, values)
    if name == "dot_general":
        if len(ctx.other_macs) > products:
            out_tags, ctx.other_macs[-1] = tags.product(
                ctx, eqn, values, ctx.other_macs[-1], activations=True)
        else:
            layer = ctx.layers[outs[0].layer]
            out_tags, macs = tags.product(ctx, eqn, values, layer.macs, activations=False)
            ctx.layers[outs[0].layer] = dataclasses.replace(layer, macs=macs)
        return tags.with_tags(outs, [out_tags])
    if name not in PRODUCTS:
        outs = _with_sources(values, outs)
    found = tags.followed(eqn, values)
    return outs if found is None else tags.with_tags(outs, found)


def walk(ctx: Context, jaxpr: Jaxpr, ins: Sequence[Value], caller: str = "") -> list[Value]:
    """The values of ``jaxpr``'s outputs given those of its inputs (constants are unlabelled).
    ``caller``: where the call-like equation that holds ``jaxpr`` was made, the source named for
    its equations when theirs lies inside a library (``jnp.sort``'s jit)."""
    env: dict = {var: CONSTANT for var in jaxpr.constvars}
    env.update(zip(jaxpr.invars, ins))
    frame = Frame(env)
    if ctx.stack:
        ctx.stack[-1].children.append(frame)
    else:
        ctx.root = frame
    ctx.stack.append(frame)

    def read(var) -> Value:
        return CONSTANT if isinstance(var, core.Literal) else env.get(var, UNLABELLED)

    for eqn in jaxpr.eqns:
        values = [read(var) for var in eqn.invars]
        sub = sub_jaxpr(eqn)
        source = describe_source(eqn) or caller
        if sub is not None:
            outs = walk(ctx, sub, values, source)
        elif eqn.primitive.name == "scan":
            outs = _scan(ctx, eqn, values, source)
        else:
            ctx.primitive, ctx.source = eqn.primitive.name, source
            outs = _rule(ctx, eqn, values)
        env.update(zip(eqn.outvars, outs))
    ctx.stack.pop()
    return [read(var) for var in jaxpr.outvars]
