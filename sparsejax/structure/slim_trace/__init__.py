"""Slimming any traced NNX model: the units of closed gates taken out of every array, the
forward pass re-run from its jaxpr on the narrower arrays, saved and loaded without the model's
class (:func:`slim_traced`, :func:`load_slim_function`)."""

from sparsejax.structure.slim_trace.api import (
    SlimFunction,
    SlimGroup,
    SlimReport,
    load_slim_function,
    slim_traced,
)
from sparsejax.structure.slim_trace.interpret import SlimmingError

__all__ = [
    "SlimFunction",
    "SlimGroup",
    "SlimReport",
    "SlimmingError",
    "load_slim_function",
    "slim_traced",
]
