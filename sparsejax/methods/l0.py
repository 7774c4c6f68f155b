"""What the L0 methods share: per-slot lambdas, gate initial drop rates and the L0 penalty."""

from __future__ import annotations

import jax

from sparsejax.errors import ConfigError
from sparsejax.methods.base import Method, per_slot
from sparsejax.methods.penalties import expected_l0, gated_l2
from sparsejax.models.base import GatedModel, GateSlot

DEFAULT_LAMBDAS = {
    "mlp": (0.1, 0.1, 0.1),
    "lenet5": (10.0, 0.5, 0.1, 10.0),
    "wrn28_10": (0.001,),
    "*": (0.1,),
}
"""lambda per gate slot in units of 1/N: Louizos et al. (2018) MLP "L0" and LeNet-5 "L0-sep",
which are also the L0-ARM defaults, and WRN-28-10's 0.001/N (the smaller of the L0-HC paper's
two WRN settings, and the value the L0-ARM code's README trains WRN with)."""


def keep_probabilities(model: GatedModel) -> dict[str, jax.Array]:
    """P(z != 0) of every gate, by slot."""
    return {name: gate.prob_nonzero() for name, gate in model.gates.items()}


class L0Method(Method):
    """Config fields: ``lambdas`` (one value or one per slot, in units of 1/N; None: the
    paper's for the model), ``droprate_init`` (None: the reference's per slot), ``l2``,
    ``per_example_gates``, ``model`` (name, to pick default lambdas)."""

    per_slot_fields = ("lambdas",)

    def prepare_model(self, model: GatedModel) -> None:
        self.lambdas = per_slot(
            self.config.get("lambdas"),
            model.gate_slots,
            DEFAULT_LAMBDAS,
            self.config.get("model", "*") if model.granularity == "unit" else "*",
            "lambdas",
        )

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

    def penalty(self, model: GatedModel) -> jax.Array:
        probs = keep_probabilities(model)
        return expected_l0(
            model.gate_slots,
            probs,
            self.lambdas,
            self.num_train,
            reference_bias_sign=bool(self.config.get("reference_bias_sign", False)),
        ) + gated_l2(model, probs, self.config.l2)
