"""The interface shared by every gate module.

A gate module owns the parameters of a set of stochastic gates ``z`` and produces their values:
a random draw in training (noise from the explicit ``"gates"`` RNG stream) and the method's
deterministic test-time rule in evaluation. The layer that a gate belongs to multiplies the values
into its activations or its kernel (see :mod:`sparsejax.gates.apply`).
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

GATE_STREAM = "gates"
"""Name of the :class:`flax.nnx.Rngs` stream that gate noise is drawn from."""


class GateParam(nnx.Param):
    """A trainable gate parameter (``log_alpha``, ``phi``); kept apart from network weights so
    that methods can give gates their own optimizer and projections."""


def logit(p: float) -> float:
    """ln(p / (1 - p)), the inverse of the sigmoid."""
    return float(np.log(p) - np.log1p(-p))


class Gate(nnx.Module, abc.ABC):
    """Base class of gate modules.

    Attributes:
      shape: shape of one draw of the gates, e.g. ``(units,)`` for neuron or channel gates or a
        kernel's shape for weight gates.
      per_example: if True, training draws independent gates for every example, of shape
        ``(batch,) + shape``; otherwise one draw is shared by the whole batch.
    """

    shape: tuple[int, ...]
    per_example: bool

    def noise_shape(self, batch_size: int | None) -> tuple[int, ...]:
        """Shape of a training draw: ``(batch_size,) + shape`` for per-example gates."""
        if not self.per_example:
            return self.shape
        if batch_size is None:
            raise ValueError("per-example gates need the batch size to draw their noise")
        return (batch_size, *self.shape)

    @abc.abstractmethod
    def sample(self, rngs: nnx.Rngs, batch_size: int | None = None) -> jax.Array:
        """A training draw of the gate values, noise from ``rngs.gates``."""

    @abc.abstractmethod
    def test_gate(self) -> jax.Array:
        """The deterministic gate values used at test time, of shape ``shape``."""

    @abc.abstractmethod
    def prob_nonzero(self) -> jax.Array:
        """P(z != 0) for every gate, of shape ``shape``: the expected-L0 contribution."""

    def __call__(
        self, *, train: bool, rngs: nnx.Rngs | None = None, batch_size: int | None = None
    ) -> jax.Array:
        """Gate values: a random draw when ``train`` else the deterministic test-time rule."""
        if not train:
            return self.test_gate()
        if rngs is None:
            raise ValueError(
                f"{type(self).__name__} samples in training mode and needs "
                f"rngs=nnx.Rngs({GATE_STREAM}=key)"
            )
        return self.sample(rngs, batch_size)


def active(test_gate: jax.Array) -> jax.Array:
    """1.0 where a deterministic gate keeps its group (value > 0), else 0.0."""
    return (test_gate > 0).astype(jnp.float32)
