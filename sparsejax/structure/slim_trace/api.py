"""Slimming any traced NNX model: :func:`slim_traced`, the :class:`SlimFunction` it returns, and
:func:`load_slim_function`.

The slim network is the model's evaluation forward pass with the removed units taken out of
every array: its parameters are the model's state arrays, with the gate values folded into the
kernels that read them (:func:`~sparsejax.structure.sparsify.gated_slices`) and each dimension
cut to its kept positions; its function is the traced jaxpr run on the narrower arrays
(:mod:`.interpret`). Neither needs the model's Python class, and :meth:`SlimFunction.save` writes
both as one ``.npz`` file (the function as serialized StableHLO from ``jax.export``, with a
symbolic batch size) that :func:`load_slim_function` reads back into a callable.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.structure.accounting import reduction
from sparsejax.structure.slim_trace.dead import empty_layer_biases, unneeded_parameters
from sparsejax.structure.slim_trace.interpret import Narrowed, conform, opened
from sparsejax.structure.slim_trace.rows import RowsError, dropped_positions
from sparsejax.structure.slim_trace.widths import physical_keep
from sparsejax.structure.sparsify import evaluation_copy, gated_slices, scaled_slice
from sparsejax.structure.trace import TracedStructure, UnitGroup, trace_program
from sparsejax.structure.trace.analyze import Apply, call_model

TRACED_BATCHES = (10007, 10009, 10037, 10039, 10061)
"""Primes to trace at, the first one that no other size of the model is a multiple of (so that
every multiple of it in a shape parameter is the batch; see :mod:`.interpret`)."""


@dataclasses.dataclass(frozen=True)
class SlimGroup:
    """One traced group in the slim network: ``open`` of its ``size`` units have an open gate,
    ``width`` are kept; ``status`` says why units with closed gates stay, if they do."""

    index: int
    producers: tuple[str, ...]
    size: int
    open: int
    width: int
    status: str


@dataclasses.dataclass(frozen=True)
class SlimReport:
    """Widths and costs of a slim network: params (kernel weights + layer biases) and MACs per
    example from the traced counts, before and after; ``stored_params_before`` /
    ``stored_params_after`` the floats in all state arrays (normalisers and statistics
    included); ``rows`` per kernel whose rows were dropped (``rows`` of :func:`slim_traced`:
    an input selection, a reader of a gated normaliser's output), ``[kept, size]`` along that
    axis, by its rows and its units;
    ``max_logit_difference`` the largest absolute output difference to the gated model on a
    check batch, once measured."""

    groups: tuple[SlimGroup, ...]
    round_to: int
    params_before: float
    params_after: float
    flops_before: float
    flops_after: float
    stored_params_before: int
    stored_params_after: int
    max_logit_difference: float | None = None
    rows: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def widths(self) -> dict[int, int]:
        return {g.index: g.width for g in self.groups}

    @property
    def flops_ratio(self) -> float:
        """FLOPs before / after (:func:`~sparsejax.structure.accounting.reduction`)."""
        return reduction(self.flops_before, self.flops_after)

    def to_dict(self) -> dict:
        """The fields, ``widths`` and ``flops_ratio``, as JSON-ready values (the fields of the
        zoo's ``slim_report.json`` where they mean the same)."""
        return dataclasses.asdict(self) | {"widths": self.widths, "flops_ratio": self.flops_ratio}

    def write(self, path: str) -> None:
        """Write :meth:`to_dict` as JSON to ``path`` (e.g. ``slim_report.json``)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


class SlimFunction:
    """A slim network: ``apply(params, x)`` (a pure function, ``jax.jit``-able and
    differentiable) with its ``params`` (state arrays by dotted path); calling it runs
    ``apply(params, x)`` compiled. ``report`` describes the slimming."""

    def __init__(
        self,
        apply: Callable,
        params: Mapping[str, jax.Array],
        report: SlimReport,
        input_spec: jax.ShapeDtypeStruct,
    ):
        self.apply = apply
        self._jitted = jax.jit(apply)
        self.params = dict(params)
        self.report = report
        self.input_spec = input_spec

    def __call__(self, x: jax.Array):
        """``apply(params, x)``, compiled (once per input shape)."""
        return self._jitted(self.params, x)

    def check(self, reference: Any, x: jax.Array) -> float:
        """Record and return max |slim(x) - reference| over every output array (``reference``:
        the gated model's evaluation outputs on ``x``, an array or a pytree of them)."""
        differences = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), self(x), reference)
        difference = float(max(jax.tree.leaves(differences)))
        self.report = dataclasses.replace(self.report, max_logit_difference=difference)
        return difference

    def save(self, path: str, *, platforms: Sequence[str] = ("cpu", "cuda")) -> None:
        """Write the function (``jax.export``, batch size symbolic, lowered for ``platforms``),
        the parameters and the report to one ``.npz`` file; :func:`load_slim_function` reads it."""
        (batch,) = jax.export.symbolic_shape("batch")
        spec = jax.ShapeDtypeStruct((batch, *self.input_spec.shape[1:]), self.input_spec.dtype)
        params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.params.items()}
        exported = jax.export.export(jax.jit(self.apply), platforms=tuple(platforms))(params, spec)
        meta = {
            "report": self.report.to_dict(),
            "input": [list(self.input_spec.shape), jnp.dtype(self.input_spec.dtype).name],
            "dtypes": {k: jnp.dtype(v.dtype).name for k, v in self.params.items()},
        }
        with open(path, "wb") as f:
            np.savez(
                f,
                __exported__=np.frombuffer(bytes(exported.serialize()), np.uint8),
                __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                **{f"param:{k}": np.asarray(v) for k, v in self.params.items()},
            )


