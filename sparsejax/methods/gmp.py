"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune", arXiv 1710.01878).

Every ``prune_every`` updates between ``prune_start_epoch`` and ``prune_end_epoch`` the
sparsity target rises along the cubic schedule (their eq. 1)

    s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (n dt))^3

and the smallest entries are masked until each layer (``gmp_scope="layer"``) or the network as
a whole (``"global"``: one magnitude threshold over all kernels) is at s_t. Masks persist: a
pruned entry is zero after every later update and never revives. ``gmp_structure``:

- ``"weight"``: single kernel entries by |w| (the paper's method);
- ``"unit"``: whole output units (conv filters, dense neurons) by the L1 norm of their kernel
  slice (Li et al. 2017, "Pruning Filters for Efficient ConvNets"), their bias and following
  BatchNorm zeroed with them so that slimming removes them. Layers whose outputs feed a
  residual stream or are the classes are not pruned by units (removing a stream channel from
  one member does not remove it).

Loss: cross-entropy + (l2/2)||theta||^2. The state is one mask per pruned layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sparsejax.errors import ConfigError
from sparsejax.methods.base import Method, MethodState, RunInfo, cross_entropy
from sparsejax.methods.fields import Field
from sparsejax.methods.masking import unit_variables
from sparsejax.methods.penalties import gated_l2
from sparsejax.methods.prune_sampling import cubic_sparsity
from sparsejax.methods.registry import register
from sparsejax.models.base import GatedModel

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
}


def _smallest(scores: jax.Array, count: jax.Array) -> jax.Array:
    """Boolean mask of the ``count`` smallest of ``scores`` (ties: lower flat index first)."""
    ranks = jnp.argsort(jnp.argsort(scores.ravel(), stable=True), stable=True)
    return (ranks < count).reshape(scores.shape)


@register
class GradualMagnitudePruning(Method):
    """Config: :data:`FIELDS`, ``l2``. See the module docstring."""

    name = "gmp"
    fields = FIELDS

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

    @classmethod
    def resolve(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The fields' defaults; the ramp ends at two thirds of the run unless given."""
        resolved = super().resolve(config)
        if resolved.prune_end_epoch is None:
            with resolved.unlocked():
                resolved.prune_end_epoch = 2.0 * resolved.epochs / 3.0
        return resolved

    def pruned_layers(self, model: GatedModel) -> tuple[str, ...]:
        """The layers whose kernels (or units) are pruned."""
        if self.config.gmp_structure == "weight":
            return tuple(layer.name for layer in model.layers)
        in_streams = {name for coupling in model.channel_couplings for name in coupling.layers}
        return tuple(
            layer.name for layer in model.layers[:-1] if layer.name not in in_streams
        )

    def init(self, model: GatedModel) -> MethodState:
        """``{"masks": {layer: all-True mask}}``: shaped like the kernel (weights) or its units."""
        per_unit = self.config.gmp_structure == "unit"
        layers = self.pruned_layers(model)
        if not layers:
            raise ConfigError(
                f"{type(model).__name__} has no layer that gmp can prune by units outside a "
                "residual stream; use --config.gmp_structure=weight"
            )
        shapes = {
            name: model.layer_module(name).kernel.shape[-1:] if per_unit
            else model.layer_module(name).kernel.shape
            for name in layers
        }
        return {"masks": {name: jnp.ones(shape, bool) for name, shape in shapes.items()}}

    def target_sparsity(self, updates: jax.Array) -> jax.Array:
        """s_t after ``updates`` updates, held between pruning steps."""
        every = self.config.prune_every
        since = jnp.maximum(updates - self.start, 0.0)
        held = self.start + jnp.floor(since / every) * every
        return cubic_sparsity(
            held,
            initial=self.config.initial_sparsity,
            final=self.config.final_sparsity,
            start=self.start,
            end=self.end,
        )

    def scores(self, model: GatedModel, name: str) -> jax.Array:
        """|w| of every kernel entry, or the L1 norm of every output unit's kernel slice."""
        magnitude = jnp.abs(model.layer_module(name).kernel[...])
        if self.config.gmp_structure == "unit":
            return jnp.sum(magnitude, axis=tuple(range(magnitude.ndim - 1)))
        return magnitude

    def new_masks(
        self, model: GatedModel, masks: dict[str, jax.Array], target: jax.Array
    ) -> dict[str, jax.Array]:
        """Masks with the smallest live scores removed until the target sparsity is met."""
        scores = {
            name: jnp.where(mask, self.scores(model, name), -1.0) for name, mask in masks.items()
        }
        if self.config.gmp_scope == "layer":
            return {
                name: masks[name] & ~_smallest(score, jnp.round(target * score.size))
                for name, score in scores.items()
            }
        flat = jnp.concatenate([score.ravel() for score in scores.values()])
        pruned = _smallest(flat, jnp.round(target * flat.size))
        new, offset = {}, 0
        for name, score in scores.items():
            new[name] = masks[name] & ~pruned[offset : offset + score.size].reshape(score.shape)
            offset += score.size
        return new

    def penalty(self, model: GatedModel, state: MethodState) -> jax.Array:
        return gated_l2(model, {}, self.config.l2)

    def objective(self, model, state, images, labels, key):
        logits = model(images, train=True)
        data_loss = jnp.mean(cross_entropy(logits, labels))
        return self.loss_and_parts(data_loss, self.penalty(model, state), logits)

    def after_update(self, model, state, step, key):
        """At a pruning step, mask the smallest entries up to s_t; re-apply every mask."""
        updates = step + 1
        pruning = (
            (updates >= self.start)
            & (updates <= self.end + self.config.prune_every)
            & ((updates - self.start) % self.config.prune_every < 1)
        )
        masks = jax.lax.cond(
            pruning,
            lambda: self.new_masks(model, state["masks"], self.target_sparsity(updates)),
            lambda: dict(state["masks"]),
        )
        for name, mask in masks.items():
            variables = (
                unit_variables(model, name)
                if self.config.gmp_structure == "unit"
                else [model.layer_module(name).kernel]
            )
            for variable in variables:
                variable[...] = jnp.where(mask, variable[...], 0.0)
        return {"masks": masks}

    def report(self, model: GatedModel, state: MethodState) -> dict[str, Any]:
        """The fraction of pruned entries (or units) of every pruned layer and overall."""
        masks = {name: jax.device_get(mask) for name, mask in state["masks"].items()}
        pruned = {name: float(1.0 - mask.mean()) for name, mask in masks.items()}
        total = sum(mask.size for mask in masks.values())
        kept = sum(int(mask.sum()) for mask in masks.values())
        return {"gmp/sparsity": pruned, "gmp/overall_sparsity": 1.0 - kept / total}
