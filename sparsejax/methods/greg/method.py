"""GReg-1 and GReg-2: pruning by growing L2 regularisation (Wang, Qin, Zhang, Fu, ICLR 2021).

One run is the whole pipeline, resumable at any point, in three phases
(:meth:`GReg.phases`), each with its own optimizer as in the reference:

1. **Pretraining**: the network from ``config.pretrained`` (the workdir of another run, whose
   newest checkpoint gives the network weights and BatchNorm statistics; the engine loads them,
   :meth:`GReg.pretrained_run`), or else ``pretrain_epochs`` epochs of plain training
   (cross-entropy + ``l2``) on the model's learning-rate schedule, by a separate method object.
2. **Regularisation** with growing coefficients, then **stabilisation** (K_s iterations), then
   **pruning** (:mod:`.schedule`), at the constant learning rate ``lr_prune`` (fresh optimizer
   state). How long regularisation lasts depends on the weights when the magnitude-ratio test
   ends it, so the phase ends at the first epoch end after pruning; it lasts at most
   :func:`.schedule.longest_regularisation` iterations.
3. **Fine-tuning** with a persistent mask, ``fine_tune_epochs`` epochs on a fresh optimizer at
   the learning rates ``lr_ft`` (``"EPOCH:RATE,..."``, the reference's format).

The run's length is the sum of the phases (:attr:`GReg.plans_length`: ``epochs`` stays unset).

Loss: mean cross-entropy + (l2/2)||theta||^2 + sum_l sum_j (lambda_{l,j}/2)||W_{l,j}||^2 with
lambda held constant (``stop_gradient``), so the optimizer sees the data gradient plus
lambda (.) W (the reference adds this to the gradient before SGD). ``greg_granularity="weight"``
prunes single weights of every kernel. Structured pruning (``"filter"``) prunes the units of
the model's gate slots (every model is traced; a model gated at weight granularity has none and
is refused): the prunable groups of its trace (:func:`.rules.traced_slot_ratios`), or a
transformer's heads, KV groups, FFN units and hidden dimensions (:func:`.rules.slot_ratios`). A
unit's score is the mean |w| over its group (its first producer's filter; a head's query / key
/ value columns and output rows, :meth:`~sparsejax.models.base.GatedModel.slot_members`), its
penalty lambda_j/2 ||group||^2, and pruning zeroes everything the trace ties to it
(:meth:`~sparsejax.structure.traced_model.TracedModel.scale_units`: producers' filters and
biases, normalisers' entries and the readers' rows), so the unit outputs exactly zero as if
removed.

Config fields: :data:`FIELDS` (``stage_pr``: see :mod:`.rules`), ``l2`` and the network's
optimizer, learning rate, schedule and weight decay (pretraining; the later phases use the same
optimizer and weight decay). The schedule state is the method's state (:func:`initial_state`),
checkpointed with the run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sparsejax.errors import ConfigError
from sparsejax.methods.base import Method, MethodState, Phase, RunInfo, cross_entropy
from sparsejax.methods.budget import TARGET_FIELDS, requested_target
from sparsejax.methods.budget_ratio import slots_ratio
from sparsejax.methods.dense import Dense
from sparsejax.methods.fields import Field
from sparsejax.methods.greg.accounting import greg_pruned_count
from sparsejax.methods.greg.budget import PROBE_RATIO, budget_stage_pr
from sparsejax.methods.greg.report import (
    greg_progress,
    kept_channels,
    pruned_size,
    slot_pruned_size,
    traced_pruned_size,
)
from sparsejax.methods.greg.rules import (
    GROUP_GRANULARITIES,
    layer_ratios,
    slot_ratios,
    traced_slot_ratios,
)
from sparsejax.methods.greg.schedule import (
    FINETUNE,
    NOT_YET,
    REGULARISE,
    UNSET_RATIO,
    LayerState,
    Schedule,
    broadcast_groups,
    group_scores,
    longest_regularisation,
    prune,
    regularise,
)
from sparsejax.methods.masking import refuse_unit_zeroing
from sparsejax.methods.optim import (
    build_optimizer,
    epoch_rate_schedule,
    parse_epoch_rates,
    partition,
)
from sparsejax.methods.penalties import gated_l2
from sparsejax.methods.registry import register
from sparsejax.methods.slot_groups import (
    kernel_members,
    unit_mean_magnitudes,
    unit_square_sums,
)
from sparsejax.models.base import GatedModel, GateSlot
from sparsejax.models.transformer import by_family
from sparsejax.structure.blocks import traced_layer_stages, traced_stages
from sparsejax.structure.traced_model import TracedModel

FASHION_MNIST = ("mlp", "lenet5")
IMAGENET = ("resnet34", "resnet50")


def _for(models: tuple[str, ...], value: Any) -> dict[str, Any]:
    return {model: value for model in models}


FIELDS = {
    "greg_granularity": Field("filter", "filter | weight: the groups GReg prunes"),
    "stage_pr": Field(
        0.5,
        "pruning ratios: one, per stage [stem, stages..., fc], per layer, or '[a-b:r]'",
        per_model={
            "resnet56": (0.0, 0.75, 0.75, 0.32, 0.0),
            "vgg19": "[1-15:0.7]",
            "resnet34": (0.0, 0.5, 0.6, 0.4, 0.0, 0.0),
        },
        kind=object,
    ),
    "greg_interval": Field(
        10,
        "K_u, iterations between coefficient updates",
        {**_for(FASHION_MNIST, 1), **_for(IMAGENET, 5)},
    ),
    "greg_delta": Field(
        1e-4, "increment of the pruned groups' coefficient", _for(FASHION_MNIST, 1e-3)
    ),
    "greg_ceiling": Field(1.0, "tau: a layer finishes when its largest coefficient exceeds it"),
    "greg_ratio_limit": Field(1000.0, "R: the magnitude ratio that finishes a layer"),
    "greg_stabilise_steps": Field(
        10_000,
        "K_s, iterations with frozen coefficients before pruning",
        {**_for(FASHION_MNIST, 600), **_for(IMAGENET, 40_000)},
    ),
    "greg_delta_pick": Field(
        1e-5, "GReg-2: uniform increment before picking", _for(FASHION_MNIST, 1e-4)
    ),
    "greg_ceiling_pick": Field(1e-2, "GReg-2: the coefficient at which a layer picks"),
    "greg_delta_recover": Field(-1e-4, "GReg-2: the kept groups' coefficient after picking"),
    "pretrained": Field(None, "workdir of a run whose network weights to start from", kind=str),
    "pretrain_epochs": Field(
        200,
        "epochs of plain training first (when pretrained is unset)",
        {"mlp": 10, "lenet5": 5, "resnet34": 90, "resnet50": None},
    ),
    "lr_prune": Field(1e-3, "constant learning rate of regularisation and stabilisation"),
    "lr_ft": Field(
        "0:0.01,60:0.001,90:0.0001",
        "fine-tuning learning rates 'EPOCH:RATE,...' from its first epoch",
        {**_for(FASHION_MNIST, "0:0.001"), **_for(IMAGENET, "0:0.01,30:0.001,60:0.0001,75:0.00001")},
        kind=str,
    ),
    "fine_tune_epochs": Field(
        120, "epochs of fine-tuning after pruning", {**_for(FASHION_MNIST, 3), **_for(IMAGENET, 90)}
    ),
    **TARGET_FIELDS,  # a budget sets stage_pr (.budget)
}
"""The reference's settings (README commands and ``option.py``): CIFAR K_u = 10, K_s = 10 000
and 200 epochs of pretraining; ImageNet K_u = 5, K_s = 40 000 (ResNet-34: the 90 epochs of
torchvision's recipe, whose weights the reference starts from; ResNet-50: no default, the run
needs ``pretrained`` or an explicit ``pretrain_epochs``, as the reference starts from
torchvision's weights); the paper's stage ratios for ResNet-56 (2.55x), VGG-19 (8.84x) and
ResNet-34 (1.32x with the reference's skipped layers, which are not supported: 1.62x);
regularisation at ``lr_prune`` 1e-3; fine-tuning 120 epochs at 0.01, x0.1 at 60 and 90 (CIFAR)
or 90 epochs at 0.01, x0.1 at 30, 60 and 75 (ImageNet). MLP / LeNet-5: a schedule that
finishes in a few epochs of 600 steps (batch 100): tau = 1 after 1000 updates (GReg-2 picks
after 100), one epoch of stabilisation, 3 epochs of fine-tuning at Adam's 1e-3 (the reference
fine-tunes its LeNets with Adam); chosen by us, not the paper."""


@dataclasses.dataclass(frozen=True)
class PrunedLayer:
    """A layer GReg prunes: its ratio and how many of its groups go.

    Attributes:
      count: groups pruned, ``min(ceil(ratio * groups), groups - 1)``.
      group_shape: ``(C_out,)`` (filters), the kernel's shape (weights) or ``(units,)`` of a
        transformer's gate slot (``name`` is then the slot's).
    """

    name: str
    ratio: float
    count: int
    group_shape: tuple[int, ...]


def initial_state(pruned: tuple[PrunedLayer, ...]) -> MethodState:
    """The schedule state before pretraining: per pruned layer the fields of
    :class:`~.schedule.LayerState`, and the counters."""
    return {
        "layers": [
            {
                "penalty": jnp.zeros(layer.group_shape, jnp.float32),
                "selected": jnp.zeros(layer.group_shape, jnp.bool_),
                "mask": jnp.ones(layer.group_shape, jnp.float32),
                "ratio": jnp.full((), UNSET_RATIO, jnp.float32),
                "finished": jnp.zeros((), jnp.bool_),
                "picked": jnp.zeros((), jnp.bool_),
            }
            for layer in pruned
        ],
        "phase": jnp.full((), REGULARISE, jnp.int32),
        "iteration": jnp.zeros((), jnp.int32),
        "reg_start": jnp.zeros((), jnp.int32),
        "stabilise_start": jnp.full((), NOT_YET, jnp.int32),
        "prune_step": jnp.full((), NOT_YET, jnp.int32),
    }


def _layer_states(state: MethodState) -> list[LayerState]:
    return [LayerState(**layer) for layer in state["layers"]]


class GReg(Method):
    """Growing regularisation; subclasses fix the variant (see the module docstring)."""

    variant: ClassVar[int]
    fields = FIELDS
    plans_length = True
    uses_gate_placements = False

    def __init__(self, config: ml_collections.ConfigDict, run: RunInfo):
        super().__init__(config, run)
        settings = self.config
        self.granularity = settings.greg_granularity
        if self.granularity not in GROUP_GRANULARITIES:
            raise ConfigError(
                f"greg_granularity must be one of {GROUP_GRANULARITIES}, got {self.granularity!r}"
            )
        self.reg_schedule = Schedule(
            variant=self.variant,
            interval=int(settings.greg_interval),
            delta=float(settings.greg_delta),
            ceiling=float(settings.greg_ceiling),
            ratio_limit=float(settings.greg_ratio_limit),
            stabilise_steps=int(settings.greg_stabilise_steps),
            delta_pick=float(settings.greg_delta_pick),
            ceiling_pick=float(settings.greg_ceiling_pick),
            delta_recover=float(settings.greg_delta_recover),
            ratio_test=self.granularity == "filter",
        )
        self.pretrain_epochs = int(settings.pretrain_epochs)
        self.fine_tune_rates = parse_epoch_rates(settings.lr_ft, "lr_ft")
        self.pretraining = GRegPretraining(self)
        """The method of the first ``pretrain_epochs`` epochs."""

    @classmethod
    def resolve(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The fields' defaults; no pretraining epochs when ``pretrained`` gives the network."""
        if config.get("epochs") is not None:
            raise ConfigError(
                f"{cls.name} runs as long as its phases (pretrain_epochs, regularisation until "
                f"it prunes, fine_tune_epochs), not for epochs={config.epochs}: leave epochs "
                "unset and set those instead"
            )
        if config.get("pretrained") and config.get("pretrain_epochs"):
            raise ConfigError(
                f"config.pretrained={config.pretrained!r} and config.pretrain_epochs="
                f"{config.pretrain_epochs} both ask for a pretrained network; set one of them"
            )
        resolved = super().resolve(config)
        if resolved.pretrained:
            with resolved.unlocked():
                resolved.pretrain_epochs = 0
        if resolved.pretrain_epochs is None:
            raise ConfigError(
                f"GReg on {config.model} starts, as the reference does, from a pretrained "
                "network: give --config.pretrained=WORKDIR (a finished dense run of the model) "
                "or --config.pretrain_epochs=N to pretrain inside the run"
            )
        return resolved

    def unit_slots(self, model: GatedModel) -> dict[str, GateSlot] | None:
        """The gate slots whose units GReg prunes (a traced model with unit slots, at filter
        granularity), by name, or None when it prunes layers."""
        if self.granularity != "filter" or model.granularity != "unit":
            return None
        return {slot.name: slot for slot in model.gate_slots}

    def pruned_layers(self, model: GatedModel) -> tuple[PrunedLayer, ...]:
        """The layers (or a transformer's slots) GReg prunes in ``model``, in network order,
        with their ratios and counts."""
        slots = self.unit_slots(model)
        if slots is not None:
            families = by_family(model.gate_slots)  # a transformer's placed heads and units
            if families and requested_target(self.config) is not None:
                raise ConfigError(
                    "GReg takes no target_flops / target_params on a transformer; give the "
                    "ratios per family in stage_pr, e.g. {'heads': 0.5, 'ffn': 0.5}"
                )
            ratios = (
                slot_ratios(tuple(slots.values()), self.config.stage_pr) if families
                else self._traced_ratios(model, slots)
            )
            if not ratios:
                raise ConfigError(
                    f"stage_pr={self.config.stage_pr!r} prunes no gate slot of the model; give "
                    f"some of {', '.join(slots)} a ratio in (0, 1)"
                )
            return tuple(
                PrunedLayer(name, ratio, greg_pruned_count(ratio, slots[name].shape[0]),
                            slots[name].shape)
                for name, ratio in ratios.items()
            )
        if self.granularity == "filter":
            refuse_unit_zeroing("greg_granularity=filter")
        stage_pr = budget_stage_pr(self.config, model.layers)  # a target's, under one
        ratios = layer_ratios(model.layers, stage_pr, traced_layer_stages(model))
        if not ratios:
            raise ConfigError(
                f"stage_pr={self.config.stage_pr!r} prunes no layer of {type(model).__name__}; "
                "give some layer a ratio in (0, 1)"
            )
        pruned = []
        for name, ratio in ratios.items():
            shape = model.layer_module(name).kernel.shape
            count = greg_pruned_count(ratio, int(np.prod(shape)))
            pruned.append(PrunedLayer(name, ratio, count, tuple(shape)))
        return tuple(pruned)

    def _traced_ratios(self, model: TracedModel, slots: dict[str, GateSlot]) -> dict[str, float]:
        """``{slot: ratio}`` of a traced model: ``stage_pr`` read by the zoo's rules
        (:func:`~sparsejax.methods.greg.rules.traced_slot_ratios`), or under a target the one
        ratio, over the slots that ``stage_pr`` as a single float prunes, that meets it."""
        layers = [layer.name for layer in model.layers]
        stages = traced_stages(model)
        if requested_target(self.config) is None:
            return traced_slot_ratios(tuple(slots.values()), self.config.stage_pr, layers, stages)
        pruned = traced_slot_ratios(tuple(slots.values()), PROBE_RATIO, layers, stages)
        ratio = slots_ratio(model.layers, [slots[name] for name in pruned],
                            requested_target(self.config), count=greg_pruned_count,
                            what="GReg (filter granularity)")
        return dict.fromkeys(pruned, ratio)

    def init(self, model: GatedModel) -> MethodState:
        return initial_state(self.pruned_layers(model))

    def pretrained_run(self) -> str | None:
        return self.config.pretrained

    def report(self, model: GatedModel, state: MethodState) -> dict[str, Any]:
        """:func:`~.report.greg_progress` and the pruned size under ``greg/`` keys: GReg's
        counter of the kept weights (:func:`~.report.pruned_size`, weight granularity) or of
        the network without the pruned units (:func:`~.report.traced_pruned_size`, a network
        without products of two activations), or for a transformer or a traced attention model
        the accounting's params and FLOPs (:func:`~.report.slot_pruned_size`)."""
        names = [layer.name for layer in self.pruned_layers(model)]
        if self.unit_slots(model) is None:
            size = pruned_size(model.layers, state)
        elif not model.activation_products:
            size = traced_pruned_size(model.layers, state, names)
        else:
            size = slot_pruned_size(model, state, names)
        facts = {**greg_progress(state, names), **size}
        return {f"greg/{key}": value for key, value in facts.items()}

    def kept_channels(self, model: GatedModel, state: MethodState) -> dict[str, np.ndarray]:
        """:func:`~.report.kept_channels` of the pruned layers."""
        names = [layer.name for layer in self.pruned_layers(model)]
        return kept_channels(state, names, self.granularity)

    def phases(self) -> tuple[Phase, ...]:
        """Pretraining (none with ``pretrained``), regularisation with stabilisation and
        pruning, fine-tuning; each starts a fresh optimizer (module docstring)."""
        config = self.config
        steps = self.run.steps_per_epoch
        longest = -(-longest_regularisation(self.reg_schedule) // steps)
        rates = ", ".join(f"{rate:g} from epoch {epoch}" for epoch, rate in self.fine_tune_rates)
        schedule = config.lr_schedule
        phases = (
            Phase(
                "pretrain",
                self.pretraining,
                self.pretrain_epochs,
                self._optimizer(
                    self.schedule(config.learning_rate, schedule, epochs=self.pretrain_epochs)
                ),
                learning_rate=f"{config.optimizer} {config.learning_rate:g}, {schedule}",
            ),
            Phase(
                "regularise",
                self,
                longest,
                self.optimizer(),
                until=lambda state: int(state["phase"]) == FINETUNE,
                learning_rate=f"{config.optimizer} {config.lr_prune:g}, constant",
            ),
            Phase(
                "fine-tune",
                self,
                int(config.fine_tune_epochs),
                self._optimizer(epoch_rate_schedule(self.fine_tune_rates, steps_per_epoch=steps)),
                learning_rate=f"{config.optimizer} {rates}",
            ),
        )
        return phases if self.pretrain_epochs else phases[1:]

    def optimizer(self) -> optax.GradientTransformation:
        """The optimizer of GReg's own steps: regularisation's, at the constant ``lr_prune``."""
        return self._optimizer(float(self.config.lr_prune))

    def _optimizer(self, rate) -> optax.GradientTransformation:
        """The network's optimizer with its weight decay at ``rate`` (GReg has no gates)."""
        config = self.config
        return partition(
            build_optimizer(config.optimizer, rate, weight_decay=config.get("weight_decay", 0.0)),
            build_optimizer(config.optimizer, rate),
        )

    def growing_penalty(self, model: GatedModel, state: MethodState) -> jax.Array:
        """sum_l sum_j (lambda_{l,j} / 2) ||W_{l,j}||^2, lambda constant; 0 once fine-tuning."""
        total = jnp.zeros(())
        slots = self.unit_slots(model)
        for layer, layer_state in zip(self.pruned_layers(model), state["layers"]):
            if slots is not None:
                slot = slots[layer.name]
                squares = unit_square_sums(model, slot, kernel_members(model, slot))
                coefficient = jax.lax.stop_gradient(layer_state["penalty"])
                total = total + 0.5 * jnp.sum(coefficient * squares)
                continue
            kernel = model.layer_module(layer.name).kernel[...]
            coefficient = jax.lax.stop_gradient(broadcast_groups(layer_state["penalty"], kernel))
            total = total + 0.5 * jnp.sum(coefficient * kernel**2)
        return jnp.where(state["phase"] == FINETUNE, 0.0, total)

    def penalty(self, model: GatedModel, state: MethodState) -> jax.Array:
        return gated_l2(model, {}, self.config.l2) + self.growing_penalty(model, state)

    def before_update(self, model: GatedModel, state: MethodState, step: jax.Array) -> MethodState:
        """The coefficient update of this iteration, from the weights before the update."""
        pruned = self.pruned_layers(model)
        slots = self.unit_slots(model)
        scores = [
            group_scores(model.layer_module(layer.name).kernel[...], self.granularity == "weight")
            if slots is None else unit_mean_magnitudes(model, slots[layer.name])
            for layer in pruned
        ]
        layers, phase, stabilise_start = regularise(
            _layer_states(state),
            scores,
            [layer.count for layer in pruned],
            state["iteration"] - state["reg_start"],
            state["phase"],
            state["stabilise_start"],
            self.reg_schedule,
        )
        return {
            **state,
            "layers": [layer._asdict() for layer in layers],
            "phase": phase,
            "stabilise_start": stabilise_start,
        }

    def objective(self, model, state, images, labels, key):
        logits = model(images, train=True)
        return self.loss_and_parts(
            jnp.mean(cross_entropy(logits, labels)), self.penalty(model, state), logits
        )

    def after_update(self, model, state, step, key):
        """Prune when stabilisation is over, re-apply the masks, advance the iteration."""
        layers, phase, now = prune(
            _layer_states(state),
            step - state["reg_start"],
            state["phase"],
            state["stabilise_start"],
            self.reg_schedule,
        )
        slots = self.unit_slots(model)
        for layer, layer_state in zip(self.pruned_layers(model), layers):
            if slots is not None:
                model.scale_units(slots[layer.name], layer_state.mask)
                continue
            kernel = model.layer_module(layer.name).kernel
            kernel[...] = kernel[...] * layer_state.mask
        return {
            **state,
            "layers": [layer._asdict() for layer in layers],
            "phase": phase,
            "prune_step": jnp.where(now, step, state["prune_step"]),
            "iteration": step + 1,
        }


class GRegPretraining(Dense):
    """The pretraining phase of a GReg run: the dense objective, cross-entropy +
    (l2/2)||theta||^2, no schedule; marks the next step as the first of regularisation."""

    name = "greg_pretraining"

    def __init__(self, parent: GReg):
        super().__init__(parent.config, parent.run)

    def after_update(self, model, state, step, key):
        next_step = step + 1
        return {**state, "iteration": next_step, "reg_start": next_step}


@register
class GReg1(GReg):
    """GReg-1: the pruned set is chosen by magnitude before regularisation; only it is
    penalised, with a growing coefficient."""

    name = "greg1"
    variant = 1


@register
class GReg2(GReg):
    """GReg-2: a uniformly growing penalty first, then the pruned set is picked by magnitude and
    pushed to zero while the kept groups get ``greg_delta_recover``."""

    name = "greg2"
    variant = 2
