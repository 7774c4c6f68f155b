"""Pruning to a budget: ask for a FLOPs or parameter fraction of the dense network and train
the gates to it with a Lagrangian instead of a hand-tuned lambda (Wang et al. 2020, "Structured
Pruning of Large Language Models", eq. 6; Xia et al. 2022, CoFi, sec. 3.2).

With ``s`` the network's size as a fraction of the dense one (FLOPs as multiply-accumulates, or
parameters, counted by :func:`sparsejax.structure.accounting.count_network`) and ``t`` the target
at the current step, the method's sparsity penalty (its lambdas) is replaced by

    L_budget = lambda_1 * (s - t) + lambda_2 * (s - t)^2,

minimised over the network and gate parameters and maximised over the multipliers
(lambda_1, lambda_2), so that the multipliers grow while the network is too large and the
constraint ``s = t`` holds at a saddle point. The target ramps linearly from the network's size
at initialisation (1 unless gates start closed at test time, as L0-AR's and Dep-L0's can) to the
requested fraction over ``target_warmup_epochs``.

``s`` (``target_measure``):

- ``"test"`` (default): its value is the size of the test-time network (the deterministic gates'
  masks), its gradient that of the expected size under the gate distribution (P(z != 0) of
  hard-concrete gates, pi of binary gates) or, for deterministic gates (``l1``, ``bounded_lp``),
  of a smooth surrogate e of the per-unit keep indicator, shaped like the penalty the budget
  replaces (|g| for ``l1``, 1 - exp(-|g|^p / sigma) for ``bounded_lp``): a straight-through
  estimate, s = size(masks) + e - stop_gradient(e). The multipliers then pursue the quantity a run
  reports, which the expected size only approaches once the gates are near 0 or 1 (in a short run
  they are not).
- ``"expected"``: s = the expected size itself (CoFi), differentiable throughout.

The multipliers are method state, updated after every optimizer step by plain gradient ascent on
L_budget, lambda_1 += target_lr * (s - t) and lambda_2 += target_lr * (s - t)^2, evaluated at the
updated parameters. The network sees lambda_1 + target_kp * (s - t) in place of lambda_1: a
proportional term on the current violation beside the integral one (the PI Lagrangian of Stooke,
Achiam & Abbeel 2020, "Responsive Safety in Reinforcement Learning by PID Lagrangian Methods").
Stochastic gates respond to the multiplier with a lag (they travel at their learning rate to the
test threshold), so the integral alone winds up during the ramp and overshoots the target by
tens of points in a short run; the proportional term pushes while the violation lasts and lets
go as it closes. Gates without that lag (``l1``, ``bounded_lp``) default to no proportional term
(:attr:`Budgeted.default_target_kp`).

Keeping the multipliers out of the optimizer (instead of training them as parameters
with a negated gradient, as CoFi does with Adam) keeps the network's optimizer and its state
untouched, makes their step independent of the optimizer's normalisation (an Adam step on a
multiplier has the same size whatever the violation) and lets the update be read and tested as
one line. They are in the train state, every checkpoint and the metrics (``train/budget/...``).

:class:`Budgeted` gives a gated method all of this; the method names the config field of the
penalty the Lagrangian replaces (:attr:`Budgeted.budget_replaces`), which a target sets to 0.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from sparsejax.errors import ConfigError
from sparsejax.gates.base import active
from sparsejax.methods.base import Method, MethodState
from sparsejax.methods.fields import Field
from sparsejax.models.base import GatedModel
from sparsejax.structure.accounting import count_network
from sparsejax.structure.report import GateReport

KINDS = ("flops", "params")
MEASURES = ("test", "expected")
TOLERANCE = 0.02
"""How far the achieved fraction may lie from the target before the summary calls it a miss."""
STOCHASTIC_GATE_KP = 30.0
"""The default ``target_kp`` of the stochastic-gate methods (L0-HC / ARM / AR, Dep-L0)."""
BUDGET_GATE_LEARNING_RATE = 1e-2
"""The least Adam learning rate of L0 gates under a target when none is given. Under Adam a
gate travels about one learning rate per update, so at the network's 1e-3 a gate that starts
at log_alpha 0 needs ~2,400 updates to reach its test threshold, more than the ramp of a
3-epoch Fashion-MNIST run: the multipliers wound up meanwhile and the gates then closed
together (MLP and LeNet-5 at a 0.5 FLOPs target ended at 90% test error). The budget table in
BUILD_NOTES is measured at this rate."""
STATE_KEY = "budget"
"""The key of the budget's entry in a method's state."""

TARGET_FIELDS = {
    "target_flops": Field(
        None, "FLOPs budget as a fraction of the dense network, in (0, 1) (None: none)", kind=float
    ),
    "target_params": Field(
        None,
        "parameter budget as a fraction of the dense network, in (0, 1) (None: none)",
        kind=float,
    ),
}
"""The budget itself: at most one of the two."""

LAGRANGIAN_FIELDS = {
    **TARGET_FIELDS,
    "target_warmup_epochs": Field(
        None,
        "epochs over which the target ramps from the initial size to its value (None: half the "
        "run)",
        kind=float,
    ),
    "target_lr": Field(1.0, "step size of the multipliers' gradient ascent (integral gain)"),
    "target_kp": Field(
        None,
        "proportional gain: lambda_1 acts as lambda_1 + target_kp * (s - t) (PI Lagrangian; "
        "None: the method's default_target_kp)",
        kind=float,
    ),
    "target_measure": Field("test", "s: test (test-time size, straight-through) | expected"),
}
"""The fields of a gated method's budget (:class:`Budgeted`)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A size budget: ``kind`` (flops | params) and ``fraction`` of the dense network."""

    kind: str
    fraction: float


