"""Hard-concrete gates (Louizos, Welling & Kingma 2018, arXiv 1712.01312)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.estimators import hard_concrete
from sparsejax.gates.base import GATE_STREAM, Gate, GateParam, logit

LOG_ALPHA_MIN = float(np.log(1e-2))
LOG_ALPHA_MAX = float(np.log(1e2))
"""The reference clamps log_alpha to [ln 0.01, ln 100] after every optimizer step."""

INIT_STD = 1e-2
"""Standard deviation of the log_alpha initialisation around logit(1 - droprate_init)."""


class HardConcreteGate(Gate):
    """Gates z = clip(sigmoid((ln u - ln(1-u) + log_alpha)/beta)*(zeta-gamma)+gamma, 0, 1).

    Training draws the reparameterised sample of eq. 10 of the paper (gradients reach
    ``log_alpha`` through the sample); evaluation uses
    ``clip(sigmoid(log_alpha)*(zeta-gamma)+gamma, 0, 1)``, a continuous value that is exactly
    zero for log_alpha <= -ln 11.

    ``log_alpha ~ N(logit(1 - droprate_init), 0.01^2)`` at initialisation, as in the reference.
    """

    def __init__(
        self,
        shape: int | tuple[int, ...],
        *,
        rngs: nnx.Rngs,
        droprate_init: float = 0.5,
        beta: float = hard_concrete.BETA,
        gamma: float = hard_concrete.GAMMA,
        zeta: float = hard_concrete.ZETA,
        per_example: bool = False,
    ):
        if not 0.0 < droprate_init < 1.0:
            raise ValueError(f"droprate_init must lie in (0, 1), got {droprate_init}")
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.per_example = per_example
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        mean = logit(1.0 - droprate_init)
        self.log_alpha = GateParam(
            mean + INIT_STD * jax.random.normal(rngs.params(), self.shape, jnp.float32)
        )

    def sample(self, rngs: nnx.Rngs, batch_size: int | None = None) -> jax.Array:
        return hard_concrete.sample(
            getattr(rngs, GATE_STREAM)(),
            self.log_alpha[...],
            beta=self.beta,
            gamma=self.gamma,
            zeta=self.zeta,
            shape=self.noise_shape(batch_size),
        )

    def test_gate(self) -> jax.Array:
        return hard_concrete.deterministic(self.log_alpha[...], gamma=self.gamma, zeta=self.zeta)

    def prob_nonzero(self) -> jax.Array:
        return hard_concrete.prob_nonzero(
            self.log_alpha[...], beta=self.beta, gamma=self.gamma, zeta=self.zeta
        )
