"""Accounting (active units, params, FLOPs) of pruned networks, and their physical slimming."""

from sparsejax.slim.accounting import (
    LayerCount,
    count_layer,
    count_network,
    pruning_rate,
)
from sparsejax.slim.plan import SlimPlan
from sparsejax.slim.report import GateReport, gate_report, sparsity_report, weight_report
from sparsejax.slim.surgery import SlimReport, SlimResult, slim_model

__all__ = [
    "GateReport",
    "LayerCount",
    "SlimPlan",
    "SlimReport",
    "SlimResult",
    "count_layer",
    "count_network",
    "gate_report",
    "pruning_rate",
    "slim_model",
    "sparsity_report",
    "weight_report",
]