def requested_target(config: ml_collections.ConfigDict) -> Target | None:
    """The target of ``config`` (None without one).

    Raises:
      ConfigError: for both targets at once or a fraction outside (0, 1).
    """
    given = {
        kind: config.get(f"target_{kind}")
        for kind in KINDS
        if config.get(f"target_{kind}") is not None
    }
    if not given:
        return None
    if len(given) > 1:
        raise ConfigError(
            "config.target_flops and config.target_params are alternatives; give one of them"
        )
    (kind, fraction), = given.items()
    if not 0.0 < float(fraction) < 1.0:
        raise ConfigError(
            f"config.target_{kind} is a fraction of the dense network in (0, 1), got {fraction}"
        )
    return Target(kind, float(fraction))


def size_fraction(model: GatedModel, values: Mapping[str, Any], kind: str) -> jax.Array:
    """The ``kind`` (flops | params) of ``model`` under per-slot unit ``values`` (masks or
    keep probabilities) as a fraction of the dense network's; FLOPs include the model's
    activation products (attention)."""
    products = model.activation_products
    dense = count_network(model.layers, {}, products)[kind]
    return count_network(model.layers, values, products)[kind] / dense


def target_report(target: Target | None, report: GateReport) -> dict[str, Any]:
    """The summary's budget entries: ``target``, ``target_kind`` and ``achieved_fraction`` of the
    reported network (:func:`~sparsejax.structure.report.sparsity_report`: the test-time gates'
    masks, or the weights' zeros), and when it misses by more than :data:`TOLERANCE`,
    ``target_missed_by`` (achieved - target) with the reason."""
    if target is None:
        return {}
    achieved = (
        report.flops / report.dense_flops
        if target.kind == "flops"
        else report.params / report.dense_params
    )
    entries = {"target": target.fraction, "target_kind": target.kind, "achieved_fraction": achieved}
    missed = achieved - target.fraction
    if abs(missed) > TOLERANCE:
        entries["target_missed_by"] = missed
        entries["target_miss_reason"] = (
            "the network is larger than the budget: the run ended before pruning reached it "
            "(gated methods: the multipliers had not yet pushed enough gates below their test "
            "threshold: train longer, raise target_lr or the gates' learning rate, or shorten "
            "target_warmup_epochs; gmp / stochastic: the ramp ends after the run; GReg: its "
            "schedule had not pruned yet, see greg/ in the summary)"
            if missed > 0
            else "the network is smaller than the budget: the gates overshot and the run ended "
            "before the multipliers turned them back (train longer, lower target_lr or raise "
            "target_kp; L0-AR's gates keep closing after the ramp, see BUILD_NOTES); for "
            "ratio methods, units left dead by pruned weights count as removed"
        )
    return entries


