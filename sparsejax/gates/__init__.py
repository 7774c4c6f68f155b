"""Gate modules (Flax NNX) that own gate parameters and draw noise from the "gates" stream."""

from sparsejax.gates.apply import gate_units
from sparsejax.gates.base import GATE_STREAM, Gate, GateParam, active
from sparsejax.gates.binary import BinaryGate
from sparsejax.gates.hard_concrete import HardConcreteGate
from sparsejax.gates.scale import ScaleGate

__all__ = [
    "GATE_STREAM",
    "Gate",
    "GateParam",
    "BinaryGate",
    "HardConcreteGate",
    "ScaleGate",
    "active",
    "gate_units",
]
