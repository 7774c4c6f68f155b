"""What the L0 methods share: per-slot lambdas, gate initial drop rates and the L0 penalty."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from sparsejax.errors import ConfigError
from sparsejax.methods.base import MethodState, per_slot
from sparsejax.methods.budget import (
    BUDGET_GATE_LEARNING_RATE,
    LAGRANGIAN_FIELDS,
    STOCHASTIC_GATE_KP,
    Budgeted,
    requested_target,
)
from sparsejax.methods.fields import ANY_MODEL, Field
from sparsejax.methods.penalties import expected_l0, gated_l2
from sparsejax.models.base import GatedModel, GateSlot

DEFAULT_LAMBDAS = {
    "mlp": (0.1, 0.1, 0.1),
    "lenet5": (10.0, 0.5, 0.1, 10.0),
    "wrn28_10": (0.001,),
    ANY_MODEL: (0.1,),
}
"""lambda per gate slot in units of 1/N: Louizos et al. (2018) MLP "L0" and LeNet-5 "L0-sep",
which are also the L0-ARM defaults, and WRN-28-10's 0.001/N (the smaller of the L0-HC paper's
two WRN settings, and the value the L0-ARM code's README trains WRN with). At weight
granularity every model takes the ``"*"`` row."""

L0_FIELDS = {
    "lambdas": Field(
        None,
        "lambda per gate slot in units of 1/N, one value or one per slot (None: the paper's "
        "for the model at unit granularity, 0.1 at weight granularity)",
        kind=object,
    ),
    "droprate_init": Field(
        None, "initial drop rate of every gate (None: the reference's per slot)", kind=float
    ),
    "per_example_gates": Field(False, "draw the gates per example instead of per batch"),
    "reference_bias_sign": Field(
        False, "count a conv gate's bias with -lambda, as the L0-HC reference code does"
    ),
    **LAGRANGIAN_FIELDS,
}


def keep_probabilities(model: GatedModel) -> dict[str, jax.Array]:
    """P(z != 0) of every gate, by slot."""
    return {name: gate.prob_nonzero() for name, gate in model.gates.items()}


class L0Method(Budgeted):
    """The expected-L0 penalty with per-slot lambdas (:data:`L0_FIELDS`) plus the gated L2
    (``l2``, shared); under a target (:mod:`sparsejax.methods.budget`) the lambdas are 0 and
    the budget's Lagrangian takes the expected L0's place."""

    fields = L0_FIELDS
    budget_replaces = "lambdas"
    default_target_kp = STOCHASTIC_GATE_KP

    @classmethod
    def resolve(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The fields' defaults, the lambdas by model at unit granularity only."""
        resolved = super().resolve(config)
        if resolved.get("lambdas") is None:
            unit = config.get("granularity", "unit") == "unit"
            model = config.get("model") if unit else ANY_MODEL
            with resolved.unlocked():
                resolved.lambdas = DEFAULT_LAMBDAS.get(model, DEFAULT_LAMBDAS[ANY_MODEL])
        return resolved

    @classmethod
    def gate_optimizer_defaults(cls, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """The network's optimizer; under a target, gates on Adam learn at least at
        :data:`~sparsejax.methods.budget.BUDGET_GATE_LEARNING_RATE`, so that they can follow
        the target's ramp."""
        defaults = super().gate_optimizer_defaults(config)
        if requested_target(config) is not None and defaults["gate_optimizer"] == "adam":
            defaults["gate_learning_rate"] = max(
                defaults["gate_learning_rate"], BUDGET_GATE_LEARNING_RATE
            )
        return defaults

    def lambdas(self, model: GatedModel) -> dict[str, float]:
        """lambda of every gate slot of ``model``."""
        return per_slot(self.config.lambdas, model.gate_slots, "lambdas")

    def init(self, model: GatedModel) -> MethodState:
        self.lambdas(model)
        return super().init(model)

    def droprate_init(self, slot: GateSlot) -> float:
        value = self.config.get("droprate_init")
        return slot.droprate_init if value is None else float(value)

    def per_example(self, slot: GateSlot) -> bool:
        per_example = bool(self.config.get("per_example_gates", False))
        if per_example and slot.axis is None:
            raise ConfigError(
                f"slot {slot.name!r} has weight gates, which are shared by the batch; "
                "set config.per_example_gates=False or use unit granularity"
            )
        return per_example

    def penalty(self, model: GatedModel, state: MethodState) -> jax.Array:
        probs = keep_probabilities(model)
        return expected_l0(
            model.gate_slots,
            probs,
            self.lambdas(model),
            self.num_train,
            reference_bias_sign=bool(self.config.reference_bias_sign),
        ) + gated_l2(model, probs, self.config.l2) + self.budget_penalty(model, state)
