"""A budget for the methods that prune at given ratios (``gmp``, ``stochastic``, ``greg1``,
``greg2``): the one ratio that, applied *uniformly* to every layer the method prunes, leaves the
requested FLOPs or parameter fraction of the dense network.

Counting is that of :mod:`sparsejax.structure.accounting` (MACs counted once, a kernel weight
kept when it is kept itself and, for pruned units, when its input and output units are): a layer
that loses a fraction of its output units (filters, neurons) loses that fraction of its kernel,
bias and MACs, and so does every layer that reads it, in its input units; a layer pruned by
weights loses that fraction of its kernel and MACs and keeps its bias. The ratio is found by
bisection on this count, with the method's own rounding of the pruned number (``count``), in
plain Python (it runs while a step is traced): it depends only on the model's declared layers, so
it is a pure function of the config and the model, the same at every step and after a resume.

Uniform, not by a global ranking: a global magnitude threshold decides which layers lose what
from the trained weights, which the count before training cannot know. The achieved fraction of
the trained network can still differ a little from the target: the report counts units left dead
by pruned weights as removed (:mod:`sparsejax.structure.nodes`), and rounding per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np

from sparsejax.errors import ConfigError
from sparsejax.methods.budget import Target
from sparsejax.models.base import GateSlot, Layer, slot_size
from sparsejax.structure.accounting import count_network

PrunedCount = Callable[[float, int], int]
"""How many of ``n`` units (or weights) a method prunes at ratio ``r``."""

BISECTION_STEPS = 40


def rounded_count(ratio: float, total: int) -> int:
    """``min(round(r * n), n - 1)``: gmp's and stochastic pruning's rounding (a layer keeps one)."""
    return min(round(ratio * total), total - 1)


def kept_fraction(
    layers: Iterable[Layer],
    ratios: Mapping[str, float],
    *,
    structure: str,
    kind: str,
    count: PrunedCount = rounded_count,
) -> float:
    """The ``kind`` (flops | params) left when every layer in ``ratios`` loses that fraction of
    its output units (``structure="unit"``: passed on to their readers through the gate slots
    of those outputs, :func:`_slot_fraction`) or kernel weights (``"weight"``), as a fraction
    of the dense network's."""
    layers = tuple(layers)
    if structure == "unit":
        units = {
            slot: (ratios[layer.name], slot_size(placement, layer.out_units))
            for layer in layers if ratios.get(layer.name, 0.0) > 0
            for slot, placement in layer.outputs
        }
        return _slot_fraction(layers, units, kind, count)
    kept = dense = 0.0
    for layer in layers:
        weights = float(math.prod(layer.kernel_shape))  # count_layer(layer, {}) of dense
        biases = float(layer.out_units if layer.has_bias else 0)
        ratio = ratios.get(layer.name, 0.0)
        kept_weights = weights - (count(ratio, int(weights)) if ratio > 0 else 0)
        if kind == "flops":
            kept += kept_weights * layer.out_positions
            dense += weights * layer.out_positions
        else:
            kept += kept_weights + biases
            dense += weights + biases
    return kept / dense


def _slot_fraction(
    layers: tuple[Layer, ...],
    pruned: Mapping[str, tuple[float, int]],
    kind: str,
    count: PrunedCount,
) -> float:
    """The ``kind`` left, as a fraction of the dense network's, when every gate slot in
    ``pruned`` (``{slot: (ratio, units)}``) loses ``count(ratio, units)`` of its units: each of
    its units kept at the fraction ``(n - count(r, n)) / n``, counted by
    :func:`~sparsejax.structure.accounting.count_network` over every layer side that holds the
    slot (a flattened map's tiles, a concatenation's indices, the readers' inputs)."""
    values = {
        slot: np.full(units, (units - count(ratio, units)) / units, np.float32)
        for slot, (ratio, units) in pruned.items()
    }
    with jax.ensure_compile_time_eval():  # a pure function of the layers, also inside a trace
        kept = float(count_network(layers, values)[kind])
        dense = float(count_network(layers, {})[kind])
    return kept / dense


def uniform_ratio(fraction_at: Callable[[float], float], target: Target, what: str) -> float:
    """The ratio r in [0, 1) whose ``fraction_at(r)`` (non-increasing in r) is closest to the
    target, by bisection.

    Raises:
      ConfigError: when even the largest ratio leaves more than the target (``what`` names what
        the method prunes).
    """
    low, high = 0.0, 1.0 - 1e-9
    smallest = fraction_at(high)
    if smallest > target.fraction + 1e-9:
        raise ConfigError(
            f"target_{target.kind}={target.fraction} is below what {what} can reach: pruning "
            f"all but one unit of each leaves {smallest:.3f} of the dense network's {target.kind}"
        )
    for _ in range(BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if fraction_at(middle) > target.fraction:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda r: abs(fraction_at(r) - target.fraction))


def layers_ratio(
    layers: Iterable[Layer],
    pruned: Iterable[str],
    target: Target,
    *,
    structure: str,
    count: PrunedCount = rounded_count,
    what: str = "the method",
) -> float:
    """The uniform ratio over the layers named in ``pruned`` that meets ``target``."""
    layers, pruned = tuple(layers), tuple(pruned)
    return uniform_ratio(
        lambda r: kept_fraction(
            layers, dict.fromkeys(pruned, r), structure=structure, kind=target.kind, count=count
        ),
        target,
        what,
    )


def slots_ratio(
    layers: Iterable[Layer],
    slots: Iterable[GateSlot],
    target: Target,
    *,
    count: PrunedCount = rounded_count,
    what: str = "the method",
) -> float:
    """The uniform ratio over the unit gate slots ``slots`` (a traced model's groups, pruned
    by slot) that meets ``target``."""
    layers, slots = tuple(layers), tuple(slots)
    return uniform_ratio(
        lambda r: _slot_fraction(
            layers, {slot.name: (r, slot.shape[0]) for slot in slots}, target.kind, count
        ),
        target,
        what,
    )
