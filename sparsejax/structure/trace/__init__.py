"""Prunable structure found by tracing: any Flax NNX model's unit groups, their couplings and
costs, from the jaxpr of its forward pass (the JAX counterpart of Torch-Pruning's dependency
graph; see ``specs/structure.md``)."""

from sparsejax.structure.trace.analyze import (
    TracedProgram,
    trace_program,
    trace_structure,
)
from sparsejax.structure.trace.result import (
    Member,
    TracedCounts,
    TracedLayer,
    TracedLayerCount,
    TracedStructure,
    UnitGroup,
)
from sparsejax.structure.trace.units import OUTPUT_BLOCKER, Blocker
from sparsejax.structure.trace.values import Joint

__all__ = [
    "OUTPUT_BLOCKER",
    "Blocker",
    "Joint",
    "Member",
    "TracedCounts",
    "TracedLayer",
    "TracedLayerCount",
    "TracedProgram",
    "TracedStructure",
    "UnitGroup",
    "trace_program",
    "trace_structure",
]
