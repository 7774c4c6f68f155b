"""Exact binary gates z ~ Bernoulli(g(phi)) (Li & Ji 2019, L0-ARM, arXiv 1904.04432)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.estimators import binary
from sparsejax.gates.base import GATE_STREAM, Gate, GateParam, logit

TestRule = Literal["binary", "scaled"]
TEST_RULES: tuple[str, ...] = ("binary", "scaled")
INIT_STD = 1e-2
"""Standard deviation of k*phi around logit(1 - droprate_init) at initialisation."""


class BinaryGate(Gate):
    """Binary gates with keep probability pi = g(phi), trained with ARM or AR.

    ``g`` is the scaled sigmoid sigmoid(k*phi) or the hard sigmoid clip(k*phi/7 + 1/2, 0, 1).
    A training draw is z = 1[u < pi] with u ~ U(0, 1); its antithetic partner 1[u > 1 - pi]
    (same u) is what the ARM estimator evaluates the network on, through
    :func:`sparsejax.estimators.binary.expectation` with the gate values passed to the model
    explicitly.

    Test time keeps a gate when pi >= threshold: ``test_rule="binary"`` gives it the value 1,
    ``"scaled"`` gives it the value pi as the reference code does.

    Initialisation as the reference: phi ~ N(logit(1 - droprate_init)/k, (0.01/k)^2).
    """

    def __init__(
        self,
        shape: int | tuple[int, ...],
        *,
        rngs: nnx.Rngs,
        droprate_init: float = 0.5,
        k: float = 7.0,
        gate_fn: str = "sigmoid",
        test_rule: TestRule = "binary",
        threshold: float = 0.5,
        per_example: bool = False,
    ):
        if not 0.0 < droprate_init < 1.0:
            raise ValueError(f"droprate_init must lie in (0, 1), got {droprate_init}")
        if test_rule not in TEST_RULES:
            raise ValueError(f"test_rule must be one of {TEST_RULES}, got {test_rule!r}")
        binary.gate_probability(jnp.zeros(()), gate_fn=gate_fn, k=k)
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.per_example = per_example
        self.k, self.gate_fn = k, gate_fn
        self.test_rule, self.threshold = test_rule, threshold
        mean = logit(1.0 - droprate_init) / k
        self.phi = GateParam(
            mean + (INIT_STD / k) * jax.random.normal(rngs.params(), self.shape, jnp.float32)
        )

    def probability(self) -> jax.Array:
        """pi = g(phi), the probability that each gate is on."""
        return binary.gate_probability(self.phi[...], gate_fn=self.gate_fn, k=self.k)

    def sample(self, rngs: nnx.Rngs, batch_size: int | None = None) -> jax.Array:
        u = jax.random.uniform(getattr(rngs, GATE_STREAM)(), self.noise_shape(batch_size))
        z_main, _ = binary.antithetic_pair(u, jax.lax.stop_gradient(self.probability()))
        return z_main

    def test_gate(self) -> jax.Array:
        pi = self.probability()
        keep = pi >= self.threshold
        value = pi if self.test_rule == "scaled" else jnp.ones_like(pi)
        return jnp.where(keep, value, 0.0)

    def prob_nonzero(self) -> jax.Array:
        return self.probability()
