"""Accounting (active units, params, FLOPs) of pruned networks."""

from sparsejax.slim.accounting import (
    LayerCount,
    count_layer,
    count_network,
    pruning_rate,
)
from sparsejax.slim.report import GateReport, gate_report

__all__ = ["GateReport", "LayerCount", "count_layer", "count_network", "gate_report", "pruning_rate"]
