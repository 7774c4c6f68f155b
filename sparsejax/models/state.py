"""Running a model without keeping the state its forward pass mutates."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from flax import nnx

T = TypeVar("T")


def without_state_updates(model: nnx.Module, fn: Callable[[nnx.Module], T]) -> tuple[T, nnx.State]:
    """Run ``fn(model)``; return its output and the non-parameter state (e.g. BatchNorm
    statistics) it produced, and leave the model's state as it was before the call."""
    before = nnx.state(model, nnx.Not(nnx.Param))
    output = fn(model)
    after = nnx.state(model, nnx.Not(nnx.Param))
    nnx.update(model, before)
    return output, after
