"""The ungated baseline: cross-entropy plus L2 on every parameter."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.methods.base import Method, MethodState, cross_entropy
from sparsejax.methods.penalties import gated_l2
from sparsejax.methods.registry import register
from sparsejax.models.base import GatedModel


@register
class Dense(Method):
    """No gates; loss = mean CE + (l2/2) ||theta||^2."""

    name = "dense"

    def penalty(self, model: GatedModel, state: MethodState) -> jax.Array:
        return gated_l2(model, {}, self.config.l2)

    def objective(self, model, state, images, labels, key):
        logits = model(images, train=True)
        return self.loss_and_parts(
            jnp.mean(cross_entropy(logits, labels)), self.penalty(model, state), logits
        )
