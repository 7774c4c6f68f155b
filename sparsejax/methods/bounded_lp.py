"""Deterministic channel gates with a sparsity penalty and proximal updates: ``l1`` (network
slimming, Liu et al. ICCV 2017) and ``bounded_lp`` (bounded-Lp group gating, Mummadi et al.
GCPR 2019, arXiv 1908.03463).

Every gate slot of the model (after BatchNorm where the model has one) carries a
:class:`~sparsejax.gates.scale.ScaleGate` g >= 0, initialised to 1. Training is proximal gradient
descent on

    L = CE + (l2/2) ||theta||^2 + filter_lambda * sum_slots R_group(||W_group||_2)
        + sum_slots gate_lambda_s * R(g_s),

the last term handled by its proximal operator after every optimizer update (step size t = the
gate learning rate of that update), so gates reach exact zeros and a zero gate prunes its group:

- ``l1``: R = ||.||_1, prox = soft threshold g <- max(g - t lambda, 0); R_group = sum of norms
  (group lasso, by subgradient).
- ``bounded_lp``: R = R_group = B_{sigma,p} of :mod:`sparsejax.estimators.bounded_lp`; p = 1
  uses its exact prox; for p > 1 the penalty has zero slope at 0, no prox can produce zeros, so
  its gradient enters the loss and gates below ``gate_threshold`` are set to 0 after each update.

With Adam the prox step uses the scalar learning rate, not Adam's per-coordinate scaling: the
shrinkage is decoupled from the adaptive update, as weight decay is in AdamW.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.estimators.bounded_lp import bounded_norm, prox_bounded_l1, safe_norm, soft_threshold
from sparsejax.gates.scale import ScaleGate
from sparsejax.methods import state_paths
from sparsejax.methods.base import Method, Params, cross_entropy, model_default, per_slot
from sparsejax.methods.penalties import gated_l2
from sparsejax.models.base import GatedModel, GateSlot

MOMENTUM_EQUIVALENCE = 10.0
"""Network slimming adds s * sign(g) to the gradient before SGD momentum 0.9, so its steady pull
on a gate is lr * s / (1 - 0.9) per step; the prox step after the update pulls lr * lambda. Our
CIFAR / ImageNet lambdas are therefore 10 s."""

L1_DEFAULTS: dict[str, dict[str, float]] = {
    "mlp": {"gate_lambda": 0.1},
    "lenet5": {"gate_lambda": 0.1},
    "vgg16": {"gate_lambda": MOMENTUM_EQUIVALENCE * 1e-4},
    "resnet164": {"gate_lambda": MOMENTUM_EQUIVALENCE * 1e-5},
    "densenet40": {"gate_lambda": MOMENTUM_EQUIVALENCE * 1e-5},
    "mobilenet_v2_cifar": {"gate_lambda": MOMENTUM_EQUIVALENCE * 1e-5},
    "resnet50": {"gate_lambda": MOMENTUM_EQUIVALENCE * 1e-5},
    "mobilenet_v2": {"gate_lambda": MOMENTUM_EQUIVALENCE * 1e-5},
    "*": {"gate_lambda": MOMENTUM_EQUIVALENCE * 1e-4},
}
"""Per model: network slimming's s (1e-4 VGG, 1e-5 ResNet-164 / DenseNet-40 on CIFAR) as a prox
lambda (:data:`MOMENTUM_EQUIVALENCE`), and our choices elsewhere (MLP / LeNet-5 on Fashion-MNIST
with Adam: measured, see BUILD_NOTES.md; MobileNetV2, ResNet-50: the ResNet value)."""

BOUNDED_DEFAULTS: dict[str, dict[str, float]] = {
    "mlp": {"gate_lambda": 0.05, "sigma": 0.5},
    "lenet5": {"gate_lambda": 0.2, "sigma": 0.5},
    **{
        model: {"gate_lambda": 2 * values["gate_lambda"], "sigma": 0.5}
        for model, values in L1_DEFAULTS.items()
        if model not in ("mlp", "lenet5")
    },
}
"""Per model (our choice; the paper's values were not available): sigma = 0.5 puts the L1-to-L0
transition at half the initial gate value; lambda / sigma is 4x network slimming's lambda, so
gates near 0 are pulled 4x harder than by L1 and gates near 1 about half as hard. LeNet-5
(Fashion-MNIST, 5 epochs, gates at Adam 1e-2): 0.2 removed 93% of the parameters at 10.0% test
error, 0.1 77% at 9.8% (BUILD_NOTES.md)."""


class L1Gating(Method):
    """Network slimming on :class:`ScaleGate` gates: L1 penalty, soft-threshold prox.

    Config: ``gate_lambda`` (one value or one per slot; None: :data:`L1_DEFAULTS` for
    ``model``), ``filter_lambda`` (group penalty on the gated groups' weight norms, 0 = off),
    ``l2``, and the shared optimizer fields.
    """

    name: ClassVar[str] = "l1"
    per_slot_fields = ("gate_lambda",)
    defaults: ClassVar[dict[str, dict[str, float]]] = L1_DEFAULTS

    def __init__(self, config: ml_collections.ConfigDict, *, num_train: int):
        super().__init__(config, num_train=num_train)
        self.filter_lambda = float(config.get("filter_lambda", 0.0))
        if self.filter_lambda < 0:
            raise ConfigError(f"config.filter_lambda must be >= 0, got {self.filter_lambda}")
        self._gate_rate: optax.Schedule | None = None

    def default(self, field: str) -> float:
        """``config.<field>``, or the defaults table's value for ``config.model``."""
        return model_default(self.config, self.defaults, field)

    def make_gate(self, slot: GateSlot, rngs: nnx.Rngs) -> ScaleGate:
        return ScaleGate(slot.shape)

    def prepare_model(self, model: GatedModel) -> None:
        slots = tuple(s for s in model.gate_slots if s.name in model.gates)
        if not slots:
            raise ConfigError(f"method {self.name!r} needs a model with gate slots")
        self.slots = slots
        lambdas = self.default("gate_lambda")
        self.gate_lambdas = per_slot(lambdas, slots, {}, "*", "gate_lambda")
        if min(self.gate_lambdas.values()) < 0:
            raise ConfigError(f"config.gate_lambda must be >= 0, got {lambdas}")
        self.gate_paths = state_paths.variable_paths(
            model, {s.name: model.gates[s.name].value for s in slots}
        )

    def gate_penalty(self, values: jax.Array) -> jax.Array:
        """R(g) of one slot's gate values."""
        return jnp.sum(jnp.abs(values))

    def group_penalty(self, norms: jax.Array) -> jax.Array:
        """R_group of one slot's group norms."""
        return jnp.sum(norms)

    def proximal(self) -> bool:
        """Whether the gate penalty is applied by its prox (else by its gradient)."""
        return True

    def shrink(self, values: jax.Array, threshold: jax.Array) -> jax.Array:
        """The gate update after an optimizer step; ``threshold`` = step size * lambda."""
        return soft_threshold(values, threshold)

    def group_norms(self, model: GatedModel, slot: GateSlot) -> jax.Array:
        """||W_g||_2 of every group a gate of ``slot`` scales (its bias too when the gate scales
        it; |w| for weight gates), with gradient 0 at a zero group."""
        module = model.layer_module(slot.layer)
        kernel = module.kernel[...]
        if slot.axis is None:
            return safe_norm(kernel[..., None], axis=-1)
        groups = jnp.moveaxis(kernel, slot.axis, 0).reshape(kernel.shape[slot.axis], -1)
        if slot.gates_bias and module.bias is not None:
            groups = jnp.concatenate([groups, module.bias[...][:, None]], axis=1)
        return safe_norm(groups, axis=1)

    def penalties(self, model: GatedModel) -> tuple[jax.Array, jax.Array]:
        """(gate penalty sum_s lambda_s R(g_s), all other penalty terms)."""
        gates = sum(
            self.gate_lambdas[s.name] * self.gate_penalty(model.gates[s.name].value[...])
            for s in self.slots
        )
        others = gated_l2(model, {}, self.config.get("l2", 0.0))
        if self.filter_lambda:
            others = others + self.filter_lambda * sum(
                self.group_penalty(self.group_norms(model, s)) for s in self.slots
            )
        return gates, others

    def penalty(self, model: GatedModel) -> jax.Array:
        gates, others = self.penalties(model)
        return gates + others

    def objective(self, model, images, labels, key):
        logits = model(images, train=True)
        data_loss = jnp.mean(cross_entropy(logits, labels))
        gates, others = self.penalties(model)
        if self.proximal():
            gates = jax.lax.stop_gradient(gates)
        return self.loss_and_parts(data_loss, gates + others, logits)

    def optimizer(self, *, steps_per_epoch: int, epochs: int) -> optax.GradientTransformation:
        """The shared optimizers; also fixes the prox step size, the gates' learning rate."""
        rate = self.gate_schedule(steps_per_epoch=steps_per_epoch, epochs=epochs)
        self._gate_rate = rate if callable(rate) else optax.constant_schedule(rate)
        return super().optimizer(steps_per_epoch=steps_per_epoch, epochs=epochs)

    def after_update(self, params: Params, model_state, key, step):
        if self._gate_rate is None:
            raise RuntimeError(
                f"{type(self).__name__}.optimizer() sets the prox step size; call it first"
            )
        params = self.project(params)
        rate = self._gate_rate(step)
        values = state_paths.read(params["gates"], self.gate_paths)
        shrunk = {
            name: jnp.maximum(self.shrink(value, rate * self.gate_lambdas[name]), 0.0)
            for name, value in values.items()
        }
        gates = state_paths.replace(params["gates"], self.gate_paths, shrunk)
        return {**params, "gates": gates}, model_state


class BoundedLpGating(L1Gating):
    """Bounded-Lp group gating: R = B_{sigma,p} on the gates and (``filter_lambda``) on the
    gated groups' weight norms.

    Config: ``gate_lambda`` and ``sigma`` (None: :data:`BOUNDED_DEFAULTS` for ``model``), ``p``
    (>= 1; 1 gives exact zeros by the prox), ``filter_sigma`` (sigma of the group-norm term,
    whose scale differs from the gates'), ``gate_threshold`` (p > 1 only), ``filter_lambda``,
    ``l2``.
    """

    name: ClassVar[str] = "bounded_lp"
    defaults: ClassVar[dict[str, dict[str, float]]] = BOUNDED_DEFAULTS

    def __init__(self, config: ml_collections.ConfigDict, *, num_train: int):
        super().__init__(config, num_train=num_train)
        self.p = float(config.get("p", 1.0))
        self.gate_threshold = float(config.get("gate_threshold", 0.0))
        if self.p < 1:
            raise ConfigError(
                f"config.p must be >= 1 (for p < 1 the penalty's slope at 0 is infinite), got {self.p}"
            )

    def prepare_model(self, model: GatedModel) -> None:
        super().prepare_model(model)
        self.sigma = float(self.default("sigma"))
        filter_sigma = self.config.get("filter_sigma")
        self.filter_sigma = self.sigma if filter_sigma is None else float(filter_sigma)
        for field, value in (("sigma", self.sigma), ("filter_sigma", self.filter_sigma)):
            if value <= 0:
                raise ConfigError(f"config.{field} must be positive, got {value}")

    def gate_penalty(self, values: jax.Array) -> jax.Array:
        return bounded_norm(values, self.sigma, self.p)

    def group_penalty(self, norms: jax.Array) -> jax.Array:
        return bounded_norm(norms, self.filter_sigma, self.p)

    def proximal(self) -> bool:
        return self.p == 1.0

    def shrink(self, values: jax.Array, threshold: jax.Array) -> jax.Array:
        if self.proximal():
            return prox_bounded_l1(values, threshold, self.sigma)
        return jnp.where(jnp.abs(values) <= self.gate_threshold, 0.0, values)
