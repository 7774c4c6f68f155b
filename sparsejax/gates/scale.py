"""Deterministic, learnable per-group scale gates (network slimming, Liu et al. ICCV 2017;
bounded-Lp group gating, Mummadi et al. GCPR 2019)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.gates.base import Gate, GateParam

INITIAL_VALUE = 1.0
"""Every gate starts fully open, so the gated network starts as the plain one."""


class ScaleGate(Gate):
    """Gates z = value, a trainable scale per group (channel, neuron or weight), initialised to 1.

    The same value is used in training and evaluation; no noise is drawn. A group is pruned when
    its value is exactly 0 (``prob_nonzero`` is 1[value != 0]), which proximal updates of the
    methods that use these gates produce. Those methods keep the values nonnegative: the group's
    own weights (or the BatchNorm scale in front of the gate) carry the sign, so this loses
    nothing, and the reports' rule "a gate keeps its group when its value is > 0" holds.
    """

    def __init__(self, shape: int | tuple[int, ...]):
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.per_example = False
        self.value = GateParam(jnp.full(self.shape, INITIAL_VALUE, jnp.float32))

    def sample(self, rngs: nnx.Rngs | None = None, batch_size: int | None = None) -> jax.Array:
        return self.value[...]

    def test_gate(self) -> jax.Array:
        return self.value[...]

    def prob_nonzero(self) -> jax.Array:
        return (self.value[...] != 0).astype(jnp.float32)

    def __call__(
        self, *, train: bool, rngs: nnx.Rngs | None = None, batch_size: int | None = None
    ) -> jax.Array:
        """The gate values, in training and evaluation alike (no RNG needed)."""
        return self.value[...]