def load_slim_function(path: str) -> SlimFunction:
    """The :class:`SlimFunction` that :meth:`SlimFunction.save` wrote to ``path``, callable on any
    batch size; no model class is needed."""
    with np.load(path) as data:
        exported = jax.export.deserialize(bytearray(data["__exported__"].tobytes()))
        meta = json.loads(data["__meta__"].tobytes().decode())
        params = {  # .view: numpy stores bfloat16 and the like as raw bytes
            name: jnp.asarray(data[f"param:{name}"].view(jnp.dtype(dtype)))
            for name, dtype in meta["dtypes"].items()
        }
    report = meta["report"]
    report.pop("widths")
    report.pop("flops_ratio")
    report["groups"] = tuple(
        SlimGroup(**g | {"producers": tuple(g["producers"])}) for g in report["groups"]
    )
    shape, dtype = meta["input"]
    return SlimFunction(
        exported.call, params, SlimReport(**report), jax.ShapeDtypeStruct(tuple(shape), dtype)
    )


def _traced_batch(model: nnx.Module, example_input) -> int:
    """The first of :data:`TRACED_BATCHES` that divides no size of the state or the input."""
    sizes = {s for leaf in jax.tree_util.tree_leaves(nnx.state(model))
             for s in getattr(leaf, "shape", ())}
    sizes |= set(example_input.shape[1:])
    for prime in TRACED_BATCHES:
        if all(s % prime for s in sizes if s):
            return prime
    raise ConfigError("slim_traced: the model's sizes are multiples of every traced batch size")


def _places(group: UnitGroup) -> dict[tuple[str, int, int], int]:
    return {(m.path, m.axis, i): u for m in group.members for i, u in zip(m.indices, m.units)}


def _match(given: TracedStructure, traced: TracedStructure) -> dict[int, tuple[int, np.ndarray]]:
    """For each group of ``given``: the group of ``traced`` with the same producers, and the
    position there of each of its units (found through the parameter slices they own)."""
    by_producers = {g.producers: g for g in traced.groups}
    found = {}
    for group in given.groups:
        other = by_producers.get(group.producers)
        if other is None or other.size != group.size:
            raise ConfigError(
                f"slim_traced: group {group.index} ({group.producers}) is not in the model's "
                "evaluation trace; pass the structure traced from this model"
            )
        places = _places(other)
        position = np.full(group.size, -1, np.int64)
        for (path, axis, index), unit in _places(group).items():
            position[unit] = places.get((path, axis, index), -1)
        if np.any(position < 0):
            raise ConfigError(
                f"slim_traced: the units of group {group.index} ({group.producers}) own other "
                "parameter slices in the model's evaluation trace; pass the structure traced "
                "from this model"
            )
        found[group.index] = (other.index, position)
    return found


