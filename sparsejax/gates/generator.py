"""The Dep-L0 gate generator: one small MLP that produces the gate logits of every gated layer
(Li & Ji 2021, "Dep-L0: Improving L0-based Network Sparsification via Dependency Modeling",
arXiv 2107.00070).

The generator is a chain of dense layers, one per gated layer, fed with a constant all-ones
vector:

    h_0 = 1 (of width d_0),   a_l = W_l h_{l-1} + b_l,   h_l = log_alpha_l = ln(100) * tanh(a_l)

so layer l's logits are a deterministic function of layer l-1's: the scaled tanh is both the
output squashing (it bounds the logits by the L0-HC clamp range) and the only nonlinearity. With
``dependency="forward"`` the chain runs over the gated layers from input to output, with
``"backward"`` from output to input; either way the logits come back in network order. d_0 is
the width of the first layer of the chain unless given: the reference's d_0 for ResNet-56 and
ResNet-50 in both directions and for VGG-16 forward (its VGG-16 backward generator has 1.67M
parameters, which matches d_0 = 64 rather than 512). As the input is constant, d_0 only
reparameterises the first pre-activation a_1 = W_1 1 + b_1, whose initial distribution has
variance 1/3 + 0.01^2 for every d_0.

Initialisation as the reference: kernels uniform in +-1/sqrt(fan_in) (PyTorch's ``Linear``
default), biases N(3, 0.01^2), so that the initial logits are about +3 to +4.6 (most gates open).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.gates.base import GateParam
from sparsejax.gates.hard_concrete import LOG_ALPHA_MAX

DEPENDENCIES: tuple[str, ...] = ("forward", "backward")
BIAS_INIT_MEAN = 3.0
BIAS_INIT_STD = 1e-2
LOGIT_BOUND = LOG_ALPHA_MAX
"""ln(100): the scaled tanh maps onto (-ln 100, ln 100)."""


class GeneratorLayer(nnx.Module):
    """a = h @ W + b with gate parameters W ``(in, out)`` and b ``(out,)``."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_features)
        self.kernel = GateParam(
            jax.random.uniform(
                rngs.params(), (in_features, out_features), jnp.float32, -bound, bound
            )
        )
        self.bias = GateParam(
            BIAS_INIT_MEAN
            + BIAS_INIT_STD * jax.random.normal(rngs.params(), (out_features,), jnp.float32)
        )

    def __call__(self, h: jax.Array) -> jax.Array:
        return h @ self.kernel[...] + self.bias[...]


class GateGenerator(nnx.Module):
    """Gate logits of every slot from a chain of dense layers; see the module docstring.

    Args:
      widths: number of gates of each slot, by slot name, in network order.
      dependency: ``"forward"`` (chain from the first slot to the last) or ``"backward"``
        (from the last to the first).
      rngs: ``params`` stream for the initialisation.
      input_width: d_0, the width of the constant input; None: the width of the first slot of
        the chain.
    """

    def __init__(
        self,
        widths: Mapping[str, int],
        *,
        dependency: str,
        rngs: nnx.Rngs,
        input_width: int | None = None,
    ):
        if dependency not in DEPENDENCIES:
            raise ValueError(f"dependency must be one of {DEPENDENCIES}, got {dependency!r}")
        if not widths:
            raise ValueError("a gate generator needs at least one gated slot")
        bad = {name: w for name, w in widths.items() if int(w) <= 0}
        if bad:
            raise ValueError(f"slot widths must be positive, got {bad}")
        self.slot_names = tuple(widths)
        self.dependency = dependency
        chain_widths = [int(widths[name]) for name in self.chain_order()]
        self.input_width = chain_widths[0] if input_width is None else int(input_width)
        if self.input_width <= 0:
            raise ValueError(f"input_width must be positive, got {input_width}")
        in_widths = [self.input_width, *chain_widths[:-1]]
        self.layers = nnx.List(
            [GeneratorLayer(a, b, rngs=rngs) for a, b in zip(in_widths, chain_widths)]
        )

    def chain_order(self) -> tuple[str, ...]:
        """Slot names in the order the chain visits them."""
        return self.slot_names if self.dependency == "forward" else self.slot_names[::-1]

    def __call__(self) -> dict[str, jax.Array]:
        """log_alpha of every slot, ``{slot name: (width,)}``, in network order."""
        h = jnp.ones((self.input_width,), jnp.float32)
        logits = {}
        for name, layer in zip(self.chain_order(), self.layers):
            h = LOGIT_BOUND * jnp.tanh(layer(h))
            logits[name] = h
        return {name: logits[name] for name in self.slot_names}
