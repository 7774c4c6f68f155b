"""GReg-1 and GReg-2: pruning by growing L2 regularisation (Wang, Qin, Zhang, Fu, ICLR 2021).

One run is the whole pipeline, resumable at any point:

1. **Pretraining**: the network from ``config.pretrained`` (the workdir of another run, whose
   newest checkpoint gives the network weights and BatchNorm statistics; the engine loads them,
   :meth:`GReg.pretrained_run`), or else
   ``pretrain_epochs`` epochs of plain training (cross-entropy + ``l2``), run by a separate
   phase object (:meth:`GReg.phase`).
2. **Regularisation** with growing coefficients, then **stabilisation** (K_s iterations), then
   **pruning**, then **fine-tuning** with a persistent mask; see :mod:`.schedule`. How long
   regularisation lasts depends on the data when the magnitude-ratio test ends it, so
   ``epochs`` is a budget: the phase lives in the checkpointed state, and a run whose budget
   ends early stops unpruned (:func:`.report.greg_progress`, also in the summary under
   ``greg/``, says where it is; rerun with more epochs to continue).

Loss: mean cross-entropy + (l2/2)||theta||^2 + sum_l sum_j (lambda_{l,j}/2)||W_{l,j}||^2 with
lambda held constant (``stop_gradient``), so the optimizer sees the data gradient plus
lambda (.) W (the reference adds this to the gradient before SGD). Structured pruning
(``greg_granularity="filter"``) zeroes a pruned filter's kernel slice, its bias, and the scale
and bias of the BatchNorm that follows it, so the channel outputs exactly zero as if removed;
``"weight"`` prunes single weights of every kernel.

Config fields (None: :data:`DEFAULTS` for ``config.model``): ``greg_granularity``,
``stage_pr`` (see :mod:`.rules`), ``greg_interval`` (K_u), ``greg_delta``,
``greg_ceiling`` (tau), ``greg_ratio_limit`` (R), ``greg_stabilise_steps`` (K_s),
``greg_delta_pick``, ``greg_ceiling_pick``, ``greg_delta_recover`` (GReg-2), ``pretrained``,
``pretrain_epochs``, ``l2``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.methods import state_paths
from sparsejax.methods.base import Method, Params, cross_entropy, model_default
from sparsejax.methods.dense import Dense
from sparsejax.methods.greg.accounting import greg_pruned_count
from sparsejax.methods.greg.report import STATE_ATTRIBUTE, greg_progress, pruned_size
from sparsejax.methods.greg.rules import GROUP_GRANULARITIES, layer_ratios
from sparsejax.methods.greg.schedule import (
    FINETUNE,
    LAYER_FIELDS,
    GRegState,
    LayerState,
    Schedule,
    broadcast_groups,
    group_scores,
    prune,
    regularise,
)
from sparsejax.methods.penalties import gated_l2
from sparsejax.methods.state_paths import variable_paths
from sparsejax.models.base import GatedModel, GateSlot

CIFAR_DEFAULTS: dict[str, Any] = {
    "greg_granularity": "filter",
    "stage_pr": 0.5,
    "greg_interval": 10,
    "greg_delta": 1e-4,
    "greg_ceiling": 1.0,
    "greg_ratio_limit": 1000.0,
    "greg_stabilise_steps": 10_000,
    "greg_delta_pick": 1e-5,
    "greg_ceiling_pick": 1e-2,
    "greg_delta_recover": -1e-4,
    "pretrain_epochs": 200,
}
"""The reference's CIFAR settings (README commands; K_u = 10, K_s = 10 000) and its 200-epoch
pretraining."""

FASHION_MNIST_DEFAULTS: dict[str, Any] = {
    **CIFAR_DEFAULTS,
    "greg_interval": 1,
    "greg_delta": 1e-3,
    "greg_stabilise_steps": 600,
    "greg_delta_pick": 1e-4,
}
"""A schedule that finishes in a few epochs of 600 steps (batch 100): tau = 1 after 1000
updates (GReg-2 picks after 100), one epoch of stabilisation. Chosen by us, not the paper."""

DEFAULTS: dict[str, dict[str, Any]] = {
    "*": CIFAR_DEFAULTS,
    "resnet56": {**CIFAR_DEFAULTS, "stage_pr": (0.0, 0.75, 0.75, 0.32, 0.0)},
    "mlp": {**FASHION_MNIST_DEFAULTS, "pretrain_epochs": 10},
    "lenet5": {**FASHION_MNIST_DEFAULTS, "pretrain_epochs": 5},
}
"""Per-model defaults of every GReg config field; ``"*"`` for models not listed. ResNet-56 uses
the paper's 2.55x stage ratios."""


