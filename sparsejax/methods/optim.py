"""Optimizers and learning-rate schedules by name, and the split of one optimizer over network
and gate parameters."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
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


def parse_epoch_rates(text: str, what: str) -> tuple[tuple[int, float], ...]:
    """``"0:0.01,60:0.001"`` -> ``((0, 0.01), (60, 0.001))``: learning rates from the epochs
    given (the format of GReg's ``--lr_ft``); the first epoch must be 0, epochs increasing.

    Raises:
      ConfigError: naming ``what`` (the config field) and what is wrong.
    """
    pairs = []
    for part in str(text).split(","):
        epoch, _, rate = part.partition(":")
        try:
            pairs.append((int(epoch), float(rate)))
        except ValueError:
            raise ConfigError(
                f"config.{what}={text!r} is not 'EPOCH:RATE,...' (e.g. '0:0.01,60:0.001'): "
                f"{part.strip()!r} is not EPOCH:RATE"
            ) from None
    epochs = [epoch for epoch, _ in pairs]
    if epochs[0] != 0 or epochs != sorted(set(epochs)):
        raise ConfigError(
            f"config.{what}={text!r} must start at epoch 0 with increasing epochs"
        )
    if any(rate < 0 for _, rate in pairs):
        raise ConfigError(f"config.{what}={text!r} has a negative learning rate")
    return tuple(pairs)


def epoch_rate_schedule(
    rates: Sequence[tuple[int, float]], *, steps_per_epoch: int
) -> optax.Schedule:
    """The learning rate of each ``(epoch, rate)`` pair from that epoch on (piecewise
    constant in the step count, as the GReg code's ``PresetLRScheduler``)."""
    starts = jnp.array([epoch * steps_per_epoch for epoch, _ in rates])
    values = jnp.array([rate for _, rate in rates], jnp.float32)

    def schedule(count):
        return values[jnp.searchsorted(starts, count, side="right") - 1]

    return schedule


def build_optimizer(
    name: str, learning_rate: float | optax.Schedule, *, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """``adam``; ``sgd``; ``momentum`` (heavy ball 0.9); ``nesterov`` (Nesterov 0.9).

    ``weight_decay`` adds ``weight_decay * w`` to the gradient before the optimizer (coupled L2,
    as the ``weight_decay`` argument of PyTorch's SGD and Adam). The learning rate is the last
    transformation, as in optax's own ``adam`` and ``sgd``, and keeps the rate of its latest
    update in the optimizer state (:func:`learning_rates` reads it)."""
    if name == "adam":
        direction = [optax.scale_by_adam()]
    elif name == "sgd":
        direction = []
    elif name in ("momentum", "nesterov"):
        direction = [optax.trace(decay=MOMENTUM, nesterov=name == "nesterov")]
    else:
        raise ConfigError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    rate = optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate)
    return optax.chain(*decay, *direction, rate)


def learning_rates(opt_state: optax.OptState) -> dict[str, jax.Array]:
    """The learning rate of the latest update of every parameter group of an optimizer built by
    :func:`build_optimizer` (and :func:`partition`): ``{"net": ..., "gates": ...}``, or
    ``{"all": ...}`` for one optimizer over every parameter."""
    found = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_holds_hyperparameters)[0]
    rates = {}
    for path, node in found:
        if _holds_hyperparameters(node):
            groups = [str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey)]
            rates["/".join(groups) or "all"] = node.hyperparams["learning_rate"]
    return rates


def _holds_hyperparameters(node) -> bool:
    """Whether ``node`` is the state of ``optax.inject_hyperparams`` (whose class differs
    between optax releases)."""
    return isinstance(getattr(node, "hyperparams", None), dict)


def partition(
    net: optax.GradientTransformation, gates: optax.GradientTransformation
) -> optax.GradientTransformation:
    """Apply ``net`` to ``params["net"]`` and ``gates`` to ``params["gates"]``."""

    def labels(params):
        return {group: jax.tree.map(lambda _: group, params[group]) for group in params}

    return optax.multi_transform({"net": net, "gates": gates}, labels)
