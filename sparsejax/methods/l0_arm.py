"""L0-ARM and L0-AR: exact binary gates trained with the ARM or AR estimator (Li & Ji 2019)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.estimators import binary
from sparsejax.gates.binary import BinaryGate
from sparsejax.methods.base import cross_entropy
from sparsejax.methods.fields import Field
from sparsejax.methods.l0 import L0Method
from sparsejax.methods.registry import register
from sparsejax.models.base import GatedModel, GateSlot
from sparsejax.models.state import without_state_updates

BINARY_GATE_FIELDS = {
    "test_rule": Field("binary", "test-time gates: binary (1 where pi > threshold) or scaled (pi)"),
    "threshold": Field(0.5, "the binary test rule's threshold on pi"),
}
"""The test rule of binary gates (L0-ARM / AR, Dep-L0-ARM)."""


@register
class L0Binary(L0Method):
    """Loss = E_z[CE(f(x; theta * z))] + R with z ~ Bernoulli(g(phi)), R with q = pi.

    The data term goes through :func:`sparsejax.estimators.binary.expectation`: its value is the
    CE at the sampled gates, its gradient for the network weights is the ordinary one at those
    gates, and its gradient for phi is the ARM estimate (the network is run a second time on the
    antithetic gates, BatchNorm statistics of that run discarded) or the AR estimate.

    Config: ``k`` (7), ``gate_fn`` (sigmoid | hard_sigmoid), ``test_rule`` (binary | scaled),
    ``threshold`` (0.5), ``per_example_gates`` (per-example gates use per-example losses, which
    keeps the estimator unbiased).

    LeNet-5's convolutions are initialised He-normal with the fan-out, as in the reference code
    (its ``ArmConv2d``); its dense layers, like every L0 method's, with the fan-in.
    """

    name = "l0_arm"
    estimator = "arm"
    fields = {
        **L0Method.fields,
        **BINARY_GATE_FIELDS,
        "k": Field(7.0, "the gate function's slope: pi = g(k phi)"),
        "gate_fn": Field("sigmoid", "g: sigmoid or hard_sigmoid"),
    }

    def model_options(self) -> dict[str, Any]:
        """LeNet-5: ``conv_fan="fan_out"``."""
        return {"conv_fan": "fan_out"} if self.config.get("model") == "lenet5" else {}

    def make_gate(self, slot: GateSlot, rngs: nnx.Rngs) -> BinaryGate:
        config = self.config
        return BinaryGate(
            slot.shape,
            rngs=rngs,
            droprate_init=self.droprate_init(slot),
            k=config.k,
            gate_fn=config.gate_fn,
            test_rule=config.test_rule,
            threshold=config.threshold,
            per_example=self.per_example(slot),
        )

    def objective(self, model, state, images, labels, key):
        phi = {name: gate.phi[...] for name, gate in model.gates.items()}
        loss, logits = binary_gate_data_loss(
            model, images, labels, phi, key,
            estimator=self.estimator,
            gate_fn=self.config.gate_fn,
            k=self.config.k,
            per_example=bool(self.config.get("per_example_gates", False)),
        )
        return self.loss_and_parts(loss, self.penalty(model, state), logits)


def binary_gate_data_loss(
    model: GatedModel,
    images: jax.Array,
    labels: jax.Array,
    phi: dict[str, jax.Array],
    key: jax.Array,
    *,
    estimator: str,
    gate_fn: str,
    k: float,
    per_example: bool,
) -> tuple[jax.Array, jax.Array]:
    """The data term E_z[CE] over binary gates z ~ Bernoulli(g(k phi)) of every slot in ``phi``,
    as :func:`sparsejax.estimators.binary.expectation` (its ``jax.grad`` with respect to ``phi``
    is the ARM / AR estimate), and the logits of the main pass.

    Per-example gates (``per_example``) use per-example losses, which keeps the estimator
    unbiased. The BatchNorm statistics of the main pass are kept and those of the antithetic
    pass discarded, so the model's state moves once per step.
    """

    def data_loss(z):
        logits, new_state = without_state_updates(model, lambda m: m(images, train=True, gates=z))
        losses = cross_entropy(logits, labels)
        return (losses if per_example else jnp.mean(losses)), (logits, new_state)

    loss, (logits, new_state) = binary.expectation(
        data_loss,
        phi,
        key,
        estimator=estimator,
        gate_fn=gate_fn,
        k=k,
        sample_shape=(images.shape[0],) if per_example else (),
        has_aux=True,
    )
    nnx.update(model, new_state)
    return loss, logits


@register
class L0AR(L0Binary):
    """L0-AR: the same gates with the single-evaluation AR estimator f(z)(1 - 2u)."""

    name = "l0_ar"
    estimator = "ar"
