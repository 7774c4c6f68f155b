"""Physical slimming of a pruned network: the plan of which units go (:mod:`.plan`), folding the
test-time gates into the weights (:mod:`.folding`), the surgery that returns a smaller ordinary
model (:mod:`.surgery`), saving it (:mod:`.store`) and its command line over a run's checkpoint
(:mod:`.runs`, ``python -m sparsejax.slim``), which slims a model gated from its trace (a
``--model=MODULE:FACTORY`` run, a plain zoo module) through :mod:`.traced`. It sits above the
training engine; the accounting it checks itself against is :mod:`sparsejax.structure`."""

from sparsejax.slim.plan import SlimPlan
from sparsejax.slim.result import SlimReport, SlimResult
from sparsejax.slim.surgery import slim_model

__all__ = [
    "SlimPlan",
    "SlimReport",
    "SlimResult",
    "slim_model",
]
