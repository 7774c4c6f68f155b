"""The interface every method implements, and the pieces most methods share.

A method says how to gate a model (:meth:`Method.make_gate`), what the training objective is
(:meth:`Method.objective`, whose ``jax.grad`` is the update direction: for ARM it carries the
estimator's gradient for the gate parameters), which optimizer each parameter group gets
(:meth:`Method.optimizer`, over ``{"net": ..., "gates": ...}``) and what happens after an update
(:meth:`Method.project`, e.g. the log-alpha clamp). The training engine knows only this interface.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from sparsejax.gates.base import Gate
from sparsejax.methods.optim import (
    OPTIMIZERS,
    SCHEDULES,
    build_optimizer,
    learning_rate_schedule,
    partition,
)
from sparsejax.models.base import GatedModel, GateSlot

Params = dict[str, Any]
"""``{"net": nnx.State of nnx.Param, "gates": nnx.State of GateParam}``."""


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def error_rate(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of examples whose arg-max prediction is wrong."""
    return jnp.mean(jnp.argmax(logits, axis=-1) != labels)


class Method(abc.ABC):
    """Base class of sparsification methods; configured by an ``ml_collections.ConfigDict``.

    Shared config fields: ``optimizer``, ``learning_rate``, ``lr_schedule`` (constant | step |
    cosine), ``lr_milestones`` (epochs), ``lr_factor`` and ``weight_decay`` (coupled, in the
    optimizer) for the network weights; ``gate_optimizer``, ``gate_learning_rate`` and
    ``gate_lr_schedule`` for gate parameters (None: the network's; gates get no weight decay);
    ``l2`` (coefficient of the L2 term in the loss).
    """

    name: ClassVar[str]

    def __init__(self, config: ml_collections.ConfigDict, *, num_train: int):
        if num_train <= 0:
            raise ValueError(f"num_train must be positive, got {num_train}")
        self.config = config
        self.num_train = num_train
        for key, valid in (
            ("optimizer", OPTIMIZERS),
            ("gate_optimizer", OPTIMIZERS),
            ("lr_schedule", SCHEDULES),
            ("gate_lr_schedule", SCHEDULES),
        ):
            value = config.get(key)
            if value is not None and value not in valid:
                raise ValueError(f"config.{key} must be one of {valid}, got {value!r}")

    @abc.abstractmethod
    def make_gate(self, slot: GateSlot, rngs: nnx.Rngs) -> Gate | None:
        """The gate module for ``slot`` (None leaves the slot ungated)."""

    @abc.abstractmethod
    def objective(
        self, model: GatedModel, images: jax.Array, labels: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The training loss and its parts: ``{"logits", "data_loss", "penalty"}``.

        Called on a model merged from traced parameters; BatchNorm statistics updated in place by
        the forward pass are the new statistics.
        """

    def penalty(self, model: GatedModel) -> jax.Array:
        """The regulariser alone (part of :meth:`objective`)."""
        return jnp.zeros(())

    def optimizer(self, *, steps_per_epoch: int, epochs: int) -> optax.GradientTransformation:
        """One optax transformation over ``{"net": ..., "gates": ...}``."""
        config = self.config

        def schedule(base: float, name: str) -> float | optax.Schedule:
            if name == "constant":
                return base
            return learning_rate_schedule(
                base,
                name,
                steps_per_epoch=steps_per_epoch,
                epochs=epochs,
                milestones=config.get("lr_milestones") or (),
                factor=config.get("lr_factor", 0.1),
            )

        net_schedule = config.get("lr_schedule", "constant")
        net = build_optimizer(
            config.optimizer,
            schedule(config.learning_rate, net_schedule),
            weight_decay=config.get("weight_decay", 0.0),
        )
        gates = build_optimizer(
            config.get("gate_optimizer") or config.optimizer,
            schedule(
                config.get("gate_learning_rate") or config.learning_rate,
                config.get("gate_lr_schedule") or net_schedule,
            ),
        )
        return partition(net, gates)

    def project(self, params: Params) -> Params:
        """Map parameters back onto their constraint set after an update (identity here)."""
        return params

    def prepare_model(self, model: GatedModel) -> None:
        """Called once with the built model before training: resolve per-slot settings and
        refuse models the method cannot work with."""

    @staticmethod
    def loss_and_parts(
        data_loss: jax.Array, penalty: jax.Array, logits: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The ``objective`` return value: total loss and ``{"logits", "data_loss", "penalty"}``."""
        return data_loss + penalty, {"logits": logits, "data_loss": data_loss, "penalty": penalty}


def per_slot(
    values: float | Sequence[float] | None,
    slots: Sequence[GateSlot],
    defaults: Mapping[str, Sequence[float]],
    model_name: str,
    what: str,
) -> dict[str, float]:
    """Broadcast a scalar, or match a per-slot sequence ("L0-sep"), to ``{slot name: value}``."""
    if values is None:
        values = defaults.get(model_name, defaults.get("*"))
    if isinstance(values, (int, float)):
        values = [float(values)] * len(slots)
    values = list(values)
    if len(values) == 1:
        values = values * len(slots)
    if len(values) != len(slots):
        names = ", ".join(s.name for s in slots)
        raise ValueError(
            f"config.{what} has {len(values)} values but the model has {len(slots)} gate slots "
            f"({names}); give one value or one per slot"
        )
    return {slot.name: float(v) for slot, v in zip(slots, values)}
