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

The masks are :class:`WeightMask` variables of the model, so they are part of the model state and
of every checkpoint. The weight-level zeros, with the L1 / L2 pull on small weights, leave whole
neurons and filters dead; :meth:`StochasticPruning.report` finds them
(:mod:`sparsejax.structure.nodes`) and reports the node-pruned network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.methods import state_paths
from sparsejax.methods.base import Method, Params, cross_entropy, model_default
from sparsejax.methods.penalties import gated_l2
from sparsejax.methods.prune_sampling import cubic_sparsity, sample_zeroed
from sparsejax.models.base import GatedModel, GateSlot
from sparsejax.structure.nodes import node_report

DEFAULT_TEMPERATURE = 0.2
"""T of the zeroing probabilities when ``prune_temperature`` is unset: a weight at the layer's
mean magnitude is e^5 ~ 150 times less likely to be zeroed than the smallest one."""

DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"final_sparsity": 0.9, "prune_end_epoch": 3.0, "l1": 1e-4},
    "lenet5": {"final_sparsity": 0.9, "prune_end_epoch": 3.0, "l1": 1e-4},
    "vgg16": {"final_sparsity": 0.9, "prune_end_epoch": 100.0, "l1": 5e-6},
    "*": {"final_sparsity": 0.9, "prune_end_epoch": 100.0, "l1": 5e-6},
}
"""Per model, for fields left None in the config (our choices; the paper's values were not
available): MLP / LeNet-5 on (Fashion-)MNIST for a few epochs of Adam (measured, see
BUILD_NOTES.md), VGG-16 on CIFAR-10 for the 300-epoch SGD schedule with weight decay 5e-4 from the
recipe (pruning ends at a third of it; l1 an order of magnitude below the decay)."""


class WeightMask(nnx.Variable):
    """A persistent 0/1 (boolean) mask of a kernel: False where the weight is pruned."""


