"""The interface every method implements, and the pieces most methods share.

A method is a set of pure pieces over an explicit state, in the manner of an optax
transformation:

- its hyperparameters, declared in :attr:`Method.fields` with their per-model defaults
  (:mod:`sparsejax.methods.fields`) and resolved when the method is built;
- its gates (:meth:`Method.make_gates`), built with the model;
- :meth:`Method.init`, the method's non-trainable state (masks, growing penalties, counters) as
  a pytree of arrays, created from the built model and carried by the engine in the train state
  and every checkpoint;
- :meth:`Method.objective`, whose ``jax.grad`` is the update direction (for ARM it carries the
  estimator's gradient for the gate parameters), given the model and the state;
- :meth:`Method.before_update` and :meth:`Method.after_update`, functions of (model, state,
  step[, key]) that return the new state, the second one also editing the updated model (e.g.
  re-applying masks, the log-alpha clamp, a prox step);
- :meth:`Method.optimizer`, one optax transformation over ``{"net": ..., "gates": ...}``;
- :meth:`Method.phases`, the stretches of a run with their own hooks, optimizer and length (one
  phase, the whole run with :meth:`optimizer`, unless the method's pipeline has several).

The method object holds only its resolved config and the run's shape (:class:`RunInfo`); nothing
is attached to it or to the model after construction, and every hook may be called in any order.
The training engine knows only this interface.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.gates.base import Gate
from sparsejax.methods import fields as config_fields
from sparsejax.methods.fields import Field, Fields
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

MethodState = Any
"""A method's non-trainable state: a pytree of arrays (``{}`` for a method without one)."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a method knows of the run it trains: training examples (N of the L0 penalties),
    steps per epoch and epochs (its schedules; None for a method that plans the run's length
    itself, :attr:`Method.plans_length`)."""

    num_train: int
    steps_per_epoch: int = 1
    epochs: int | None = 1

    def __post_init__(self):
        sizes = (self.num_train, self.steps_per_epoch, 1 if self.epochs is None else self.epochs)
        if min(sizes) <= 0:
            raise ValueError(f"a run needs positive sizes, got {self}")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def error_rate(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of examples whose arg-max prediction is wrong."""
    return jnp.mean(jnp.argmax(logits, axis=-1) != labels)


