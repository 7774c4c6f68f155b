"""Running a model without keeping the state its forward pass mutates."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
from flax import nnx

T = TypeVar("T")


def without_state_updates(model: nnx.Module, fn: Callable[[nnx.Module], T]) -> tuple[T, nnx.State]:
    """Run ``fn(model)``; return its output and the non-parameter state (e.g. BatchNorm
    statistics) it produced, and leave the model's state as it was before the call."""
    before = _snapshot(nnx.state(model, nnx.Not(nnx.Param)))
    output = fn(model)
    after = _snapshot(nnx.state(model, nnx.Not(nnx.Param)))
    nnx.update(model, before)
    return output, after


def _snapshot(state: nnx.State) -> nnx.State:
    """A copy of ``state`` detached from the model's variables (``nnx.state`` returns views that
    follow later updates)."""
    return jax.tree.map(lambda value: value, state)