class StochasticPruning(Method):
    """Config: ``final_sparsity`` (per-layer target, one value or one per declared layer),
    ``initial_sparsity``, ``prune_start_epoch``, ``prune_end_epoch``, ``prune_temperature`` (T),
    ``allow_regrowth``, ``l1``, ``l2``, ``weight_decay``. None takes :data:`DEFAULTS` (and
    :data:`DEFAULT_TEMPERATURE`; ``l2`` None is 0)."""

    name = "stochastic"
    per_slot_fields = ("final_sparsity",)

    def __init__(self, config: ml_collections.ConfigDict, *, num_train: int):
        super().__init__(config, num_train=num_train)
        temperature = config.get("prune_temperature")
        self.temperature = DEFAULT_TEMPERATURE if temperature is None else float(temperature)
        if self.temperature <= 0:
            raise ConfigError(f"config.prune_temperature must be positive, got {self.temperature}")
        self.initial_sparsity = float(config.get("initial_sparsity", 0.0))
        self.regrowth = bool(config.get("allow_regrowth", False))
        self.l1 = float(self.default("l1"))
        self.l2 = float(config.get("l2") or 0.0)
        for field, value in (("l1", self.l1), ("l2", self.l2)):
            if value < 0:
                raise ConfigError(f"config.{field} must be >= 0, got {value}")
        self._schedule_steps: tuple[float, float] | None = None

    def default(self, field: str) -> Any:
        """``config.<field>``, or :data:`DEFAULTS` for ``config.model``."""
        return model_default(self.config, DEFAULTS, field)

    def make_gate(self, slot: GateSlot, rngs: nnx.Rngs) -> None:
        return None

    def prepare_model(self, model: GatedModel) -> None:
        if model.granularity != "unit":
            raise ConfigError(
                "stochastic pruning finds dead nodes through the models' unit declarations; "
                f"use granularity='unit', not {model.granularity!r}"
            )
        self.layers = model.layers
        self.final_sparsity = self._per_layer(self.default("final_sparsity"))
        for name, value in self.final_sparsity.items():
            if not self.initial_sparsity <= value < 1.0:
                raise ConfigError(
                    f"final sparsity {value} of layer {name!r} must lie in "
                    f"[initial_sparsity={self.initial_sparsity}, 1)"
                )
        kernels = {l.name: model.layer_module(l.name).kernel for l in self.layers}
        model.weight_masks = nnx.Dict(
            {name: WeightMask(jnp.ones(k.shape, bool)) for name, k in kernels.items()}
        )
        self.kernel_paths = state_paths.variable_paths(model, kernels)
        self.mask_paths = state_paths.variable_paths(model, dict(model.weight_masks.items()))

    def _per_layer(self, values: float | Sequence[float]) -> dict[str, float]:
        if isinstance(values, (int, float)):
            values = [values] * len(self.layers)
        values = list(values)
        if len(values) != len(self.layers):
            names = ", ".join(l.name for l in self.layers)
            raise ConfigError(
                f"config.final_sparsity has {len(values)} values but the model has "
                f"{len(self.layers)} layers ({names}); give one value or one per layer"
            )
        return {l.name: float(v) for l, v in zip(self.layers, values)}

    def l1_penalty(self, model: GatedModel) -> jax.Array:
        """l1 * sum |W| over the kernels, with subgradient 0 at pruned (zero) weights."""
        total = jnp.zeros(())
        for layer in self.layers:
            kernel = model.layer_module(layer.name).kernel[...]
            total = total + jnp.sum(kernel * jax.lax.stop_gradient(jnp.sign(kernel)))
        return self.l1 * total

    def penalty(self, model: GatedModel) -> jax.Array:
        return self.l1_penalty(model) + gated_l2(model, {}, self.l2)

    def objective(self, model, images, labels, key):
        logits = model(images, train=True)
        data_loss = jnp.mean(cross_entropy(logits, labels))
        return self.loss_and_parts(data_loss, self.penalty(model), logits)

    def optimizer(self, *, steps_per_epoch: int, epochs: int) -> optax.GradientTransformation:
        start = float(self.config.get("prune_start_epoch", 0.0)) * steps_per_epoch
        end = float(self.default("prune_end_epoch")) * steps_per_epoch
        if not 0 <= start <= end:
            raise ConfigError(
                f"need 0 <= prune_start_epoch <= prune_end_epoch, got {start / steps_per_epoch} "
                f"and {end / steps_per_epoch}"
            )
        self._schedule_steps = (start, end)
        return super().optimizer(steps_per_epoch=steps_per_epoch, epochs=epochs)

    def target_sparsity(self, layer: str, updates: jax.Array) -> jax.Array:
        """The layer's target sparsity once ``updates`` updates have been applied."""
        if self._schedule_steps is None:
            raise RuntimeError("StochasticPruning.optimizer() sets the schedule; call it first")
        start, end = self._schedule_steps
        return cubic_sparsity(
            updates, initial=self.initial_sparsity, final=self.final_sparsity[layer],
            start=start, end=end,
        )

    def after_update(self, params: Params, model_state: nnx.State, key, step):
        params = self.project(params)
        kernels = state_paths.read(params["net"], self.kernel_paths)
        masks = state_paths.read(model_state, self.mask_paths)
        for index, layer in enumerate(self.layers):
            kernel, mask = kernels[layer.name], masks[layer.name]
            if self.regrowth:
                mask = mask | (kernel != 0)
            kernel = jnp.where(mask, kernel, 0.0)
            zeros = kernel.size - jnp.sum(mask)
            count = jnp.maximum(0.0, self.target_sparsity(layer.name, step + 1) * kernel.size - zeros)
            zeroed = sample_zeroed(
                jax.random.fold_in(key, index), kernel, mask, count, self.temperature
            )
            masks[layer.name] = mask & ~zeroed
            kernels[layer.name] = jnp.where(masks[layer.name], kernel, 0.0)
        net = state_paths.replace(params["net"], self.kernel_paths, kernels)
        return {**params, "net": net}, state_paths.replace(model_state, self.mask_paths, masks)

    def report(self, model: GatedModel) -> dict[str, Any]:
        """Dead nodes and the node-pruned network
        (:func:`sparsejax.structure.nodes.node_report`)."""
        return node_report(model).summary()
