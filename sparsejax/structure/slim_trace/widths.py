"""Which units a slim network keeps: the open gates, made removable and rounded.

A unit whose gate is closed is removed, except where removing it is impossible or would change
the network's outputs:

- groups that are not prunable (blocked by an operation or by the output) keep every unit;
- groups with caveats (a reduction reads their units: LayerNorm / RMSNorm statistics, a mean or
  max over features) keep every unit, since the gated model's statistic still sees the units
  whose gates are closed; their gates are folded into the consumers instead (so a closed unit's
  contribution is zero, exactly as in the gated model). A *stream* (a residual stream placed
  with the normalisers that read it) is the exception: its gated model takes its sums over the
  open units, so it keeps exactly those (``round_to`` adds none: a unit added back would change
  the count its sums are scaled by);
- an array dimension labelled jointly with another (features split into heads x head_dim) can
  only lose whole rows and columns: a closed unit inside the rectangle of kept positions is kept
  (with its gate, 0, folded into its consumers);
- with ``round_to=K``, each slimmed group keeps a multiple of K units (or all of them, when the
  group is smaller), adding the closed units with the highest scores first.

Units added back are exact no-ops (their consumers' rows are multiplied by their gate, 0), so
the slim network computes what the gated one does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from sparsejax.structure.trace import TracedStructure
from sparsejax.structure.trace.units import NO_UNIT
from sparsejax.structure.trace.values import Frame


def slimmable(structure: TracedStructure) -> tuple[int, ...]:
    """Indices of the groups whose units can be removed: prunable and without caveats."""
    return tuple(g.index for g in structure.groups if g.removable)


def _joint_fields(frame: Frame) -> Iterator[np.ndarray]:
    """The unit ids of every field over two or more dimensions, in every frame, once each."""
    seen: set[int] = set()
    stack = [frame]
    while stack:
        current = stack.pop()
        stack.extend(current.children)
        for value in current.env.values():
            for field in value.fields:
                if len(field.dims) > 1 and id(field.ids) not in seen:
                    seen.add(id(field.ids))
                    yield field.ids


def _close_rectangles(
    structure: TracedStructure, keep: dict[int, np.ndarray], fields: list[np.ndarray]
) -> bool:
    """Keep every unit inside the product of the kept rows and columns of a joint field;
    True when a unit was added."""
    changed = False
    values = structure.unit_values({g: k.astype(np.float64) for g, k in keep.items()})
    for ids in fields:
        mask = values[np.where(ids == NO_UNIT, -1, ids)] > 0
        rectangle = np.ones_like(mask)
        for axis in range(mask.ndim):
            others = tuple(j for j in range(mask.ndim) if j != axis)
            shape = [1] * mask.ndim
            shape[axis] = -1
            rectangle &= mask.any(axis=others).reshape(shape)
        missing = rectangle & ~mask
        if missing.any():
            groups, positions = structure.unit_places(ids[missing])
            for group, position in zip(groups.tolist(), positions.tolist()):
                keep[group][position] = True
            values = structure.unit_values({g: k.astype(np.float64) for g, k in keep.items()})
            changed = True
    return changed


def _round_up(
    keep: dict[int, np.ndarray], groups: tuple[int, ...], round_to: int,
    scores: Mapping[int, np.ndarray],
) -> bool:
    """Keep a multiple of ``round_to`` units in each group (at most all), adding the removed
    units with the highest scores; True when a unit was added."""
    changed = False
    for group in groups:
        kept = keep[group]
        target = min(kept.size, -(-int(kept.sum()) // round_to) * round_to)
        extra = target - int(kept.sum())
        if extra <= 0:
            continue
        score = np.asarray(scores.get(group, np.zeros(kept.size)), np.float64)
        candidates = np.flatnonzero(~kept)
        order = candidates[np.argsort(-score[candidates], kind="stable")]
        kept[order[:extra]] = True
        changed = True
    return changed


def physical_keep(
    structure: TracedStructure,
    frame: Frame,
    open_units: Mapping[int, np.ndarray],
    *,
    round_to: int = 1,
    scores: Mapping[int, np.ndarray] | None = None,
    streams: Sequence[int] = (),
) -> dict[int, np.ndarray]:
    """Per group of ``structure``, the units the slim network keeps (boolean), given the units
    whose gates are open (``open_units``: group index -> boolean per unit; groups not given
    keep all); ``frame`` is the walk that made ``structure``. ``streams`` are groups that keep
    exactly their open units although reductions read them (see the module docstring)."""
    removable = slimmable(structure)
    keep = {g.index: np.ones(g.size, bool) for g in structure.groups}
    for group in (*removable, *streams):
        if group in open_units:
            keep[group] = np.asarray(open_units[group], bool).copy()
    fields = list(_joint_fields(frame))
    while _close_rectangles(structure, keep, fields) | _round_up(
        keep, removable, round_to, scores or {}
    ):
        pass
    return keep
