"""The structure of a network, below the methods: where its units are and what they cost.

From the layers, slots and couplings a model declares (:mod:`sparsejax.models.base`): kept units,
params and FLOPs under any per-unit values (0/1 masks, or keep probabilities for expectations)
(:mod:`.accounting`), the node rules that find units left dead by zero weights (:mod:`.nodes`),
and the per-run sparsity reports built on both (:mod:`.report`). Methods, the training engine and
slimming read them; this layer imports only models, gates and the base utilities.
"""

from sparsejax.structure.accounting import (
    LayerCount,
    count_layer,
    count_network,
    pruning_rate,
)
from sparsejax.structure.nodes import NodeReport, alive_units, node_report
from sparsejax.structure.report import (
    GateReport,
    gate_report,
    sparsity_report,
    weight_report,
)
from sparsejax.structure.trace import TracedStructure, trace_structure

__all__ = [
    "GateReport",
    "LayerCount",
    "NodeReport",
    "TracedStructure",
    "alive_units",
    "count_layer",
    "count_network",
    "gate_report",
    "node_report",
    "pruning_rate",
    "sparsity_report",
    "trace_structure",
    "weight_report",
]
