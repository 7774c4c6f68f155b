"""Units, the fields that label array dimensions with them, and the table that merges them.

A *unit* is one index of one dimension of a parameter (a kernel's output channel c, a BatchNorm
scale's entry c, a dense kernel's input row i) or of an opaque value. A *field* says which unit
each position of some dimensions of an array belongs to: an integer array of unit ids over those
dimensions (-1 where a position belongs to no unit). The analysis moves fields from the inputs of
every operation to its outputs and *merges* the units that the operation ties together (a
residual addition ties channel c of both operands, a matmul ties an activation's feature i to the
kernel's input row i). Merged units are one union-find class: they can only be removed together.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NO_UNIT = -1


@dataclasses.dataclass(frozen=True)
class Field:
    """Unit ids over the dimensions ``dims`` (ascending) of an array: ``ids`` has one axis per
    dimension, of that dimension's size. Dimensions of size 1 carry no field."""

    dims: tuple[int, ...]
    ids: np.ndarray


def make_field(dims: tuple[int, ...], ids: np.ndarray) -> Field | None:
    """The field of ``ids`` over ``dims`` (any order), with size-1 dimensions dropped; None when
    no position belongs to a unit."""
    ids = np.asarray(ids)
    keep = [axis for axis, size in enumerate(ids.shape) if size > 1]
    ids = ids.reshape([ids.shape[axis] for axis in keep])
    dims = tuple(dims[axis] for axis in keep)
    order = np.argsort(dims, kind="stable")
    ids = np.transpose(ids, order) if ids.ndim else ids
    if not dims or np.all(ids == NO_UNIT):
        return None
    return Field(tuple(dims[i] for i in order), ids)


def relabel(field: Field, mapping: dict[int, int]) -> Field | None:
    """``field`` with its dimensions renumbered by ``mapping`` (a dimension left out of it drops
    the field: the caller decides that the dimension no longer exists)."""
    if not all(d in mapping for d in field.dims):
        return None
    return make_field(tuple(mapping[d] for d in field.dims), field.ids)


def join_positions(find, parent, a: np.ndarray, b: np.ndarray) -> None:
    """Join the ids of ``a`` and ``b`` position by position (arrays of one shape) in the
    union-find ``parent`` (a list or a dict from id to parent) whose roots ``find`` gives; the
    smaller root becomes the parent, and positions of no unit (-1) join nothing."""
    for x, y in zip(np.ravel(a).tolist(), np.ravel(b).tolist()):
        if x != NO_UNIT and y != NO_UNIT:
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)


@dataclasses.dataclass(frozen=True)
class Seed:
    """Where a run of fresh units comes from: dimension ``axis`` of the parameter at ``path``
    (dotted attribute path), or the output dimension of an operation the analysis does not
    understand (``path`` names the operation, ``opaque`` is True)."""

    path: str
    axis: int
    size: int
    opaque: bool = False


@dataclasses.dataclass(frozen=True)
class Blocker:
    """An operation that keeps the units it touches from being removed (or, as a caveat, whose
    value their removal changes): its primitive name, where it was called from
    (file:line (function), when known), and why."""

    primitive: str
    source: str
    reason: str

    def describe(self) -> str:
        """``"why (primitive at file:line (function))"``, for reports and errors; the place is
        left out where none is known."""
        where = f" at {self.source}" if self.source else ""
        return f"{self.reason} ({self.primitive}{where})"


OUTPUT_BLOCKER = Blocker("output", "", "reaches the model's output")
"""What keeps the units of the model's output (the logits) whole."""


class UnitTable:
    """Every unit, its seed, the union-find of merged units, what blocks them and what their
    removal changes."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.seed_of: list[int] = []
        self.seeds: list[Seed] = []
        self.seed_ids: list[np.ndarray] = []
        self.producers: list[int] = []
        self._producer_set: set[int] = set()
        self.blocks: list[tuple[np.ndarray, Blocker]] = []
        self.caveats: list[tuple[np.ndarray, Blocker]] = []
        self.joined: list[np.ndarray] = []

    def copy(self) -> UnitTable:
        """An independent copy (the arrays it records are never changed in place)."""
        table = UnitTable.__new__(UnitTable)
        table.__dict__ = {name: value.copy() for name, value in self.__dict__.items()}
        return table

    def new_units(self, seed: Seed) -> np.ndarray:
        """``seed.size`` fresh units, one per index of the seed's dimension."""
        start = len(self.parent)
        ids = np.arange(start, start + seed.size, dtype=np.int64)
        self.parent.extend(ids.tolist())
        self.seed_of.extend([len(self.seeds)] * seed.size)
        self.seeds.append(seed)
        self.seed_ids.append(ids)
        return ids

    def find(self, unit: int) -> int:
        parent = self.parent
        while parent[unit] != unit:
            parent[unit] = parent[parent[unit]]
            unit = parent[unit]
        return unit

    def merge(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge the units of ``a`` and ``b`` position by position (arrays of one shape)."""
        join_positions(self.find, self.parent, a, b)

    def block(self, ids: np.ndarray, blocker: Blocker) -> None:
        """Keep the units of ``ids`` (and every unit merged with them) from being removed."""
        self._record(self.blocks, ids, blocker)

    def warn(self, ids: np.ndarray, caveat: Blocker) -> None:
        """Record that removing the units of ``ids`` changes what ``caveat`` names."""
        self._record(self.caveats, ids, caveat)

    def mark_joined(self, ids: np.ndarray) -> None:
        """Record that a residual addition joins the units of ``ids``."""
        ids = np.unique(np.ravel(ids))
        self.joined.append(ids[ids != NO_UNIT])

    @staticmethod
    def _record(records: list, ids: np.ndarray, what: Blocker) -> None:
        ids = np.unique(np.ravel(ids))
        ids = ids[ids != NO_UNIT]
        if ids.size:
            records.append((ids, what))

    def mark_producers(self, ids: np.ndarray) -> None:
        """The seeds of ``ids`` produce features (a kernel's output dimension): groups are
        formed around them, in the order they are first marked."""
        for unit in np.unique(np.ravel(ids)).tolist():
            if unit == NO_UNIT:
                continue
            seed = self.seed_of[unit]
            if seed not in self._producer_set and not self.seeds[seed].opaque:
                self._producer_set.add(seed)
                self.producers.append(seed)

    def unmark_producers(self, ids: np.ndarray) -> None:
        """The seeds of ``ids`` produce nothing after all (:meth:`mark_producers` undone)."""
        seeds = {self.seed_of[unit] for unit in np.ravel(ids).tolist() if unit != NO_UNIT}
        self._producer_set -= seeds
        self.producers = [seed for seed in self.producers if seed not in seeds]

    def roots(self) -> np.ndarray:
        """The class (root unit) of every unit."""
        return np.array([self.find(unit) for unit in range(len(self.parent))], dtype=np.int64)
