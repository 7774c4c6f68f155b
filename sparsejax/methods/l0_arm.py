"""L0-ARM and L0-AR: exact binary gates trained with the ARM or AR estimator (Li & Ji 2019)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sparsejax.estimators import binary
from sparsejax.gates.binary import BinaryGate
from sparsejax.methods.base import cross_entropy
from sparsejax.methods.l0 import L0Method
from sparsejax.models.base import GateSlot
from sparsejax.models.state import without_state_updates


class L0Binary(L0Method):
    """Loss = E_z[CE(f(x; theta * z))] + R with z ~ Bernoulli(g(phi)), R with q = pi.

    The data term goes through :func:`sparsejax.estimators.binary.expectation`: its value is the
    CE at the sampled gates, its gradient for the network weights is the ordinary one at those
    gates, and its gradient for phi is the ARM estimate (the network is run a second time on the
    antithetic gates, BatchNorm statistics of that run discarded) or the AR estimate.

    Config: ``k`` (7), ``gate_fn`` (sigmoid | hard_sigmoid), ``test_rule`` (binary | scaled),
    ``threshold`` (0.5), ``per_example_gates`` (per-example gates use per-example losses, which
    keeps the estimator unbiased).
    """

    name = "l0_arm"
    estimator = "arm"

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

    def objective(self, model, images, labels, key):
        per_example = bool(self.config.get("per_example_gates", False))
        phi = {name: gate.phi[...] for name, gate in model.gates.items()}

        def data_loss(z):
            logits, new_state = without_state_updates(
                model, lambda m: m(images, train=True, gates=z)
            )
            losses = cross_entropy(logits, labels)
            return (losses if per_example else jnp.mean(losses)), (logits, new_state)

        loss, (logits, new_state) = binary.expectation(
            data_loss,
            phi,
            key,
            estimator=self.estimator,
            gate_fn=self.config.gate_fn,
            k=self.config.k,
            sample_shape=(images.shape[0],) if per_example else (),
            has_aux=True,
        )
        nnx.update(model, new_state)
        return self.loss_and_parts(loss, self.penalty(model), logits)


class L0AR(L0Binary):
    """L0-AR: the same gates with the single-evaluation AR estimator f(z)(1 - 2u)."""

    name = "l0_ar"
    estimator = "ar"
