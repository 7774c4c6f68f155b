"""Physical slimming of a pruned network: a model gated from its trace (every zoo model, a
``--model=MODULE:FACTORY`` model) into a pure function with its parameters (:mod:`.traced`);
saving it (:mod:`.store`) and the command line over a run's checkpoint (:mod:`.runs`,
``python -m sparsejax.slim``). It sits above the training engine; the accounting it checks
itself against is :mod:`sparsejax.structure`."""

from sparsejax.slim.traced import slim_traced_model

__all__ = ["slim_traced_model"]
