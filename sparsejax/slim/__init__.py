"""Physical slimming of a pruned network: a model gated from its trace (every convolutional zoo
model, a ``--model=MODULE:FACTORY`` model) into a pure function with its parameters
(:mod:`.traced`), a declared transformer into a smaller model of its class (:mod:`.surgery`,
:mod:`.transformer`); saving them (:mod:`.store`) and the command line over a run's checkpoint
(:mod:`.runs`, ``python -m sparsejax.slim``). It sits above the training engine; the accounting
it checks itself against is :mod:`sparsejax.structure`."""

from sparsejax.slim.result import SlimPlan, SlimReport, SlimResult
from sparsejax.slim.surgery import slim_model

__all__ = [
    "SlimPlan",
    "SlimReport",
    "SlimResult",
    "slim_model",
]