def _resolve(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {field: model_default(config, DEFAULTS, field) for field in DEFAULTS["*"]}


@dataclasses.dataclass(frozen=True)
class PrunedLayer:
    """A layer GReg prunes: its ratio and how many of its groups go.

    Attributes:
      count: groups pruned, ``min(ceil(ratio * groups), groups - 1)``.
      group_shape: ``(C_out,)`` (filters) or the kernel's shape (weights).
    """

    name: str
    ratio: float
    count: int
    group_shape: tuple[int, ...]


def _output_norm(model: GatedModel, name: str) -> nnx.BatchNorm | None:
    """The BatchNorm that normalises the output of layer ``name`` (its declared ``norm``)."""
    layer = next(layer for layer in model.layers if layer.name == name)
    return None if layer.norm is None else model.module_at(layer.norm)


def _pruned_layers(
    model: GatedModel, ratios: Mapping[str, float], per_weight: bool
) -> tuple[PrunedLayer, ...]:
    layers = {layer.name: layer for layer in model.layers}
    pruned = []
    for name, ratio in ratios.items():
        shape = layers[name].kernel_shape if per_weight else (layers[name].out_units,)
        count = greg_pruned_count(ratio, int(np.prod(shape)))
        pruned.append(PrunedLayer(name, ratio, count, tuple(shape)))
    return tuple(pruned)


def _masked_variables(model: GatedModel, name: str, per_weight: bool) -> dict[str, nnx.Variable]:
    """The parameters a layer's mask multiplies: its kernel and, for filters, the per-filter
    parameters zeroed with a pruned filter (its bias, the scale and bias of the BatchNorm that
    follows it), so that the channel outputs exactly zero."""
    module = model.layer_module(name)
    masked = {"kernel": module.kernel}
    if not per_weight:
        if getattr(module, "bias", None) is not None:
            masked["bias"] = module.bias
        norm = _output_norm(model, name)
        if norm is not None:
            masked["norm_scale"], masked["norm_bias"] = norm.scale, norm.bias
    return masked


def _growing_penalty(model: GatedModel, pruned: tuple[PrunedLayer, ...]) -> jax.Array:
    """sum_l sum_j (lambda_{l,j} / 2) ||W_{l,j}||^2, lambda constant; 0 once fine-tuning."""
    state: GRegState = getattr(model, STATE_ATTRIBUTE)
    total = jnp.zeros(())
    for layer, penalty in zip(pruned, state.penalty):
        kernel = model.layer_module(layer.name).kernel[...]
        coefficient = jax.lax.stop_gradient(broadcast_groups(penalty[...], kernel))
        total = total + 0.5 * jnp.sum(coefficient * kernel**2)
    return jnp.where(state.phase[...] == FINETUNE, 0.0, total)


class GReg(Method):
    """Growing regularisation; subclasses fix the variant (see the module docstring)."""

    variant: ClassVar[int]
    per_slot_fields = ("stage_pr",)

    def __init__(self, config: ml_collections.ConfigDict, *, num_train: int):
        super().__init__(config, num_train=num_train)
        settings = _resolve(config)
        self.granularity = settings["greg_granularity"]
        if self.granularity not in GROUP_GRANULARITIES:
            raise ConfigError(
                f"greg_granularity must be one of {GROUP_GRANULARITIES}, got {self.granularity!r}"
            )
        self.stage_pr = settings["stage_pr"]
        self.reg_schedule = Schedule(
            variant=self.variant,
            interval=int(settings["greg_interval"]),
            delta=float(settings["greg_delta"]),
            ceiling=float(settings["greg_ceiling"]),
            ratio_limit=float(settings["greg_ratio_limit"]),
            stabilise_steps=int(settings["greg_stabilise_steps"]),
            delta_pick=float(settings["greg_delta_pick"]),
            ceiling_pick=float(settings["greg_ceiling_pick"]),
            delta_recover=float(settings["greg_delta_recover"]),
            ratio_test=self.granularity == "filter",
        )
        self.pretrained = config.get("pretrained")
        if self.pretrained and config.get("pretrain_epochs"):
            raise ConfigError(
                f"config.pretrained={self.pretrained!r} and config.pretrain_epochs="
                f"{config.pretrain_epochs} both ask for a pretrained network; set one of them"
            )
        self.pretrain_epochs = 0 if self.pretrained else int(settings["pretrain_epochs"])
        self.pruned: tuple[PrunedLayer, ...] = ()
        self._pretraining = GRegPretraining(self)

    def make_gate(self, slot: GateSlot, rngs: nnx.Rngs) -> None:
        return None

    def pretrained_run(self) -> str | None:
        """``config.pretrained``: the run whose network the engine loads before training."""
        return self.pretrained

    def prepare_model(self, model: GatedModel) -> None:
        """Choose the pruned layers and attach the schedule state."""
        ratios = layer_ratios(model.layers, self.stage_pr, self.granularity)
        if not ratios:
            raise ConfigError(
                f"stage_pr={self.stage_pr!r} prunes no layer of {type(model).__name__}; "
                "give some layer a ratio in (0, 1)"
            )
        per_weight = self.granularity == "weight"
        self.pruned = _pruned_layers(model, ratios, per_weight)
        state = GRegState([layer.group_shape for layer in self.pruned])
        state.layer_names = tuple(layer.name for layer in self.pruned)
        state.granularity = self.granularity
        setattr(model, STATE_ATTRIBUTE, state)
        self.net_paths = variable_paths(
            model,
            {
                f"{i}/{role}": variable
                for i, layer in enumerate(self.pruned)
                for role, variable in _masked_variables(model, layer.name, per_weight).items()
            },
        )
        self.state_paths = variable_paths(model, state.variables())

    def report(self, model: GatedModel) -> dict[str, Any]:
        """:func:`~.report.greg_progress` and :func:`~.report.pruned_size` under
        ``greg/`` keys."""
        facts = {**greg_progress(model), **pruned_size(model)}
        return {f"greg/{key}": value for key, value in facts.items()}

    def phase(self, epoch: int, epochs: int) -> Method:
        """Pretraining for the first ``pretrain_epochs`` epochs, then this method."""
        return self._pretraining if epoch < self.pretrain_epochs else self

    def penalty(self, model: GatedModel) -> jax.Array:
        return gated_l2(model, {}, self.config.l2) + _growing_penalty(model, self.pruned)

    def objective(self, model, images, labels, key):
        """Update the coefficients from the weights before this step, then the loss."""
        state: GRegState = getattr(model, STATE_ATTRIBUTE)
        scores = [
            group_scores(model.layer_module(layer.name).kernel[...], self.granularity == "weight")
            for layer in self.pruned
        ]
        layers, phase, stabilise_start = regularise(
            state.layers(),
            scores,
            [layer.count for layer in self.pruned],
            state.iteration[...] - state.reg_start[...],
            state.phase[...],
            state.stabilise_start[...],
            self.reg_schedule,
        )
        state.set_layers(layers)
        state.phase[...] = phase
        state.stabilise_start[...] = stabilise_start
        logits = model(images, train=True)
        return self.loss_and_parts(
            jnp.mean(cross_entropy(logits, labels)), self.penalty(model), logits
        )

    def after_update(
        self, params: Params, model_state: nnx.State, key: jax.Array, step: jax.Array
    ) -> tuple[Params, nnx.State]:
        """Prune when stabilisation is over, re-apply the masks, advance the iteration."""
        values = state_paths.read(model_state, self.state_paths)
        layers = [
            LayerState(*(values[f"{field}/{i}"] for field in LAYER_FIELDS))
            for i in range(len(self.pruned))
        ]
        layers, phase, now = prune(
            layers,
            step - values["reg_start"],
            values["phase"],
            values["stabilise_start"],
            self.reg_schedule,
        )
        new_state = {f"mask/{i}": layer.mask for i, layer in enumerate(layers)}
        new_state |= {
            "phase": phase,
            "prune_step": jnp.where(now, step, values["prune_step"]),
            "iteration": step + 1,
        }
        weights = state_paths.read(params["net"], self.net_paths)
        masked = {}
        for name, weight in weights.items():
            mask = layers[int(name.split("/")[0])].mask
            masked[name] = weight * broadcast_groups(mask, weight)
        net = state_paths.replace(params["net"], self.net_paths, masked)
        return {**params, "net": net}, state_paths.replace(model_state, self.state_paths, new_state)


class GRegPretraining(Dense):
    """The pretraining phase of a GReg run: the dense objective, cross-entropy +
    (l2/2)||theta||^2, no schedule; marks the next step as the first of regularisation."""

    name = "greg_pretraining"
    per_slot_fields = GReg.per_slot_fields

    def __init__(self, parent: GReg):
        super().__init__(parent.config, num_train=parent.num_train)
        self.parent = parent

    def after_update(self, params, model_state, key, step):
        next_step = step + 1
        return params, state_paths.replace(
            model_state,
            self.parent.state_paths,
            {"iteration": next_step, "reg_start": next_step},
        )


class GReg1(GReg):
    """GReg-1: the pruned set is chosen by magnitude before regularisation; only it is
    penalised, with a growing coefficient."""

    name = "greg1"
    variant = 1


class GReg2(GReg):
    """GReg-2: a uniformly growing penalty first, then the pruned set is picked by magnitude and
    pushed to zero while the kept groups get ``greg_delta_recover``."""

    name = "greg2"
    variant = 2
