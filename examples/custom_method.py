"""A complete sparsification method written against sparsejax's public interface only.

One-shot magnitude pruning with fine-tuning: train densely, and after the update at
``prune_epoch`` zero the ``sparsity`` fraction of smallest weights of every layer; the masks are
the method's state, so they persist (re-applied after every later update), are checkpointed and
survive a resume. Use it from the command line without installing anything:

    PYTHONPATH=examples python -m experiments.mnist --method=custom_method:CustomMethod \
        --model=mlp --epochs=3 --config.sparsity=0.8 --workdir=runs/custom
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax.methods import Field, Method, MethodState


class CustomMethod(Method):
    """Loss = cross-entropy + (l2/2)||theta||^2; one-shot magnitude pruning per layer."""

    name = "custom_method"
    fields = {
        "sparsity": Field(0.9, "fraction of every layer's weights pruned", {"lenet5": 0.95}),
        "prune_epoch": Field(1.0, "when to prune (fractional epochs)"),
    }

    def init(self, model) -> MethodState:
        """One boolean mask per layer kernel, all True: nothing is pruned yet."""
        return {
            layer.name: jnp.ones(model.layer_module(layer.name).kernel.shape, bool)
            for layer in model.layers
        }

    def objective(self, model, state, images, labels, key):
        logits = model(images, train=True)
        data_loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        return self.loss_and_parts(data_loss, self.penalty(model, state), logits)

    def penalty(self, model, state) -> jax.Array:
        squares = [jnp.sum(model.layer_module(name).kernel[...] ** 2) for name in state]
        return 0.5 * self.config.l2 * sum(squares)

    def after_update(self, model, state, step, key) -> MethodState:
        """At the pruning step choose the masks by magnitude; always re-apply them."""
        prune_now = step + 1 == round(self.config.prune_epoch * self.run.steps_per_epoch)
        masks = {}
        for name, mask in state.items():
            kernel = model.layer_module(name).kernel
            magnitude = jnp.abs(kernel[...])
            threshold = jnp.quantile(magnitude, self.config.sparsity)
            masks[name] = jnp.where(prune_now, magnitude > threshold, mask)
            kernel[...] = jnp.where(masks[name], kernel[...], 0.0)
        return masks

    def report(self, model, state) -> dict[str, Any]:
        """The fraction of pruned weights of every layer, for the run's summary."""
        return {
            f"custom/sparsity/{name}": float(1.0 - jnp.mean(mask)) for name, mask in state.items()
        }
