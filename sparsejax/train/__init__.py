"""The training engine."""

from sparsejax.train.loop import NonFiniteLossError, train_and_evaluate
from sparsejax.train.preemption import Preempted

__all__ = ["NonFiniteLossError", "Preempted", "train_and_evaluate"]