def _fold(
    state: dict[str, jax.Array], structure: TracedStructure, gates: Mapping[int, jax.Array]
) -> None:
    """Multiply every kernel slice that a gate scales in the gated model by that gate's value,
    as the gated model's forward pass does (same order, same operations)."""
    for index, z in gates.items():
        z = jnp.asarray(z)
        for s in gated_slices(structure, structure.groups[index]):
            state[s.path] = scaled_slice(state[s.path], s, z)


def _rows(
    narrowed: Narrowed,
    frame,
    invars: Mapping[str, object],
    floating: Mapping[str, jax.Array],
    rows: Mapping[str, tuple[int, np.ndarray]],
) -> tuple[dict[object, dict[int, np.ndarray]], dict[str, float]]:
    """``rows`` (see :func:`slim_traced`) checked and keyed by jaxpr input, and per kernel the
    share of the rows its kept units hold that stay."""
    chosen, share = {}, {}
    for path, (axis, keep) in rows.items():
        shape = tuple(floating[path].shape) if path in floating else None
        keep = np.asarray(keep, bool)
        if shape is None or not 0 <= axis < len(shape) or keep.shape != (shape[axis],):
            raise ConfigError(
                f"slim_traced: rows of {path!r} along axis {axis}: give a floating state array "
                f"and one boolean per index of that axis (shape {shape})"
            )
        by_units = narrowed.kept(frame, invars[path])[axis]
        by_units = np.arange(shape[axis]) if by_units is None else by_units
        chosen[invars[path]] = {axis: np.flatnonzero(keep)}
        share[path] = float(np.sum(keep[by_units]) / max(len(by_units), 1))
    return chosen, share


def _moved_tags(
    given: TracedStructure, traced: TracedStructure, tags: Collection[int]
) -> set[int]:
    """The tags of ``traced`` at the parameter indices that ``tags`` of ``given`` label (a
    trace of the same program)."""
    moved: set[int] = set()
    if not tags:
        return moved
    for path, axis, found in given.tagged_axes(set(tags)):
        there = traced.param_tags(path, axis) if path in traced.param_shapes else None
        if there is None or there.shape != found.shape:
            raise ConfigError(f"slim_traced: the query heads on {path!r} are not in the trace")
        moved |= set(there[found >= 0].tolist())
    return moved


def _status(group: UnitGroup) -> str:
    if not group.prunable:
        return f"unprunable: {group.obstacle.describe()}"
    if not group.removable:
        return f"kept whole: {group.obstacle.describe()}"
    return "slimmed"


def _row_savings(
    traced: TracedStructure,
    keep: Mapping[int, np.ndarray],
    row_share: Mapping[str, float],
    closed_tags: Collection[int],
) -> tuple[float, float]:
    """Kernel weights and MACs per example that dropped rows take out of the network kept by
    ``keep`` and ``closed_tags``: the share ``1 - row_share[kernel]`` of each such kernel's
    count (its rows are all the same size), once per kernel for the weights, once per layer
    reading it for the MACs."""
    counts = traced.layer_counts(keep, closed_tags)
    weights = {c.kernel: c.weights for c in counts if c.kernel in row_share}
    saved_weights = sum(w * (1.0 - row_share[k]) for k, w in weights.items())
    saved_macs = sum(c.macs * (1.0 - row_share[c.kernel]) for c in counts if c.kernel in row_share)
    return saved_weights, saved_macs


def _report(
    traced: TracedStructure,
    kept: Mapping[int, np.ndarray],
    open_masks: Mapping[int, np.ndarray],
    round_to: int,
    floating: Mapping[str, jax.Array],
    params: Mapping[str, jax.Array],
    row_share: Mapping[str, float],
    rows: Mapping[str, tuple[int, np.ndarray]],
    unstored: int,
    streams: set[int],
    closed_tags: Collection[int],
) -> SlimReport:
    """Widths, status and costs of the slim network (``kept``: units kept per group;
    ``row_share``: per kernel with dropped rows, the share of its unit-kept rows it keeps;
    ``unstored``: the kernel and bias entries the units keep that it does not store,
    :mod:`.dead`; ``streams``: the groups slimmed as streams although reductions read them;
    ``closed_tags``: the query heads removed)."""
    before = traced.count()
    keep = {g: k.astype(np.float64) for g, k in kept.items()}
    after = traced.count(keep, closed_tags)
    saved_weights, saved_macs = _row_savings(traced, keep, row_share, closed_tags)
    return SlimReport(
        groups=tuple(
            SlimGroup(
                g.index,
                tuple(f"{path}:{axis}" for path, axis in g.producers),
                g.size,
                int(open_masks.get(g.index, np.ones(g.size, bool)).sum()),
                int(kept[g.index].sum()),
                "slimmed" if g.index in streams else _status(g),
            )
            for g in traced.groups
        ),
        round_to=round_to,
        params_before=before.params,
        params_after=after.params - saved_weights - unstored,
        flops_before=before.flops,
        flops_after=after.flops - saved_macs,
        stored_params_before=int(sum(v.size for v in floating.values())),
        stored_params_after=int(sum(v.size for v in params.values())),
        rows={path: [int(params[path].shape[axis]), int(np.size(keep))]
              for path, (axis, keep) in rows.items() if path in params},
    )


