"""GReg's own counting of kernel weights and FLOPs (Wang et al., ICLR 2021, code
``utils.get_n_flops_`` and ``meta_pruner.py``), so that speedups compare with the paper's labels.

They follow the reference, not the conventions of :mod:`sparsejax.structure.accounting`
(multiply-accumulates counted once, biases among the params): a multiply and an add per kernel
weight and output position, convolution and dense kernels only, and a grouped convolution's FLOPs
divided by ``groups`` a second time. GReg's pruning and its report use them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from sparsejax.models.base import Layer

GREG_ADDS_FACTOR = 2
"""GReg counts a multiply and an add per kernel weight and output position."""


@dataclasses.dataclass(frozen=True)
class GRegCount:
    """Conv + dense kernel weights and FLOPs under the GReg counting convention."""

    weights: float
    flops: float


def greg_count(
    layers: tuple[Layer, ...],
    kept_out: Mapping[str, int] | None = None,
    kept_in: Mapping[str, int] | None = None,
    *,
    count_adds: bool = True,
) -> GRegCount:
    """Kernel weights and FLOPs with the counter of the GReg code (Wang et al., ICLR 2021,
    ``utils.get_n_flops_``), so that speedups compare with the paper's labels.

    Only convolution and dense kernels count (no biases, BatchNorm or pooling). With ``c_in`` and
    ``c_out`` the kept input units (kernel rows times groups) and output units of a layer,
    ``|W| = kh * kw * (c_in / groups) * c_out`` for a convolution and ``c_in * c_out`` for a dense
    layer; FLOPs are ``|W| * H_out * W_out / groups`` and ``|W|``, doubled when ``count_adds``.
    (The reference divides by ``groups`` a second time, since ``|W|`` already has ``1/groups``;
    this is its convention and is kept.) Layers missing from ``kept_out`` / ``kept_in`` keep all
    their units.
    """
    kept_out, kept_in = kept_out or {}, kept_in or {}
    factor = GREG_ADDS_FACTOR if count_adds else 1
    weights = flops = 0.0
    for layer in layers:
        c_in = kept_in.get(layer.name, layer.in_units)
        c_out = kept_out.get(layer.name, layer.out_units)
        if not (0 <= c_in <= layer.in_units and 0 <= c_out <= layer.out_units):
            raise ValueError(
                f"layer {layer.name!r} has {layer.in_units} inputs and {layer.out_units} outputs; "
                f"cannot keep {c_in} and {c_out}"
            )
        layer_weights = layer.receptive_field * (c_in / layer.groups) * c_out
        is_conv = len(layer.kernel_shape) == 4
        positions = layer.out_positions / layer.groups if is_conv else 1
        weights += layer_weights
        flops += factor * layer_weights * positions
    return GRegCount(weights, flops)


def greg_pruned_count(ratio: float, units: int) -> int:
    """Units GReg prunes from a layer of ``units`` at ratio ``r``: ``min(ceil(r * units),
    units - 1)``, so a layer always keeps one unit (``meta_pruner.py`` of the GReg code; the
    ceiling is taken on the float product, as there)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"a pruning ratio must lie in [0, 1), got {ratio}")
    return min(math.ceil(ratio * units), units - 1) if ratio > 0 else 0
