"""GReg's pruning ratios from a budget (``target_flops`` / ``target_params``): one ratio for
every layer that ``stage_pr`` as a single float would prune (:func:`.rules.layer_ratios`),
uniform, found by :func:`sparsejax.methods.budget_ratio.layers_ratio` with GReg's rounding of
the pruned count (:func:`.accounting.greg_pruned_count`). Filter granularity prunes units,
weight granularity weights. The count is that of :mod:`sparsejax.structure.accounting` (MACs
counted once, biases among the params), which the run's summary reports, not GReg's own
(:mod:`.accounting`, the reference's FLOPs)."""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from sparsejax.methods.budget import requested_target
from sparsejax.methods.budget_ratio import layers_ratio
from sparsejax.methods.greg.accounting import greg_pruned_count
from sparsejax.methods.greg.rules import RatioSpec, layer_ratios
from sparsejax.models.base import Layer

PROBE_RATIO = 0.5
"""The ratio with which the pruned layers are found (any ratio in (0, 1) finds the same)."""


def budget_stage_pr(config: ml_collections.ConfigDict, layers: Sequence[Layer]) -> RatioSpec:
    """``config.stage_pr``, or under a target the uniform ratio of single weights that meets it
    (weight granularity; filters are pruned through gate slots, :mod:`.method`)."""
    target = requested_target(config)
    if target is None:
        return config.stage_pr
    pruned = layer_ratios(layers, PROBE_RATIO)
    return layers_ratio(
        layers, pruned, target, structure="weight", count=greg_pruned_count,
        what="GReg (weight granularity)",
    )
