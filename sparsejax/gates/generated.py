"""Gates whose logits come from a shared :class:`~sparsejax.gates.generator.GateGenerator`.

Each gated slot keeps its own gate module (so that the model's forward pass and the gate reports
call ``test_gate()`` / ``prob_nonzero()`` per slot as for any gate), but the module owns no
parameters: it holds a reference to the one generator of the model and reads its slot's logits
from it. The method's ``make_gates`` builds the generator over all of the model's slots and
attaches every slot's gate to it while the model is built; the model reaches the generator only
through its gates. The methods' training objectives evaluate the generator once per step and draw every
slot's gates from those logits (:meth:`GeneratedGate.draw`).
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.estimators import binary, hard_concrete
from sparsejax.gates.base import GATE_STREAM, Gate
from sparsejax.gates.binary import TEST_RULES, TestRule
from sparsejax.gates.generator import GateGenerator


class GeneratedGate(Gate):
    """Unit gates of slot ``slot`` with logits ``generator()[slot]``.

    Subclasses give the gate distribution as a function of the logits: :meth:`draw`,
    :meth:`deterministic` and :meth:`keep_probability`.
    """

    def __init__(self, slot: str, units: int, *, per_example: bool):
        self.slot = slot
        self.shape = (units,)
        self.per_example = per_example
        self.generator: GateGenerator | None = nnx.data(None)

    def attach(self, generator: GateGenerator) -> None:
        """Read this slot's logits from ``generator`` from now on."""
        if self.slot not in generator.slot_names:
            raise ValueError(
                f"the gate generator makes logits for {generator.slot_names}, not for slot "
                f"{self.slot!r}"
            )
        self.generator = generator

    def logits(self) -> jax.Array:
        """This slot's logits, ``(units,)``."""
        if self.generator is None:
            raise ValueError(
                f"the gate of slot {self.slot!r} has no generator; build the model with a "
                "Dep-L0 method's make_gates, which attaches one"
            )
        return self.generator()[self.slot]

    @abc.abstractmethod
    def draw(self, logits: jax.Array, key: jax.Array, batch_size: int | None) -> jax.Array:
        """A training draw of the gates given their logits."""

    @abc.abstractmethod
    def deterministic(self, logits: jax.Array) -> jax.Array:
        """The test-time gate values given the logits."""

    @abc.abstractmethod
    def keep_probability(self, logits: jax.Array) -> jax.Array:
        """P(z != 0) given the logits."""

    def sample(self, rngs: nnx.Rngs, batch_size: int | None = None) -> jax.Array:
        return self.draw(self.logits(), getattr(rngs, GATE_STREAM)(), batch_size)

    def test_gate(self) -> jax.Array:
        return self.deterministic(self.logits())

    def prob_nonzero(self) -> jax.Array:
        return self.keep_probability(self.logits())


class GeneratedHardConcreteGate(GeneratedGate):
    """Hard-concrete gates (Louizos et al. 2018, eq. 10-13) with log_alpha from the generator.

    Training: z = clip(sigmoid((ln u - ln(1-u) + log_alpha)/beta)*(zeta-gamma)+gamma, 0, 1),
    differentiable in log_alpha and hence in the generator's parameters; test:
    clip(sigmoid(log_alpha)*(zeta-gamma)+gamma, 0, 1); P(z != 0) =
    sigmoid(log_alpha - beta*ln(-gamma/zeta)).
    """

    def __init__(
        self,
        slot: str,
        units: int,
        *,
        beta: float = hard_concrete.BETA,
        gamma: float = hard_concrete.GAMMA,
        zeta: float = hard_concrete.ZETA,
        per_example: bool = True,
    ):
        super().__init__(slot, units, per_example=per_example)
        self.beta, self.gamma, self.zeta = beta, gamma, zeta

    def draw(self, logits: jax.Array, key: jax.Array, batch_size: int | None) -> jax.Array:
        return hard_concrete.sample(
            key,
            logits,
            beta=self.beta,
            gamma=self.gamma,
            zeta=self.zeta,
            shape=self.noise_shape(batch_size),
        )

    def deterministic(self, logits: jax.Array) -> jax.Array:
        return hard_concrete.deterministic(logits, gamma=self.gamma, zeta=self.zeta)

    def keep_probability(self, logits: jax.Array) -> jax.Array:
        return hard_concrete.prob_nonzero(logits, beta=self.beta, gamma=self.gamma, zeta=self.zeta)


class GeneratedBinaryGate(GeneratedGate):
    """Binary gates z ~ Bernoulli(pi), pi = sigmoid(logit), the logit from the generator
    (the L0-ARM gate of Li & Ji 2019 with the generator output as its logit, i.e. k*phi).

    Training draws z = 1[u < pi] with pi held constant (the ARM/AR estimators of
    :mod:`sparsejax.estimators.binary` give the logits their gradient). Test time keeps a gate
    when pi >= threshold, with the value 1 (``"binary"``) or pi (``"scaled"``, the reference).
    """

    def __init__(
        self,
        slot: str,
        units: int,
        *,
        test_rule: TestRule = "binary",
        threshold: float = 0.5,
        per_example: bool = False,
    ):
        if test_rule not in TEST_RULES:
            raise ValueError(f"test_rule must be one of {TEST_RULES}, got {test_rule!r}")
        super().__init__(slot, units, per_example=per_example)
        self.test_rule, self.threshold = test_rule, threshold

    def draw(self, logits: jax.Array, key: jax.Array, batch_size: int | None) -> jax.Array:
        pi = jax.lax.stop_gradient(self.keep_probability(logits))
        u = jax.random.uniform(key, self.noise_shape(batch_size))
        z_main, _ = binary.antithetic_pair(u, pi)
        return z_main

    def deterministic(self, logits: jax.Array) -> jax.Array:
        pi = self.keep_probability(logits)
        value = pi if self.test_rule == "scaled" else jnp.ones_like(pi)
        return jnp.where(pi >= self.threshold, value, 0.0)

    def keep_probability(self, logits: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(logits)