@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of a run trained by one method object with one optimizer.

    Attributes:
      name: what the plan printed at start, the progress lines and the summary call it.
      method: the method whose objective and hooks train the phase (the method itself, or a
        variant such as GReg's pretraining or Dep-L0's fine-tuning with frozen gates).
      epochs: the phase's length in epochs; with ``until``, the most it may last.
      optimizer: a fresh optimizer, its state initialised from the parameters when the phase
        begins; None continues the previous phase's optimizer and its state (the first phase
        must have one).
      until: a test of the method state (host arrays) after each of the phase's epochs: the
        phase ends at the first epoch end where it holds (None: after ``epochs`` epochs).
      learning_rate: the phase's learning rate in words, for the plan printed at start.
    """

    name: str
    method: Method
    epochs: int
    optimizer: optax.GradientTransformation | None = None
    until: Callable[[MethodState], bool] | None = None
    learning_rate: str = ""


class Method(abc.ABC):
    """Base of sparsification methods; see the module docstring.

    Reads the shared config fields ``model``, ``seed``, ``l2`` (coefficient of the L2 term in
    the loss), ``optimizer``, ``learning_rate``, ``lr_schedule`` (constant | step | cosine),
    ``lr_milestones`` (epochs), ``lr_factor`` and ``weight_decay`` (coupled, in the optimizer)
    for the network weights, and ``gate_optimizer``, ``gate_learning_rate``,
    ``gate_lr_schedule`` and ``gate_lr_factor`` for gate parameters (None: the network's; gates
    get no weight decay); its own fields are :attr:`fields`.
    """

    name: ClassVar[str]
    fields: ClassVar[Fields] = {}
    """The method's own config fields with their defaults."""
    ema_default: ClassVar[Field] = Field(
        0.0, "decay of the parameter average evaluated in the parameters' place (0: off)"
    )
    """The default of the shared field ``ema_decay`` (:mod:`sparsejax.train.ema`) per model:
    off, unless the method's reference evaluates an average."""
    plans_length: ClassVar[bool] = False
    """Whether the run's length is the sum of the method's :meth:`phases`, one of which ends
    when the method's state says so; the shared field ``epochs`` is then unset (None)."""
    uses_gate_placements: ClassVar[bool] = True
    """Whether a ``--model`` module's own ``gate_placements`` (where the L0 papers put their
    gates) give the method its unit slots; False for methods that prune filters and units
    (GReg, gmp), which take the traced model's prunable groups, the producers' outputs."""

    def __init__(self, config: ml_collections.ConfigDict, run: RunInfo):
        self.config = self.resolve(config)
        self.run = run
        for key, valid in (
            ("optimizer", OPTIMIZERS),
            ("gate_optimizer", OPTIMIZERS),
            ("lr_schedule", SCHEDULES),
            ("gate_lr_schedule", SCHEDULES),
        ):
            value = self.config.get(key)
            if value is not None and value not in valid:
                raise ConfigError(f"config.{key} must be one of {valid}, got {value!r}")

    @classmethod
    def resolve(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """A copy of ``config`` with the method's unset fields at their defaults for
        ``config.model`` and, for a method with gates, the unset gate optimizer fields at
        :meth:`gate_optimizer_defaults` (override for defaults that depend on other fields)."""
        resolved = config_fields.resolve(config, cls.fields)
        if cls.make_gates is Method.make_gates and cls.make_gate is Method.make_gate:
            return resolved  # no gates: the gate optimizer fields are not used
        with resolved.unlocked():
            for field, value in cls.gate_optimizer_defaults(resolved).items():
                if resolved.get(field) is None:
                    resolved[field] = value
        return resolved

    @classmethod
    def gate_optimizer_defaults(cls, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """The values the gate optimizer fields take when unset: the network's optimizer,
        learning rate, schedule and milestone factor."""
        return {
            "gate_optimizer": config.optimizer,
            "gate_learning_rate": config.learning_rate,
            "gate_lr_schedule": config.get("lr_schedule", "constant"),
            "gate_lr_factor": config.get("lr_factor", 0.1),
        }

    @property
    def num_train(self) -> int:
        return self.run.num_train

    def make_gates(self, slots: Sequence[GateSlot], rngs: nnx.Rngs) -> dict[str, Gate]:
        """The gate modules of the model's ``slots``, by slot name (a slot left out stays
        ungated); built with the model. Here: :meth:`make_gate` of every slot."""
        built = {}
        for slot in slots:
            gate = self.make_gate(slot, rngs)
            if gate is not None:
                built[slot.name] = gate
        return built

    def make_gate(self, slot: GateSlot, rngs: nnx.Rngs) -> Gate | None:
        """The gate module for ``slot`` (None leaves the slot ungated). None here."""
        return None

    def init(self, model: GatedModel) -> MethodState:
        """The method's state for the freshly built ``model`` (``{}`` here). Refuses, with a
        :class:`ConfigError`, a model or per-slot setting the method cannot work with."""
        return {}

    @abc.abstractmethod
    def objective(
        self,
        model: GatedModel,
        state: MethodState,
        images: jax.Array,
        labels: jax.Array,
        key: jax.Array,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The training loss and its parts: ``{"logits", "data_loss", "penalty"}``.

        Called on a model merged from traced parameters; BatchNorm statistics updated in place by
        the forward pass are the new statistics.
        """

    def penalty(self, model: GatedModel, state: MethodState) -> jax.Array:
        """The regulariser alone (part of :meth:`objective`)."""
        return jnp.zeros(())

    def before_update(self, model: GatedModel, state: MethodState, step: jax.Array) -> MethodState:
        """The state for step ``step`` (0-based) from the parameters before its update, e.g.
        GReg's coefficients; the objective of the step sees it. Identity here."""
        return state

    def after_update(
        self, model: GatedModel, state: MethodState, step: jax.Array, key: jax.Array
    ) -> MethodState:
        """What happens after every optimizer update, inside the jitted train step.

        ``model`` holds the updated parameters and the non-parameter state the step produced
        (BatchNorm statistics); it is a copy that the engine splits again, so the method may
        edit it in place (masks, clamps, prox steps) and returns the new method state. ``key``
        is a PRNG key that is a pure function of the run's seed and the step (independent of
        the objective's key) and ``step`` the 0-based index of the update just applied. Here:
        :meth:`project`, the state unchanged.
        """
        self.project(model)
        return state

    def project(self, model: GatedModel) -> None:
        """Map parameters back onto their constraint set after an update (nothing here)."""

    def optimizer(self) -> optax.GradientTransformation:
        """One optax transformation over ``{"net": ..., "gates": ...}``."""
        return partition(self.net_transform(), self.gate_transform())

    def schedule(
        self, base: float, name: str, *, factor: float | None = None, epochs: int | None = None
    ) -> float | optax.Schedule:
        """The learning rate ``base`` under schedule ``name`` with the config's milestones and
        ``factor`` (None: ``config.lr_factor``) per milestone, over ``epochs`` (None: the
        run's)."""
        if name == "constant":
            return base
        return learning_rate_schedule(
            base,
            name,
            steps_per_epoch=self.run.steps_per_epoch,
            epochs=self.run.epochs if epochs is None else epochs,
            milestones=self.config.get("lr_milestones") or (),
            factor=self.config.get("lr_factor", 0.1) if factor is None else factor,
        )

    def gate_schedule(self, *, default_rate: float | None = None) -> float | optax.Schedule:
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
            factor=config.get("gate_lr_factor"),
        )

    def net_transform(self) -> optax.GradientTransformation:
        """The optimizer of the network weights (with the coupled weight decay)."""
        config = self.config
        return build_optimizer(
            config.optimizer,
            self.schedule(config.learning_rate, config.get("lr_schedule", "constant")),
            weight_decay=config.get("weight_decay", 0.0),
        )

    def gate_transform(self) -> optax.GradientTransformation:
        """The optimizer of the gate parameters (no weight decay)."""
        return build_optimizer(
            self.config.get("gate_optimizer") or self.config.optimizer, self.gate_schedule()
        )

    def phases(self) -> tuple[Phase, ...]:
        """The stretches of the run, in order (:class:`Phase`): here one, the whole run with
        :meth:`optimizer`. The engine builds one train step per phase, starts a phase's fresh
        optimizer when the phase begins, and ends the run after the last phase."""
        return (Phase("train", self, self.run.epochs, self.optimizer()),)

    def model_options(self) -> dict[str, Any]:
        """Keyword arguments for the constructor of ``config.model`` that the method's reference
        code fixes (e.g. an initialisation), which the engine passes when it builds the model.
        None here."""
        return {}

    def pretrained_run(self) -> str | None:
        """The workdir of a run whose network weights the engine loads into the model before
        :meth:`init` (None: train from the initialisation)."""
        return None

    def metrics(self, state: MethodState) -> dict[str, jax.Array]:
        """Scalars of the method's state to log with every step's metrics (as ``train/NAME``),
        e.g. Lagrange multipliers. None here."""
        return {}

    def report(self, model: GatedModel, state: MethodState) -> dict[str, Any]:
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
    values: float | Sequence[float], slots: Sequence[GateSlot], what: str
) -> dict[str, float]:
    """Broadcast a scalar, or match a per-slot sequence ("L0-sep"), to ``{slot name: value}``."""
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