def ramped_target(
    final: float, step: jax.Array, warmup_steps: float, start: jax.Array | float = 1.0
) -> jax.Array:
    """The target at update ``step``: linear from ``start`` at step 0 to ``final`` at
    ``warmup_steps``, then ``final``."""
    if warmup_steps <= 0:
        return jnp.asarray(final, jnp.float32)
    progress = jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)
    return start + (final - start) * progress


def lagrangian(
    size: jax.Array, state: Mapping[str, jax.Array], proportional: float = 0.0
) -> jax.Array:
    """(lambda_1 + k_p sg(s - t)) (s - t) + lambda_2 (s - t)^2 at the state's multipliers and
    target, sg the stop-gradient: the multiplier the network sees is the integral lambda_1 plus
    a proportional term on the current violation (Stooke et al. 2020, eq. 9, without the
    derivative term)."""
    gap = size - state["target"]
    multiplier = state["lambda1"] + proportional * jax.lax.stop_gradient(gap)
    return multiplier * gap + state["lambda2"] * jnp.square(gap)


def ascend(state: Mapping[str, jax.Array], size: jax.Array, rate: float) -> dict[str, jax.Array]:
    """One gradient-ascent step of the multipliers on :func:`lagrangian`: its gradient is
    (s - t) for lambda_1 and (s - t)^2 for lambda_2."""
    gap = jax.lax.stop_gradient(size) - state["target"]
    return {
        **state,
        "lambda1": state["lambda1"] + rate * gap,
        "lambda2": state["lambda2"] + rate * jnp.square(gap),
        "size": jax.lax.stop_gradient(size),
    }


