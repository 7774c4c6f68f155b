"""L0-HC: hard-concrete gates and the expected-L0 penalty (Louizos, Welling & Kingma 2018)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sparsejax.gates.base import GATE_STREAM
from sparsejax.gates.hard_concrete import LOG_ALPHA_MAX, LOG_ALPHA_MIN, HardConcreteGate
from sparsejax.methods.base import cross_entropy
from sparsejax.methods.fields import Field
from sparsejax.methods.l0 import L0Method
from sparsejax.methods.registry import register
from sparsejax.models.base import GatedModel, GateSlot


@register
class L0HardConcrete(L0Method):
    """Loss = CE(f(x; theta * z)) + R with z from hard-concrete gates, R of
    :mod:`sparsejax.methods.penalties` with q = P(z != 0).

    Config: ``temperature`` (beta, 2/3), ``clamp_log_alpha`` (clip log_alpha to
    [ln 0.01, ln 100] after every update, as the reference does), ``reference_bias_sign``.
    """

    name = "l0_hc"
    fields = {
        **L0Method.fields,
        "temperature": Field(2.0 / 3.0, "beta, the temperature of the hard-concrete gates"),
        "clamp_log_alpha": Field(True, "clip log_alpha to [ln 0.01, ln 100] after every update"),
    }
    ema_default = Field(0.0, L0Method.ema_default.help, per_model={"mlp": 0.999})
    """Evaluate the MLP's parameter average, decay 0.999, as the reference does ("temporal
    averaging"). Its LeNet-5 script parses ``--beta_ema 0.999`` but never passes it to the
    model (whose default is 0), so LeNet-5 trains and evaluates without one; its WRN script
    computes an average with 0.99 but never loads it for validation: both are off here."""

    def make_gate(self, slot: GateSlot, rngs: nnx.Rngs) -> HardConcreteGate:
        return HardConcreteGate(
            slot.shape,
            rngs=rngs,
            droprate_init=self.droprate_init(slot),
            beta=self.config.temperature,
            per_example=self.per_example(slot),
        )

    def objective(self, model, state, images, labels, key):
        logits = model(images, train=True, rngs=nnx.Rngs(**{GATE_STREAM: key}))
        data_loss = jnp.mean(cross_entropy(logits, labels))
        return self.loss_and_parts(data_loss, self.penalty(model, state), logits)

    def project(self, model: GatedModel) -> None:
        if self.config.clamp_log_alpha:
            for gate in model.gates.values():
                gate.log_alpha[...] = jnp.clip(gate.log_alpha[...], LOG_ALPHA_MIN, LOG_ALPHA_MAX)
