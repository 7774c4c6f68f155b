"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune", arXiv 1710.01878).

The pruning steps are the updates t_0, t_0 + dt, t_0 + 2 dt, ... up to the ramp's end t_1 =
t_0 + n dt (``prune_start_epoch``, ``prune_every``, ``prune_end_epoch``; t counts applied
updates), and t_1 itself when dt does not divide the ramp, so that s_f is always reached at
t_1. At each the sparsity target follows the cubic schedule (their eq. 1)

    s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (n dt))^3

and the smallest live entries are masked until each layer (``gmp_scope="layer"``) or the
network as a whole (``"global"``: one magnitude threshold over all pruned kernels) is at s_t;
between pruning steps the target, and the masks, are held. Masks persist: a pruned entry is
zero after every later update and never revives. A layer always keeps its largest entry (unit),
so that no layer is cut off whole. ``gmp_structure``:

- ``"weight"``: single kernel entries by |w| (the paper's method);
- ``"unit"``: whole output units (conv filters, dense neurons) ranked by the L1 norm of their
  kernel slice (Li et al. 2017, "Pruning Filters for Efficient ConvNets"), divided by the slice's
  size so that units of layers with different fan-in compare under one global threshold (the
  ranking inside a layer is the L1 ranking). The units are those of the model's gate slots
  (every zoo model and ``--model=MODULE:FACTORY`` is traced): the prunable groups of its trace
  outside the residual streams (:func:`~sparsejax.structure.blocks.outside_streams`), or a
  transformer's placed heads and FFN units, scored by their first producer's filter and removed
  with every slice the trace ties to them (producers, normalisers, readers' rows), so that
  slimming removes them; a target is refused there (give ``final_sparsity``).

Loss: cross-entropy + (l2/2)||theta||^2. The state is one mask per pruned layer.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sparsejax.errors import ConfigError
from sparsejax.methods.base import Method, MethodState, RunInfo, cross_entropy
from sparsejax.methods.budget import TARGET_FIELDS, requested_target
from sparsejax.methods.budget_ratio import layers_ratio, slots_ratio
from sparsejax.methods.fields import Field
from sparsejax.methods.masking import refuse_unit_zeroing
from sparsejax.methods.penalties import gated_l2
from sparsejax.methods.prune_sampling import cubic_sparsity
from sparsejax.methods.registry import register
from sparsejax.methods.slot_groups import unit_mean_magnitudes
from sparsejax.models.base import GatedModel, GateSlot
from sparsejax.structure.blocks import outside_streams

SCOPES = ("layer", "global")
STRUCTURES = ("weight", "unit")

FIELDS = {
    "final_sparsity": Field(0.9, "s_f, the fraction of entries (or units) pruned at the end"),
    "initial_sparsity": Field(0.0, "s_i, the target when the ramp starts"),
    "prune_start_epoch": Field(0.0, "t_0, the ramp's start (fractional epochs)"),
    "prune_end_epoch": Field(
        None,
        "the ramp's end (fractional epochs; None: two thirds of the run)",
        kind=float,
    ),
    "prune_every": Field(100, "dt, updates between two pruning steps"),
    "gmp_scope": Field("layer", "layer: every layer at s_t; global: one threshold for all"),
    "gmp_structure": Field("weight", "weight: single entries by |w|; unit: units by L1 norm"),
    **TARGET_FIELDS,
}


def _smallest(scores: jax.Array, count: jax.Array) -> jax.Array:
    """Boolean mask of the ``count`` smallest of ``scores`` (ties: lower flat index first)."""
    ranks = jnp.argsort(jnp.argsort(scores.ravel(), stable=True), stable=True)
    return (ranks < count).reshape(scores.shape)


def _slot(model: GatedModel, name: str) -> GateSlot:
    """The gate slot ``name`` of ``model``."""
    return next(slot for slot in model.gate_slots if slot.name == name)


def _largest_one(scores: jax.Array) -> jax.Array:
    """Boolean mask of one largest entry of ``scores``."""
    flat = jnp.zeros(scores.size, bool).at[jnp.argmax(scores.ravel())].set(True)
    return flat.reshape(scores.shape)


@register
class GradualMagnitudePruning(Method):
    """Config: :data:`FIELDS`, ``l2``. See the module docstring."""

    name = "gmp"
    fields = FIELDS
    uses_gate_placements = False

    def __init__(self, config: ml_collections.ConfigDict, run: RunInfo):
        super().__init__(config, run)
        config = self.config
        for field, valid in (("gmp_scope", SCOPES), ("gmp_structure", STRUCTURES)):
            if config[field] not in valid:
                raise ConfigError(f"config.{field} must be one of {valid}, got {config[field]!r}")
        if not 0.0 <= config.initial_sparsity <= config.final_sparsity < 1.0:
            raise ConfigError(
                "need 0 <= initial_sparsity <= final_sparsity < 1, got "
                f"{config.initial_sparsity} and {config.final_sparsity}"
            )
        if config.prune_every < 1:
            raise ConfigError(f"config.prune_every must be >= 1, got {config.prune_every}")
        end_epoch = config.prune_end_epoch
        if end_epoch is None:
            end_epoch = 2.0 * run.epochs / 3.0
        self.start = float(config.prune_start_epoch) * run.steps_per_epoch
        self.end = float(end_epoch) * run.steps_per_epoch
        if not 0 <= self.start <= self.end:
            raise ConfigError(
                f"need 0 <= prune_start_epoch <= prune_end_epoch, got "
                f"{config.prune_start_epoch} and {end_epoch}"
            )
        self.l2 = float(config.get("l2") or 0.0)
        self.first_step = max(math.ceil(self.start), 1)
        """The first pruning step (in applied updates; an update is needed before pruning)."""
        self.last_step = max(math.ceil(self.end), self.first_step)
        """The last pruning step, where the target reaches s_f."""

    @classmethod
    def resolve(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The fields' defaults; the ramp ends at two thirds of the run unless given."""
        resolved = super().resolve(config)
        if resolved.prune_end_epoch is None:
            with resolved.unlocked():
                resolved.prune_end_epoch = 2.0 * resolved.epochs / 3.0
        return resolved

    def by_slots(self, model: GatedModel) -> bool:
        """Whether ``model``'s units are pruned by gate slot: a traced model's prunable groups
        (``gmp_structure="unit"``), each unit removed with every slice the trace ties to it
        (:meth:`~sparsejax.structure.traced_model.TracedModel.scale_units`)."""
        return self.config.gmp_structure == "unit" and model.granularity == "unit"

    def pruned_layers(self, model: GatedModel) -> tuple[str, ...]:
        """The layers whose kernel entries are pruned (``gmp_structure="weight"``), or the unit
        gate slots outside the residual streams whose units are (``"unit"``; refused, with a
        :class:`ConfigError`, for a model without unit slots)."""
        if self.config.gmp_structure == "weight":
            return tuple(layer.name for layer in model.layers)
        if not self.by_slots(model):
            refuse_unit_zeroing("gmp_structure=unit")
        return tuple(outside_streams(model))

    def init(self, model: GatedModel) -> MethodState:
        """``{"masks": {layer: all-True mask}}``: shaped like the kernel (weights) or its units."""
        layers = self.pruned_layers(model)
        if not layers:
            raise ConfigError(
                f"{type(model).__name__} has no layer that gmp can prune by units (outside "
                "residual streams, not the classifier); use --config.gmp_structure=weight"
            )
        self.final_sparsity(model)
        shapes = {
            name: _slot(model, name).shape if self.by_slots(model)
            else model.layer_module(name).kernel.shape
            for name in layers
        }
        return {"masks": {name: jnp.ones(shape, bool) for name, shape in shapes.items()}}

    def is_pruning_step(self, updates: jax.Array) -> jax.Array:
        """Whether the masks are recomputed after ``updates`` applied updates: every
        ``prune_every`` updates from the first pruning step, and the last one."""
        updates = jnp.asarray(updates)
        on_grid = (updates - self.first_step) % self.config.prune_every == 0
        return (updates >= self.first_step) & (
            (on_grid & (updates <= self.last_step)) | (updates == self.last_step)
        )

    def last_pruning_step(self, updates: jax.Array) -> jax.Array:
        """The latest pruning step at or before ``updates`` (``first_step - 1`` before it)."""
        updates = jnp.asarray(updates)
        every = self.config.prune_every
        grid = self.first_step + jnp.floor_divide(updates - self.first_step, every) * every
        held = jnp.where(updates >= self.last_step, self.last_step, grid)
        return jnp.where(updates >= self.first_step, held, self.first_step - 1)

    def final_sparsity(self, model: GatedModel) -> float:
        """s_f: ``final_sparsity``, or under a target (``target_flops`` / ``target_params``)
        the ratio that, pruned from every pruned layer (or a traced model's gate slot) alike
        (``gmp_scope="layer"``), meets it (:mod:`sparsejax.methods.budget_ratio`)."""
        target = requested_target(self.config)
        if target is None:
            return float(self.config.final_sparsity)
        if self.config.gmp_scope != "layer":
            raise ConfigError(
                "a target chooses one ratio for every layer: use it with gmp_scope=layer"
            )
        what = f"gmp ({self.config.gmp_structure} structure)"
        if self.by_slots(model):
            slots = {slot.name: slot for slot in model.gate_slots}
            pruned = [slots[name] for name in self.pruned_layers(model)]
            ratio = slots_ratio(model.layers, pruned, target, what=what)
        else:
            ratio = layers_ratio(model.layers, self.pruned_layers(model), target,
                                 structure=self.config.gmp_structure, what=what)
        if ratio < self.config.initial_sparsity:
            raise ConfigError(
                f"target_{target.kind}={target.fraction} needs a final sparsity of {ratio:.3f}, "
                f"below initial_sparsity={self.config.initial_sparsity}"
            )
        return ratio

    def target_sparsity(self, updates: jax.Array, final: float | None = None) -> jax.Array:
        """s_t after ``updates`` updates: the cubic schedule towards ``final`` (None:
        ``final_sparsity``) at the latest pruning step, held between pruning steps (s_i before
        the first)."""
        held = self.last_pruning_step(updates)
        scheduled = cubic_sparsity(
            held,
            initial=self.config.initial_sparsity,
            final=self.config.final_sparsity if final is None else final,
            start=self.start,
            end=self.end,
        )
        return jnp.where(held >= self.first_step, scheduled, self.config.initial_sparsity)

    def scores(self, model: GatedModel, name: str) -> jax.Array:
        """|w| of every kernel entry, or the L1 norm of every output unit's kernel slice
        divided by the slice's size (its mean |w|; over its first producer's filter for a
        traced model's slot)."""
        if self.by_slots(model):
            return unit_mean_magnitudes(model, _slot(model, name))
        magnitude = jnp.abs(model.layer_module(name).kernel[...])
        if self.config.gmp_structure == "unit":
            return jnp.mean(magnitude, axis=tuple(range(magnitude.ndim - 1)))
        return magnitude

    def new_masks(
        self, model: GatedModel, masks: dict[str, jax.Array], target: jax.Array
    ) -> dict[str, jax.Array]:
        """Masks with the smallest live scores removed until the target sparsity is met, each
        layer keeping its largest entry (unit). Pruned entries score -1 (they are counted
        first), so the masks only shrink."""
        scores = {
            name: jnp.where(mask, self.scores(model, name), -1.0) for name, mask in masks.items()
        }
        if self.config.gmp_scope == "layer":
            return {
                name: masks[name]
                & ~_smallest(score, jnp.minimum(jnp.round(target * score.size), score.size - 1))
                for name, score in scores.items()
            }
        protected = {name: _largest_one(score) for name, score in scores.items()}
        flat = jnp.concatenate(
            [jnp.where(protected[name], jnp.inf, score).ravel() for name, score in scores.items()]
        )
        count = jnp.minimum(jnp.round(target * flat.size), flat.size - len(scores))
        pruned = _smallest(flat, count)
        new, offset = {}, 0
        for name, score in scores.items():
            new[name] = masks[name] & ~pruned[offset : offset + score.size].reshape(score.shape)
            offset += score.size
        return new

    def penalty(self, model: GatedModel, state: MethodState) -> jax.Array:
        return gated_l2(model, {}, self.l2)

    def objective(self, model, state, images, labels, key):
        logits = model(images, train=True)
        data_loss = jnp.mean(cross_entropy(logits, labels))
        return self.loss_and_parts(data_loss, self.penalty(model, state), logits)

    def after_update(self, model, state, step, key):
        """At a pruning step, mask the smallest entries up to s_t; re-apply every mask."""
        updates = step + 1
        masks = jax.lax.cond(
            self.is_pruning_step(updates),
            lambda: self.new_masks(
                model, state["masks"], self.target_sparsity(updates, self.final_sparsity(model))
            ),
            lambda: dict(state["masks"]),
        )
        for name, mask in masks.items():
            if self.by_slots(model):
                model.scale_units(_slot(model, name), mask.astype(jnp.float32))
                continue
            kernel = model.layer_module(name).kernel
            kernel[...] = jnp.where(mask, kernel[...], 0.0)
        return {"masks": masks}

    def report(self, model: GatedModel, state: MethodState) -> dict[str, Any]:
        """The fraction of pruned entries (or units) of every pruned layer and overall."""
        masks = {name: jax.device_get(mask) for name, mask in state["masks"].items()}
        pruned = {name: float(1.0 - mask.mean()) for name, mask in masks.items()}
        total = sum(mask.size for mask in masks.values())
        kept = sum(int(mask.sum()) for mask in masks.values())
        return {
            "gmp/sparsity": pruned,
            "gmp/overall_sparsity": 1.0 - kept / total,
            "gmp/final_sparsity": self.final_sparsity(model),
        }