def slim_traced(
    model: nnx.Module,
    example_input: jax.Array | jax.ShapeDtypeStruct,
    *,
    structure: TracedStructure | None = None,
    keep: Mapping[int, np.ndarray] | None = None,
    gates: Mapping[int, jax.Array] | None = None,
    scores: Mapping[int, np.ndarray] | None = None,
    round_to: int = 1,
    rows: Mapping[str, tuple[int, np.ndarray]] | None = None,
    replaced: Mapping[str, np.ndarray | jax.Array] | None = None,
    apply: Apply = call_model,
    streams: Sequence[int] = (),
    closed_tags: Collection[int] = (),
) -> SlimFunction:
    """The slim evaluation network of ``model`` with the units of closed gates removed.

    Groups and their units are those of ``structure`` (a trace of ``model``, any mode; default:
    the evaluation trace made here). ``gates`` gives a gate value per unit for some groups (the
    test-time gates of a :class:`~sparsejax.structure.sparsify.Sparsified`, in [0, 1]): units
    with value 0 are removed and the values are folded into the kernels that read the units,
    so the slim network computes what the gated model does. Without ``gates``, ``keep`` gives a
    0/1 mask per group. ``round_to=K`` keeps a multiple of K units per slimmed group, adding
    removed units by decreasing ``scores`` (per group, one per unit; e.g. P(gate != 0)). What
    stays and why: :mod:`.widths`; the report (``.report``, :class:`SlimReport`) gives each
    group's width and status.

    ``apply(model, x)`` is the forward pass; it runs on a copy of ``model`` in evaluation mode
    (NNX ``eval()``). ``example_input`` gives the input's shape and dtype; the slim network
    takes any batch size.

    ``rows`` drops rows whose units stay: ``{kernel path: (axis, keep)}`` with ``keep`` one
    boolean per index of that axis, for rows that are zero (after ``gates`` are folded), such
    as an input selection's closed rows (:class:`~sparsejax.structure.traced_model.GatePlacement`):
    the kernel loses them, and the operand its products pair with them loses the same
    positions back to where other operations read it whole (:mod:`.rows`). Every product
    reading the kernel must sum over ``axis``.

    ``replaced`` gives new values for some floating state arrays, by path, after ``gates`` are
    folded: biases that absorbed the constants some rows meet, with those rows zeroed
    (:func:`sparsejax.slim.traced.absorbed_constants`).

    ``streams`` are groups of ``structure`` whose sums the model takes over their open units (a
    stream placed with its normalisers): they keep exactly the units ``keep`` keeps, and the
    slim network scales their sums to the full width (:mod:`.interpret`).

    ``closed_tags`` are query heads to remove (tags of ``structure``,
    :mod:`~sparsejax.structure.trace.tags`): their indices of every parameter (the query
    projection's columns, the output projection's rows) and their positions of the attention
    between go. The heads kept must sit at the same positions in every key/value group (the
    first M' of each, a rectangle), as the query projection is reshaped into groups of heads
    of one size.

    Arrays the output no longer depends on once the units are cut (what is left of a residual
    branch whose units all went, :mod:`.dead`) are not stored: the slim network runs on zeros
    of their shapes.
    """
    if round_to < 1:
        raise ConfigError(f"slim_traced: round_to must be a positive integer, got {round_to}")
    evaluated = evaluation_copy(model)
    batch = _traced_batch(evaluated, example_input)
    spec = jax.ShapeDtypeStruct((batch, *example_input.shape[1:]), example_input.dtype)
    program = trace_program(evaluated, spec, apply=apply)
    traced = program.structure
    given = structure or traced
    if gates is not None:
        keep = {g: np.asarray(z) > 0 for g, z in gates.items()}
    matched = {g.index: (g.index, np.arange(g.size)) for g in traced.groups} if given is traced \
        else _match(given, traced)

    def moved(values: Mapping[int, np.ndarray] | None, fill) -> dict[int, np.ndarray]:
        out = {}
        for group, vector in (values or {}).items():
            if group not in matched or np.size(vector) != given.groups[group].size:
                raise ConfigError(
                    f"slim_traced: group {group} is not a group of size {np.size(vector)} of "
                    f"the structure ({len(given.groups)} groups); give one value per unit"
                )
            index, position = matched[group]
            target = np.full(traced.groups[index].size, fill, np.asarray(vector).dtype)
            target[position] = np.asarray(vector)
            out[index] = target
        return out

    kept = physical_keep(
        traced, program.frame, moved(keep, True), round_to=round_to, scores=moved(scores, 0.0),
        streams=[matched[group][0] for group in streams],
    )
    closed = _moved_tags(given, traced, closed_tags)
    unit_values = traced.unit_values({g: k.astype(np.float64) for g, k in kept.items()}, closed)
    tag_values = traced.tag_values(closed)
    leaves = dict(zip(program.paths, jax.tree_util.tree_leaves(nnx.state(evaluated))))
    floating = {p: v for p, v in leaves.items() if jnp.issubdtype(v.dtype, jnp.floating)}
    jaxpr, consts = opened(program.jaxpr)
    roots = traced.unit_roots()
    chosen, row_share = _rows(Narrowed(unit_values, roots, batch, tag_values=tag_values),
                              program.frame,
                              dict(zip(program.paths, jaxpr.invars)), floating, rows or {})
    try:
        positions = dropped_positions(jaxpr, program.frame, chosen)
    except RowsError as error:
        raise ConfigError(f"slim_traced: {error}") from None
    narrowed = Narrowed(unit_values, roots, batch, positions, tag_values)
    folded = dict(floating)
    _fold(folded, given, gates or {})
    for path, value in (replaced or {}).items():
        if path not in folded or np.shape(value) != folded[path].shape:
            raise ConfigError(
                f"slim_traced: replaced names {path!r}, which is no floating state array of "
                "that shape; give one per array to replace, shaped like it"
            )
        folded[path] = jnp.asarray(value, folded[path].dtype)
    params = {}
    for path, var in zip(program.paths, jaxpr.invars):
        if path in folded:
            value = folded[path]
            for axis, positions in enumerate(narrowed.kept(program.frame, var)):
                if positions is not None:
                    value = jnp.take(value, jnp.asarray(positions), axis=axis)
            params[path] = value
    unneeded = empty_layer_biases(traced, params) | unneeded_parameters(
        jaxpr, program.frame, narrowed, {v: p for p, v in zip(program.paths, jaxpr.invars)})
    zeros = {p: jax.ShapeDtypeStruct(params[p].shape, params[p].dtype)
             for p in unneeded if p in params}
    layer_params = {path for layer in traced.layers for path in (layer.kernel, layer.bias)}
    unstored = sum(params[p].size for p in zeros if p in layer_params)
    params = {p: v for p, v in params.items() if p not in zeros}
    fixed = {p: v for p, v in leaves.items() if p not in params and p not in zeros}

    def slim_apply(params: Mapping[str, jax.Array], x: jax.Array):
        args = [
            params[p] if p in params
            else jnp.zeros(zeros[p].shape, zeros[p].dtype) if p in zeros
            else fixed[p]
            for p in program.paths
        ]
        x = conform(x, (None,) * x.ndim, narrowed.kept(program.frame, jaxpr.invars[-1]), "input")
        outs = narrowed.run(jaxpr, consts, program.frame, [*args, x], x.shape[0])
        return jax.tree_util.tree_unflatten(program.out_tree, outs)

    report = _report(traced, kept, moved(keep, True), round_to, floating, params, row_share,
                     rows or {}, unstored, {matched[group][0] for group in streams}, closed)
    input_spec = jax.ShapeDtypeStruct(tuple(example_input.shape), example_input.dtype)
    return SlimFunction(slim_apply, params, report, input_spec)
