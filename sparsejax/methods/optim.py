"""Optimizers by name, and the split of one optimizer over network and gate parameters."""

from __future__ import annotations

import jax
import optax

OPTIMIZERS: tuple[str, ...] = ("adam", "sgd", "momentum", "nesterov")
MOMENTUM = 0.9


def build_optimizer(name: str, learning_rate: float | optax.Schedule) -> optax.GradientTransformation:
    """``adam``; ``sgd``; ``momentum`` (heavy ball 0.9); ``nesterov`` (Nesterov 0.9)."""
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=MOMENTUM)
    if name == "nesterov":
        return optax.sgd(learning_rate, momentum=MOMENTUM, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")


def partition(
    net: optax.GradientTransformation, gates: optax.GradientTransformation
) -> optax.GradientTransformation:
    """Apply ``net`` to ``params["net"]`` and ``gates`` to ``params["gates"]``."""

    def labels(params):
        return {group: jax.tree.map(lambda _: group, params[group]) for group in params}

    return optax.multi_transform({"net": net, "gates": gates}, labels)
