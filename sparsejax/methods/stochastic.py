"""Stochastic weight pruning with L1 / L2 regularisation, which shapes node pruning (Ziv,
Goldberger & Riklin Raviv, Neurocomputing 2021; arXiv 2012.03827).

Loss = CE + l1 * sum |W| + (l2/2) ||theta||^2 (and/or the optimizer's ``weight_decay``), over the
kernels (L1) and kernels and biases (L2) of the declared layers. After every optimizer update each
layer's kernel goes through :meth:`StochasticPruning.after_update`:

1. re-masking: pruned entries (mask 0) are set back to zero, so the update cannot revive them;
   with ``allow_regrowth`` they are not, and an entry the update moved off zero is live again
   (soft pruning: zeroing decisions are redrawn every step, the magnitudes keep the memory);
2. zeroing: k = max(0, s_t n - zeros) survivors are drawn, in expectation, with probabilities
   favouring small magnitudes (:mod:`sparsejax.methods.prune_sampling`), s_t the cubic schedule
   from ``initial_sparsity`` to ``final_sparsity`` between ``prune_start_epoch`` and
   ``prune_end_epoch``; they are zeroed and their mask set to 0.

The masks are the method's state, so they are part of every checkpoint. The weight-level
zeros, with the L1 / L2 pull on small weights, leave whole neurons and filters dead;
:meth:`StochasticPruning.report` finds them (:mod:`sparsejax.structure.nodes`) and reports the
node-pruned network.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sparsejax.errors import ConfigError
from sparsejax.methods.base import Method, MethodState, RunInfo, cross_entropy
from sparsejax.methods.budget import TARGET_FIELDS, requested_target
from sparsejax.methods.budget_ratio import layers_ratio
from sparsejax.methods.fields import Field
from sparsejax.methods.penalties import gated_l2
from sparsejax.methods.prune_sampling import cubic_sparsity, sample_zeroed
from sparsejax.methods.registry import register
from sparsejax.models.base import GatedModel
from sparsejax.structure.nodes import node_report

DEFAULT_TEMPERATURE = 0.2
"""T of the zeroing probabilities: a weight at the layer's mean magnitude is e^5 ~ 150 times less
likely to be zeroed than the smallest one."""

FIELDS = {
    "final_sparsity": Field(
        0.9, "per-layer target sparsity, one value or one per declared layer", kind=object
    ),
    "initial_sparsity": Field(0.0, "target when the cubic ramp starts"),
    "prune_start_epoch": Field(0.0, "the ramp's start (fractional epochs)"),
    "prune_end_epoch": Field(
        100.0, "the ramp's end (fractional epochs)", per_model={"mlp": 3.0, "lenet5": 3.0}
    ),
    "prune_temperature": Field(DEFAULT_TEMPERATURE, "T of the zeroing probabilities"),
    "allow_regrowth": Field(False, "False: pruned weights stay zero (persistent masks)"),
    "l1": Field(5e-6, "L1 coefficient on the kernels", per_model={"mlp": 1e-4, "lenet5": 1e-4}),
    **TARGET_FIELDS,
}
"""Our choices (the paper's values were not available): MLP / LeNet-5 on (Fashion-)MNIST for a
few epochs of Adam (measured, see BUILD_NOTES.md); otherwise VGG-16 on CIFAR-10's, for the
300-epoch SGD schedule with weight decay 5e-4 from the recipe (pruning ends at a third of it;
l1 an order of magnitude below the decay)."""


@register
class StochasticPruning(Method):
    """Config: :data:`FIELDS`, ``l2`` (None: 0) and ``weight_decay``. The state is one
    persistent boolean mask per declared layer's kernel (False where pruned)."""

    name = "stochastic"
    fields = FIELDS

    def __init__(self, config: ml_collections.ConfigDict, run: RunInfo):
        super().__init__(config, run)
        config = self.config
        self.temperature = float(config.prune_temperature)
        if self.temperature <= 0:
            raise ConfigError(f"config.prune_temperature must be positive, got {self.temperature}")
        self.initial_sparsity = float(config.initial_sparsity)
        self.regrowth = bool(config.allow_regrowth)
        self.l1 = float(config.l1)
        self.l2 = float(config.get("l2") or 0.0)
        for field, value in (("l1", self.l1), ("l2", self.l2)):
            if value < 0:
                raise ConfigError(f"config.{field} must be >= 0, got {value}")
        start = float(config.prune_start_epoch) * run.steps_per_epoch
        end = float(config.prune_end_epoch) * run.steps_per_epoch
        if not 0 <= start <= end:
            raise ConfigError(
                f"need 0 <= prune_start_epoch <= prune_end_epoch, got {config.prune_start_epoch} "
                f"and {config.prune_end_epoch}"
            )
        self.schedule_steps = (start, end)
        """The cubic ramp's first and last update."""

    def final_sparsity(self, model: GatedModel) -> dict[str, float]:
        """The target sparsity of every declared layer: ``final_sparsity``, or under a target
        (``target_flops`` / ``target_params``) the one ratio of every layer that meets it
        (:mod:`sparsejax.methods.budget_ratio`)."""
        values = self.config.final_sparsity
        layers = model.layers
        if (target := requested_target(self.config)) is not None:
            names = [layer.name for layer in layers]
            values = layers_ratio(
                layers, names, target, structure="weight", what="stochastic pruning"
            )
        if isinstance(values, (int, float)):
            values = [values] * len(layers)
        values = list(values)
        if len(values) != len(layers):
            names = ", ".join(layer.name for layer in layers)
            raise ConfigError(
                f"config.final_sparsity has {len(values)} values but the model has "
                f"{len(layers)} layers ({names}); give one value or one per layer"
            )
        targets = {layer.name: float(v) for layer, v in zip(layers, values)}
        for name, value in targets.items():
            if not self.initial_sparsity <= value < 1.0:
                raise ConfigError(
                    f"final sparsity {value} of layer {name!r} must lie in "
                    f"[initial_sparsity={self.initial_sparsity}, 1)"
                )
        return targets

    def init(self, model: GatedModel) -> MethodState:
        """``{"masks": {layer: all-True mask shaped like its kernel}}``."""
        if model.granularity != "unit":
            raise ConfigError(
                "stochastic pruning finds dead nodes through the models' unit declarations; "
                f"use granularity='unit', not {model.granularity!r}"
            )
        self.final_sparsity(model)
        return {
            "masks": {
                layer.name: jnp.ones(model.layer_module(layer.name).kernel.shape, bool)
                for layer in model.layers
            }
        }

    def l1_penalty(self, model: GatedModel) -> jax.Array:
        """l1 * sum |W| over the kernels, with subgradient 0 at pruned (zero) weights."""
        total = jnp.zeros(())
        for layer in model.layers:
            kernel = model.layer_module(layer.name).kernel[...]
            total = total + jnp.sum(kernel * jax.lax.stop_gradient(jnp.sign(kernel)))
        return self.l1 * total

    def penalty(self, model: GatedModel, state: MethodState) -> jax.Array:
        return self.l1_penalty(model) + gated_l2(model, {}, self.l2)

    def objective(self, model, state, images, labels, key):
        logits = model(images, train=True)
        data_loss = jnp.mean(cross_entropy(logits, labels))
        return self.loss_and_parts(data_loss, self.penalty(model, state), logits)

    def target_sparsity(self, final: float, updates: jax.Array) -> jax.Array:
        """A layer's target sparsity, ``final`` at the end of the ramp, once ``updates``
        updates have been applied."""
        start, end = self.schedule_steps
        return cubic_sparsity(
            updates, initial=self.initial_sparsity, final=final, start=start, end=end
        )

    def after_update(self, model, state, step, key):
        self.project(model)
        masks = dict(state["masks"])
        for index, (name, final) in enumerate(self.final_sparsity(model).items()):
            variable = model.layer_module(name).kernel
            kernel, mask = variable[...], masks[name]
            if self.regrowth:
                mask = mask | (kernel != 0)
            kernel = jnp.where(mask, kernel, 0.0)
            zeros = kernel.size - jnp.sum(mask)
            count = jnp.maximum(0.0, self.target_sparsity(final, step + 1) * kernel.size - zeros)
            zeroed = sample_zeroed(
                jax.random.fold_in(key, index), kernel, mask, count, self.temperature
            )
            masks[name] = mask & ~zeroed
            variable[...] = jnp.where(masks[name], kernel, 0.0)
        return {"masks": masks}

    def report(self, model: GatedModel, state: MethodState) -> dict[str, Any]:
        """Dead nodes and the node-pruned network
        (:func:`sparsejax.structure.nodes.node_report`)."""
        return node_report(model).summary()
