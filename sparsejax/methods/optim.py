"""Optimizers and learning-rate schedules by name, and the split of one optimizer over network
and gate parameters."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax

from sparsejax.errors import ConfigError

OPTIMIZERS: tuple[str, ...] = ("adam", "sgd", "momentum", "nesterov")
SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine")
MOMENTUM = 0.9


def learning_rate_schedule(
    base: float,
    schedule: str,
    *,
    steps_per_epoch: int,
    epochs: int,
    milestones: Sequence[int] = (),
    factor: float = 0.1,
) -> optax.Schedule:
    """``constant``; ``step`` (times ``factor`` at each epoch in ``milestones``, as PyTorch's
    MultiStepLR); ``cosine`` (from ``base`` to 0 over ``epochs``)."""
    if schedule == "constant":
        return optax.constant_schedule(base)
    if schedule == "step":
        boundaries = {int(m) * steps_per_epoch: factor for m in milestones}
        return optax.piecewise_constant_schedule(base, boundaries)
    if schedule == "cosine":
        return optax.cosine_decay_schedule(base, max(1, epochs * steps_per_epoch))
    raise ConfigError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")


def build_optimizer(
    name: str, learning_rate: float | optax.Schedule, *, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """``adam``; ``sgd``; ``momentum`` (heavy ball 0.9); ``nesterov`` (Nesterov 0.9).

    ``weight_decay`` adds ``weight_decay * w`` to the gradient before the optimizer (coupled L2,
    as the ``weight_decay`` argument of PyTorch's SGD and Adam)."""
    if name == "adam":
        optimizer = optax.adam(learning_rate)
    elif name == "sgd":
        optimizer = optax.sgd(learning_rate)
    elif name == "momentum":
        optimizer = optax.sgd(learning_rate, momentum=MOMENTUM)
    elif name == "nesterov":
        optimizer = optax.sgd(learning_rate, momentum=MOMENTUM, nesterov=True)
    else:
        raise ConfigError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    if weight_decay:
        return optax.chain(optax.add_decayed_weights(weight_decay), optimizer)
    return optimizer


def partition(
    net: optax.GradientTransformation, gates: optax.GradientTransformation
) -> optax.GradientTransformation:
    """Apply ``net`` to ``params["net"]`` and ``gates`` to ``params["gates"]``."""

    def labels(params):
        return {group: jax.tree.map(lambda _: group, params[group]) for group in params}

    return optax.multi_transform({"net": net, "gates": gates}, labels)
