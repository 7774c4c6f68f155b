"""The outcome of the analysis: unit groups with their members and blockers, the layers found,
and parameter / FLOP counts of the network with any units removed."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from sparsejax.structure.trace.units import NO_UNIT, Blocker, UnitTable
from sparsejax.structure.trace.values import Factor, Joint, LayerRecord, PositionLinks

ArrayLike = np.ndarray | float


@dataclasses.dataclass(frozen=True)
class Member:
    """The slice of a parameter that belongs to a group: indices ``indices`` of axis ``axis`` of
    the parameter at ``path``; ``units[k]`` is the group unit that index ``indices[k]`` goes
    with (several indices share a unit when a channel became a block of features)."""

    path: str
    axis: int
    indices: tuple[int, ...]
    units: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class UnitGroup:
    """Units that are produced by the same kernels' output axes, with everything tied to them.

    ``producers`` are the ``(kernel path, axis)`` pairs whose outputs are the group's units (one
    for a plain layer, several for a residual stream), in network order; ``members`` every
    parameter slice removed with a unit; ``blockers`` the operations that keep the group from
    being pruned (empty when it is prunable); ``caveats`` the reductions over its units (a
    normaliser's statistics) whose value removing units changes unless slimming accounts for it;
    ``stream``: whether a sum of two activations joins its units (a residual stream), where
    several producers may also be tied by a product (attention heads' queries and keys).
    """

    index: int
    size: int
    producers: tuple[tuple[str, int], ...]
    members: tuple[Member, ...]
    blockers: tuple[Blocker, ...]
    caveats: tuple[Blocker, ...] = ()
    stream: bool = False

    @property
    def prunable(self) -> bool:
        return not self.blockers

    @property
    def removable(self) -> bool:
        """Prunable and without caveats: removing a unit changes nothing but the units left
        (no normaliser's statistic reads the group), so gates here count what slimming
        removes."""
        return self.prunable and not self.caveats

    @property
    def obstacle(self) -> Blocker | None:
        """Why the group is not removable: its first blocker, else its first caveat."""
        return next(iter(self.blockers + self.caveats), None)

    def member(self, path: str, axis: int) -> Member | None:
        """The slice of parameter ``path`` along ``axis`` in this group, if any."""
        return next((m for m in self.members if (m.path, m.axis) == (path, axis)), None)


@dataclasses.dataclass(frozen=True)
class TracedLayer:
    """A convolution or dense product that reads the parameter ``kernel`` (or, when
    ``reparametrised``, a kernel computed from it, whose units are kept whole); ``bias`` is the
    parameter added to its output, if any."""

    kernel: str
    kind: str
    bias: str | None
    reparametrised: bool = False


@dataclasses.dataclass(frozen=True)
class TracedCounts:
    """Kept kernel weights, layer biases and MACs per example, the conventions of
    :mod:`sparsejax.structure.accounting` (``params = weights + biases``; normaliser
    parameters are counted apart in ``other_params``, statistics not at all)."""

    weights: float
    biases: float
    flops: float
    other_params: float

    @property
    def params(self) -> float:
        return self.weights + self.biases


@dataclasses.dataclass(frozen=True)
class TracedLayerCount:
    """Kept kernel weights, bias entries and MACs per example of one :class:`TracedLayer`."""

    kernel: str
    weights: float
    biases: float
    macs: float


class TracedStructure:
    """Prunable unit groups of a traced network and its costs; see
    :func:`~sparsejax.structure.trace.trace_structure`.

    Costs are evaluated under per-unit *keep values*: for some group indices, one value per unit
    of the group (1 keeps it, 0 removes it, a probability P(unit kept) gives expectations over
    independent units, as the layer accounting does); groups not given are
    kept. A parameter entry is kept with the product of the values of its units along each
    axis; a product's MACs likewise.
    """

    def __init__(
        self,
        table: UnitTable,
        layers: list[LayerRecord],
        other_macs: list[tuple[Factor, ...]],
        param_ids: Mapping[str, tuple[np.ndarray | int, ...]],
        batch_size: int,
        head_splits: Sequence[np.ndarray] = (),
        tables: Sequence[str] = (),
        tagged: Sequence[tuple[np.ndarray, np.ndarray]] = (),
        links: PositionLinks | None = None,
    ):
        roots = table.roots()
        self._roots = np.append(roots, NO_UNIT)
        self._unit_group, self._unit_pos, self.groups = _form_groups(table, roots)
        self.layers = tuple(
            TracedLayer(l.kernel, l.kind, l.bias, l.reparametrised) for l in layers
        )
        self._layer_macs = [l.macs for l in layers]
        self._other_macs = list(other_macs)
        self._param_ids = dict(param_ids)
        self.param_shapes = {
            path: tuple(i if isinstance(i, int) else i.size for i in ids)
            for path, ids in param_ids.items()
        }
        self.batch_size = batch_size
        self.tables = tuple(tables)
        """The parameters whose rows are looked up (embedding tables, tied ones too)."""
        self._head_splits = tuple(head_splits)
        self._tag_count = 1 + max((int(np.max(t)) for _, t in tagged if np.size(t)), default=-1)
        self._axis_tags = _axis_tags(self._param_ids, tagged, links or PositionLinks())

    @property
    def products(self) -> tuple[tuple[Factor, ...], ...]:
        """The cost factors of every product of two activations (attention's scores and
        mixing), in traced order: its multiply-accumulates over the traced batch are the
        product of its factors."""
        return tuple(self._other_macs)

    def groups_of(self, path: str, axis: int) -> tuple[int, ...]:
        """Indices of the groups that parameter ``path`` has members in along ``axis``."""
        return tuple(g.index for g in self.groups if g.member(path, axis) is not None)

    def count(
        self, keep: Mapping[int, ArrayLike] | None = None, closed_tags: Collection[int] = ()
    ) -> TracedCounts:
        """Totals of the network under the keep values ``keep`` (all units kept by default)
        without the query heads of ``closed_tags`` (:meth:`param_tags`). A kernel read by
        several layers (tied weights) counts once; FLOPs include the products of two
        activations (attention scores), which no layer owns."""
        values = self.unit_values(keep, closed_tags)
        tags = self.tag_values(closed_tags)
        roles = {l.kernel: "kernel" for l in self.layers}
        roles |= {l.bias: "bias" for l in self.layers if l.bias}
        sums = {"kernel": 0.0, "bias": 0.0, "other": 0.0}
        for path, ids in self._param_ids.items():
            sums[roles.get(path, "other")] += _product(values, ids)
        macs = self._layer_macs + self._other_macs
        flops = sum(_product(values, m, tags) for m in macs) / self.batch_size
        return TracedCounts(sums["kernel"], sums["bias"], flops, sums["other"])

    def layer_counts(
        self, keep: Mapping[int, ArrayLike] | None = None, closed_tags: Collection[int] = ()
    ) -> tuple[TracedLayerCount, ...]:
        """Per layer, in network order, under the keep values ``keep`` without the query
        heads of ``closed_tags``."""
        values = self.unit_values(keep, closed_tags)
        tags = self.tag_values(closed_tags)
        return tuple(
            TracedLayerCount(
                layer.kernel,
                _product(values, self._param_ids[layer.kernel]),
                _product(values, self._param_ids[layer.bias]) if layer.bias else 0.0,
                _product(values, macs, tags) / self.batch_size,
            )
            for layer, macs in zip(self.layers, self._layer_macs)
        )

    def unit_values(
        self, keep: Mapping[int, ArrayLike] | None, closed_tags: Collection[int] = ()
    ) -> np.ndarray:
        """The keep value of every unit (indexed by unit id, as in the fields of the walk), 0
        for a parameter's index tagged by a query head of ``closed_tags``, and a last entry 1
        for positions of no unit (id -1)."""
        values = np.ones(self._unit_group.size + 1, np.float64)
        for group, vector in (keep or {}).items():
            vector = np.broadcast_to(np.asarray(vector, np.float64), (self.groups[group].size,))
            chosen = self._unit_group == group
            values[:-1][chosen] = vector[self._unit_pos[chosen]]
        if closed_tags:
            closed = np.asarray(sorted(closed_tags), np.int64)
            for (path, axis), tags in self._axis_tags.items():
                values[self._param_ids[path][axis][np.isin(tags, closed)]] = 0.0
        return values

    def tag_values(self, closed_tags: Collection[int] = ()) -> np.ndarray:
        """1 for every query-head tag but those of ``closed_tags`` (indexed by tag), and a last
        entry 1 for positions of no tag (-1)."""
        values = np.ones(self._tag_count + 1, np.float64)
        values[np.asarray(sorted(closed_tags), np.int64)] = 0.0
        return values

    def unit_roots(self) -> np.ndarray:
        """The class of every unit (indexed by unit id; merged units share one), and a last
        entry -1 for positions of no unit (id -1)."""
        return self._roots

    def heads(self, group: int) -> tuple[np.ndarray, ...]:
        """The ways products of two activations split the units of ``group`` into heads (a
        flat projection reshaped into heads, whose units the product sums over within each
        head): per way, the head of every unit of the group, ``0 .. heads - 1``; distinct ways
        in traced order. Splits into as many heads that each cover part of the group (the
        queries and keys, and the values, of a fused ``qkv`` projection) join, head h with
        head h, when together they put every unit in one head. A split that puts a unit in
        two heads is none."""
        size = self.groups[group].size
        found: list[np.ndarray] = []
        joined: dict[int, np.ndarray] = {}
        for split in self._head_splits:
            if np.any(split == NO_UNIT):
                continue
            groups, positions = self.unit_places(split)
            if np.any(groups != group):
                continue
            count = split.shape[0]
            head = np.full(size, -1, np.int64)
            head[positions] = np.arange(count)[:, None]
            if not np.all(head[positions] == np.arange(count)[:, None]):
                continue
            part = joined.setdefault(count, np.full(size, -1, np.int64))
            if np.all((part < 0) | (head < 0) | (part == head)):
                joined[count] = np.where(head >= 0, head, part)
            for candidate in (head, joined[count]):
                if np.all(candidate >= 0) and not any(np.array_equal(candidate, f) for f in found):
                    found.append(candidate)
        return tuple(found)

    def param_tags(self, path: str, axis: int) -> np.ndarray | None:
        """The query-head tag (:mod:`.tags`) of each index of axis ``axis`` of parameter
        ``path`` (-1 for none: an index whose ids hold no tag or two), or None when none has
        one."""
        return self._axis_tags.get((path, axis))

    def tagged_axes(self, tags: set[int]) -> tuple[tuple[str, int, np.ndarray], ...]:
        """``(path, axis, tag of each index)`` of every parameter axis with indices tagged by
        ``tags``, in parameter order."""
        chosen = np.asarray(sorted(tags), np.int64)
        return tuple(
            (path, axis, np.where(np.isin(axis_tags, chosen), axis_tags, NO_UNIT))
            for (path, axis), axis_tags in self._axis_tags.items()
            if np.isin(axis_tags, chosen).any()
        )

    def unit_places(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The group of each unit id in ``ids`` (-1 for a unit in no group) and its position
        in the group."""
        ids = np.asarray(ids, np.int64)
        return self._unit_group[ids], self._unit_pos[ids]


def _axis_tags(
    param_ids: Mapping[str, tuple[np.ndarray | int, ...]],
    tagged: Sequence[tuple[np.ndarray, np.ndarray]],
    links: PositionLinks,
) -> dict[tuple[str, int], np.ndarray]:
    """Per ``(parameter path, axis)`` with a tagged index, the tag of each index (-1 for
    none): a class of linked ids recorded with one tag gives it to every id of the class, one
    recorded with two gives none."""
    by_link: dict[int, int] = {}
    for ids, tags in tagged:
        for unit, tag in zip(np.ravel(ids).tolist(), np.ravel(tags).tolist()):
            if unit != NO_UNIT and tag != NO_UNIT:
                root = links.find(unit)
                by_link[root] = tag if by_link.get(root, tag) == tag else NO_UNIT
    if not by_link:
        return {}
    found = {}
    for path, ids in param_ids.items():
        for axis, axis_ids in enumerate(ids):
            if isinstance(axis_ids, int):
                continue
            tags = np.array([by_link.get(links.find(i), NO_UNIT) for i in axis_ids.tolist()],
                            np.int64)
            if np.any(tags >= 0):
                found[(path, axis)] = tags
    return found


def _product(
    values: np.ndarray, factors: tuple[Factor, ...], tag_values: np.ndarray | None = None
) -> float:
    """The product of the factors: sizes as they are, unit ids as the sum of their values, a
    :class:`Joint` as the sum over its positions of the product of its units' values (and its
    tags', ``tag_values``)."""
    total = 1.0
    for factor in factors:
        if isinstance(factor, int):
            total *= factor
        elif isinstance(factor, Joint):
            kept = np.ones(factor.tags.shape) if tag_values is None else tag_values[factor.tags]
            for ids in factor.ids:
                kept = kept * values[np.where(ids == NO_UNIT, -1, ids)]
            total *= float(np.sum(kept))
        else:
            total *= float(np.sum(values[np.where(factor == NO_UNIT, -1, factor)]))
    return total


def _form_groups(
    table: UnitTable, roots: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[UnitGroup, ...]]:
    """Group the unit classes around the producer seeds, in the order they were produced."""
    group_of_root: dict[int, int] = {}
    parent: list[int] = []

    def find(g: int) -> int:
        while parent[g] != g:
            g = parent[g]
        return g

    for seed in table.producers:
        found = {find(group_of_root[r]) for r in roots[table.seed_ids[seed]].tolist()
                 if r in group_of_root}
        if found:
            target = min(found)
            for g in found:
                parent[g] = target
        else:
            target = len(parent)
            parent.append(target)
        for r in roots[table.seed_ids[seed]].tolist():
            group_of_root.setdefault(r, target)
    final = sorted({find(g) for g in range(len(parent))})
    renumber = {g: k for k, g in enumerate(final)}
    group_of_root = {r: renumber[find(g)] for r, g in group_of_root.items()}

    position_of_root: dict[int, int] = {}
    sizes = [0] * len(final)
    producers: list[list[tuple[str, int]]] = [[] for _ in final]
    for seed in table.producers:
        rs = roots[table.seed_ids[seed]].tolist()
        group = group_of_root[rs[0]]
        producers[group].append((table.seeds[seed].path, table.seeds[seed].axis))
        for r in rs:
            if r not in position_of_root:
                position_of_root[r] = sizes[group_of_root[r]]
                sizes[group_of_root[r]] += 1

    unit_group = np.array([group_of_root.get(r, -1) for r in roots.tolist()], np.int64)
    unit_pos = np.array([position_of_root.get(r, -1) for r in roots.tolist()], np.int64)

    members: list[list[Member]] = [[] for _ in final]
    for seed, ids in zip(table.seeds, table.seed_ids):
        if seed.opaque:
            continue
        groups = unit_group[ids]
        for group in np.unique(groups[groups >= 0]).tolist():
            where = np.flatnonzero(groups == group)
            members[group].append(
                Member(seed.path, seed.axis, tuple(where.tolist()),
                       tuple(unit_pos[ids[where]].tolist()))
            )
    blockers, caveats = _per_group(table.blocks, unit_group, len(final)), _per_group(
        table.caveats, unit_group, len(final))
    streams = {g for ids in table.joined for g in unit_group[ids].tolist() if g >= 0}
    groups = tuple(
        UnitGroup(k, sizes[k], tuple(producers[k]), tuple(members[k]), blockers[k], caveats[k],
                  k in streams)
        for k in range(len(final))
    )
    return unit_group, unit_pos, groups


def _per_group(
    records: list[tuple[np.ndarray, Blocker]], unit_group: np.ndarray, count: int
) -> list[tuple[Blocker, ...]]:
    """The distinct records that touch each group's units, in the order they were made."""
    found: list[list[Blocker]] = [[] for _ in range(count)]
    for ids, record in records:
        for group in np.unique(unit_group[ids]).tolist():
            if group >= 0 and record not in found[group]:
                found[group].append(record)
    return [tuple(f) for f in found]