class Budgeted(Method):
    """A gated method with ``target_flops`` / ``target_params`` (see the module docstring).

    A method family derives from it instead of :class:`Method` (``class L0Method(Budgeted)``),
    adds :meth:`budget_penalty` to its penalty and calls ``super()`` from any
    :meth:`~Method.init`, :meth:`~Method.before_update` or :meth:`~Method.after_update` it
    overrides; this class extends :meth:`~Method.resolve`, those three, :meth:`~Method.metrics`
    and :meth:`~Method.report`, and does nothing without a target. The method's state must be a
    dict; the budget's lives under :data:`STATE_KEY`.
    """

    budget_replaces: ClassVar[str]
    """The config field of the sparsity penalty's weight, set to 0 under a target."""
    default_target_kp: ClassVar[float] = 0.0
    """``target_kp`` unless given: 0 (integral action alone) for gates that follow the budget's
    gradient without lag (``l1``, ``bounded_lp``); the stochastic-gate methods set their own."""

    @classmethod
    def resolve(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """Under a target, the replaced penalty weight is 0 (given another value: an error), the
        warm-up half the run unless given, and the parameter average off unless asked for: the
        multipliers steer the trained gates, and an average's gates lag them (an MLP l0_hc run
        at 0.999 would evaluate a network larger than the budget)."""
        target = requested_target(config)
        if target is None:
            return super().resolve(config)
        field = cls.budget_replaces
        value = config.get(field)
        if value is not None and any(float(v) != 0.0 for v in _as_tuple(value)):
            raise ConfigError(
                f"config.{field} and config.target_{target.kind} are alternatives: a target "
                f"replaces the {field} penalty by a Lagrangian; drop --config.{field}"
            )
        config = copy.deepcopy(config)
        with config.unlocked():
            config[field] = 0.0
        resolved = super().resolve(config)
        with resolved.unlocked():
            if resolved.get("target_kp") is None:
                resolved.target_kp = cls.default_target_kp
            if resolved.get("target_warmup_epochs") is None:
                resolved.target_warmup_epochs = 0.5 * float(resolved.get("epochs", 1))
            if "ema_decay" in resolved and resolved.ema_decay is None:
                resolved.ema_decay = 0.0  # an average's gates lag the ones the budget steers
        if resolved.target_measure not in MEASURES:
            raise ConfigError(
                f"config.target_measure must be one of {MEASURES}, got {resolved.target_measure!r}"
            )
        if min(resolved.target_warmup_epochs, resolved.target_lr, resolved.target_kp) < 0:
            raise ConfigError(
                "config.target_warmup_epochs, config.target_lr and config.target_kp must be >= 0"
            )
        return resolved

    @property
    def target(self) -> Target | None:
        return requested_target(self.config)

    def budget_surrogate(self, model: GatedModel) -> dict[str, jax.Array]:
        """Differentiable per-unit keep values of every gate: P(z != 0) here."""
        return {name: gate.prob_nonzero() for name, gate in model.gates.items()}

    def budget_size(self, model: GatedModel) -> jax.Array:
        """s, the network's size fraction (see the module docstring)."""
        target = self.target
        expected = size_fraction(model, self.budget_surrogate(model), target.kind)
        if self.config.target_measure == "expected":
            return expected
        masks = {
            name: jax.lax.stop_gradient(active(gate.test_gate()))
            for name, gate in model.gates.items()
        }
        tested = size_fraction(model, masks, target.kind)
        return tested + expected - jax.lax.stop_gradient(expected)

    def warmup_steps(self) -> float:
        return float(self.config.target_warmup_epochs) * self.run.steps_per_epoch

    def init(self, model: GatedModel) -> MethodState:
        state = super().init(model)
        if self.target is None:
            return state
        zero = jnp.zeros((), jnp.float32)
        size = jnp.asarray(self.budget_size(model), jnp.float32)
        return {
            **state,
            STATE_KEY: {"lambda1": zero, "lambda2": zero, "target": size, "size": size,
                        "start": size},
        }

    def before_update(self, model: GatedModel, state: MethodState, step: jax.Array) -> MethodState:
        state = super().before_update(model, state, step)
        if self.target is None:
            return state
        budget = state[STATE_KEY]
        target = ramped_target(self.target.fraction, step, self.warmup_steps(), budget["start"])
        return {**state, STATE_KEY: {**budget, "target": target}}

    def budget_penalty(self, model: GatedModel, state: MethodState) -> jax.Array:
        """L_budget at the state's multipliers and target (0 without a target): the method
        adds it to its penalty, in place of the sparsity penalty it replaces."""
        if self.target is None:
            return jnp.zeros(())
        return lagrangian(
            self.budget_size(model), state[STATE_KEY], float(self.config.target_kp)
        )

    def after_update(self, model, state, step, key):
        state = super().after_update(model, state, step, key)
        if self.target is None:
            return state
        budget = ascend(state[STATE_KEY], self.budget_size(model), float(self.config.target_lr))
        return {**state, STATE_KEY: budget}

    def metrics(self, state: MethodState) -> dict[str, jax.Array]:
        if self.target is None:
            return super().metrics(state)
        return {**super().metrics(state), **{f"budget/{k}": v for k, v in state[STATE_KEY].items()}}

    def report(self, model: GatedModel, state: MethodState) -> dict[str, Any]:
        """The multipliers, the last target and size at the end of the run (``budget/...``);
        the engine adds the achieved fraction (:func:`target_report`)."""
        entries = super().report(model, state)
        if self.target is None:
            return entries
        budget = jax.device_get(state[STATE_KEY])
        return {**entries, **{f"budget/{k}": float(v) for k, v in budget.items()}}


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
