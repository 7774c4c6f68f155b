"""The interface every method implements, and the pieces most methods share.

A method says how to gate a model (:meth:`Method.make_gate`), what the training objective is
(:meth:`Method.objective`, whose ``jax.grad`` is the update direction: for ARM it carries the
estimator's gradient for the gate parameters), which optimizer each parameter group gets
(:meth:`Method.optimizer`, over ``{"net": ..., "gates": ...}``) and what happens after an update
(:meth:`Method.after_update`: by default :meth:`Method.project`, e.g. the log-alpha clamp;
masks and other non-trainable state). The training engine knows only this interface.
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

from sparsejax.errors import ConfigError
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


PER_SLOT_FIELDS: tuple[str, ...] = ("lambdas", "gate_lambda", "final_sparsity", "stage_pr")
"""Config fields with one value per gate slot or layer (or one for all), each read by some
methods only; a method refuses those it does not read (:attr:`Method.per_slot_fields`), which it
would otherwise silently ignore."""


def model_default(
    config: ml_collections.ConfigDict, table: Mapping[str, Mapping[str, Any]], field: str
) -> Any:
    """``config.<field>`` when set, else ``table[config.model][field]`` (the ``"*"`` row for a
    model without its own row): a method's per-model defaults."""
    value = config.get(field)
    if value is not None:
        return value
    return table.get(config.get("model", "*"), table["*"])[field]


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
    optimizer) for the network weights; ``gate_optimizer``, ``gate_learning_rate``,
    ``gate_lr_schedule`` and ``gate_lr_factor`` for gate parameters (None: the network's; gates
    get no weight decay);
    ``l2`` (coefficient of the L2 term in the loss).
    """

    name: ClassVar[str]
    per_slot_fields: ClassVar[tuple[str, ...]] = ()
    """The fields of :data:`PER_SLOT_FIELDS` the method reads; the others must be None."""

    def __init__(self, config: ml_collections.ConfigDict, *, num_train: int):
        if num_train <= 0:
            raise ValueError(f"num_train must be positive, got {num_train}")
        self.config = config
        self.num_train = num_train
        self._refuse_unread_per_slot_fields()
        for key, valid in (
            ("optimizer", OPTIMIZERS),
            ("gate_optimizer", OPTIMIZERS),
            ("lr_schedule", SCHEDULES),
            ("gate_lr_schedule", SCHEDULES),
        ):
            value = config.get(key)
            if value is not None and value not in valid:
                raise ConfigError(f"config.{key} must be one of {valid}, got {value!r}")

    def _refuse_unread_per_slot_fields(self) -> None:
        """A :class:`ConfigError` for a per-slot field that is set but not read by the method."""
        for field in PER_SLOT_FIELDS:
            if field not in self.per_slot_fields and self.config.get(field) is not None:
                reads = ", ".join(f"config.{name}" for name in self.per_slot_fields)
                raise ConfigError(
                    f"config.{field}={self.config.get(field)!r} does not apply to method "
                    f"{self.name!r}, which " + (f"reads {reads} instead" if reads else
                                               "has no per-slot setting")
                    + f"; leave --config.{field} out"
                )

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
        return partition(
            self.net_transform(steps_per_epoch=steps_per_epoch, epochs=epochs),
            self.gate_transform(steps_per_epoch=steps_per_epoch, epochs=epochs),
        )

    def schedule(
        self,
        base: float,
        name: str,
        *,
        steps_per_epoch: int,
        epochs: int,
        factor: float | None = None,
    ) -> float | optax.Schedule:
        """The learning rate ``base`` under schedule ``name`` with the config's milestones and
        ``factor`` (None: ``config.lr_factor``) per milestone."""
        if name == "constant":
            return base
        return learning_rate_schedule(
            base,
            name,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            milestones=self.config.get("lr_milestones") or (),
            factor=self.config.get("lr_factor", 0.1) if factor is None else factor,
        )

    def gate_schedule(
        self, *, steps_per_epoch: int, epochs: int, default_rate: float | None = None
    ) -> float | optax.Schedule:
        """The gate parameters' learning rate: ``gate_learning_rate`` (None: ``default_rate``,
        else the network's), under ``gate_lr_schedule`` (None: the network's) with
        ``gate_lr_factor`` (None: ``lr_factor``) per milestone."""
        config = self.config
        rate = config.get("gate_learning_rate")
        if rate is None:
            rate = config.learning_rate if default_rate is None else default_rate
        return self.schedule(
            rate,
            config.get("gate_lr_schedule") or config.get("lr_schedule", "constant"),
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            factor=config.get("gate_lr_factor"),
        )

    def net_transform(self, *, steps_per_epoch: int, epochs: int) -> optax.GradientTransformation:
        """The optimizer of the network weights (with the coupled weight decay)."""
        config = self.config
        return build_optimizer(
            config.optimizer,
            self.schedule(
                config.learning_rate,
                config.get("lr_schedule", "constant"),
                steps_per_epoch=steps_per_epoch,
                epochs=epochs,
            ),
            weight_decay=config.get("weight_decay", 0.0),
        )

    def gate_transform(self, *, steps_per_epoch: int, epochs: int) -> optax.GradientTransformation:
        """The optimizer of the gate parameters (no weight decay)."""
        return build_optimizer(
            self.config.get("gate_optimizer") or self.config.optimizer,
            self.gate_schedule(steps_per_epoch=steps_per_epoch, epochs=epochs),
        )

    def project(self, params: Params) -> Params:
        """Map parameters back onto their constraint set after an update (identity here)."""
        return params

    def after_update(
        self, params: Params, model_state: nnx.State, key: jax.Array, step: jax.Array
    ) -> tuple[Params, nnx.State]:
        """What happens after every optimizer update, inside the jitted train step.

        ``params`` are the updated parameters, ``model_state`` the non-parameter state the
        step produced (BatchNorm statistics, masks, schedules), ``key`` a PRNG key that is a
        pure function of the run's seed and the step (independent of the objective's key) and
        ``step`` the 0-based index of the update just applied. The default applies
        :meth:`project` and leaves the state as it is.
        """
        return self.project(params), model_state

    def pretrained_run(self) -> str | None:
        """The workdir of a run whose network weights the engine loads into the model before
        training (None: start from the initial weights)."""
        return None

    def prepare_model(self, model: GatedModel) -> None:
        """Called once with the built model before training: resolve per-slot settings, attach
        modules the gates share (e.g. a gate generator) and refuse models the method cannot work
        with."""

    def phase(self, epoch: int, epochs: int) -> Method:
        """The method to train epoch ``epoch`` (0-based) of ``epochs`` with: ``self``, or a
        variant for a later phase of training (e.g. fine-tuning with frozen gates). The engine
        builds one train step per distinct phase object; all phases share one optimizer."""
        return self

    def report(self, model: GatedModel) -> dict[str, Any]:
        """Method-specific facts about a trained model for the run's summary (e.g. dead nodes
        found from the weights); the gate report covers what the gates say. Empty here."""
        return {}

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
        raise ConfigError(
            f"config.{what} has {len(values)} values but the model has {len(slots)} gate slots "
            f"({names}); give one value or one per slot"
        )
    return {slot.name: float(v) for slot, v in zip(slots, values)}
