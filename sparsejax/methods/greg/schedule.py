"""The growing-regularisation schedule of GReg-1 and GReg-2 (Wang, Qin, Zhang, Fu, "Neural Pruning
via Growing Regularization", ICLR 2021, Algorithms 1 and 2; code ``pruner/reg_pruner.py``).

Every prunable layer l has weight groups j (output filters, or single weights) with scores
s_{l,j} = mean |W_{l,j}| and a non-trainable L2 coefficient lambda_{l,j}; the objective gains
sum_{l,j} (lambda_{l,j} / 2) ||W_{l,j}||^2, whose gradient lambda (.) W is added before the
optimizer (coupled). Every ``interval`` (K_u) iterations t of the regularisation phase:

- GReg-1: at t = 0 the pruned set S_l is the n_l groups of smallest score; then
  lambda_{l,j} += delta on S_l. A layer finishes when max_j lambda_{l,j} > ceiling (tau) or when
  every layer's magnitude ratio rho_l >= ratio_limit (R), rho_l being an EMA (0.9, first value
  taken as is) of mean_{j not in S_l} s_{l,j} / mean_{j in S_l} s_{l,j}.
- GReg-2: lambda_{l,.} += delta_pick uniformly until max lambda_l >= ceiling_pick; then S_l is
  the n_l groups of smallest score, and later updates add delta on S_l and set lambda to
  delta_recover (negative) on the kept groups. A layer finishes when it has picked and
  rho_l >= R or max lambda_l > tau. Before picking, rho_l follows the tentative set (the n_l
  smallest groups now), as in the reference.

Scores are those of the weights before the step's update. When every layer has finished at
iteration t_s the coefficients freeze (stabilisation); after the update of iteration
t_s + K_s the groups of S_l are zeroed and a 0/1 mask keeps them at zero after every later
update (fine-tuning). The ratio test is off for single-weight groups (``ratio_test=False``),
as in the reference.

All of it is array arithmetic on the state below (``jnp.where`` and ``lax.cond``), so it runs
inside the jitted step and is checkpointed as the method's state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.errors import ConfigError

REGULARISE, STABILISE, FINETUNE = 0, 1, 2
"""Values of the state's ``phase`` after pretraining."""

UNSET_RATIO = -1.0
RATIO_MOMENTUM = 0.9
NOT_YET = -1
"""Step value of an event that has not happened."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Hyperparameters of the schedule (reference names in brackets).

    Attributes:
      variant: 1 (GReg-1) or 2 (GReg-2).
      interval: K_u, iterations between coefficient updates [update_reg_interval].
      delta: increment on the pruned groups [reg_granularity_prune].
      ceiling: tau, a layer finishes when its largest coefficient exceeds it [reg_upper_limit].
      ratio_limit: R, magnitude ratio that finishes a layer [mag_ratio_limit].
      stabilise_steps: K_s, iterations with frozen coefficients before pruning
        [stabilize_reg_interval].
      delta_pick: GReg-2 uniform increment before picking [reg_granularity_pick].
      ceiling_pick: GReg-2 coefficient at which a layer picks [reg_upper_limit_pick].
      delta_recover: GReg-2 coefficient of the kept groups after picking
        [reg_granularity_recover].
      ratio_test: whether rho_l >= R can finish a layer (off for single-weight groups).
    """

    variant: Literal[1, 2]
    interval: int
    delta: float
    ceiling: float
    ratio_limit: float
    stabilise_steps: int
    delta_pick: float
    ceiling_pick: float
    delta_recover: float
    ratio_test: bool

    def __post_init__(self):
        if self.variant not in (1, 2):
            raise ValueError(f"GReg variant must be 1 or 2, got {self.variant}")
        if self.interval < 1 or self.stabilise_steps < 0:
            raise ConfigError(
                f"greg_interval must be >= 1 and greg_stabilise_steps >= 0, got "
                f"{self.interval} and {self.stabilise_steps}"
            )
        if self.delta <= 0 or self.ceiling <= 0 or (
            self.variant == 2 and (self.delta_pick <= 0 or self.ceiling_pick <= 0)
        ):
            raise ConfigError(
                "greg_delta, greg_ceiling (and for GReg-2 greg_delta_pick, greg_ceiling_pick) "
                "must be positive"
            )


class LayerState(NamedTuple):
    """One prunable layer's schedule state; ``penalty``, ``selected`` and ``mask`` are shaped
    like its groups (``(C_out,)`` for filters, the kernel's shape for weights)."""

    penalty: jax.Array
    selected: jax.Array
    mask: jax.Array
    ratio: jax.Array
    finished: jax.Array
    picked: jax.Array


def group_scores(kernel: jax.Array, per_weight: bool) -> jax.Array:
    """s = |W| per weight, or mean |W| of every output filter (the kernel's last axis)."""
    magnitude = jnp.abs(jax.lax.stop_gradient(kernel))
    return magnitude if per_weight else jnp.mean(magnitude, axis=tuple(range(kernel.ndim - 1)))


def broadcast_groups(values: jax.Array, kernel: jax.Array) -> jax.Array:
    """Per-group values broadcast over the kernel (filters are the kernel's last axis)."""
    return values if values.shape == kernel.shape else values.reshape((1,) * (kernel.ndim - 1) + (-1,))


def smallest(scores: jax.Array, count: int) -> jax.Array:
    """Boolean mask of the ``count`` smallest scores (ties: the lower flat index first)."""
    order = jnp.argsort(scores.ravel(), stable=True)
    chosen = jnp.zeros(scores.size, jnp.bool_).at[order[:count]].set(True)
    return chosen.reshape(scores.shape)


def magnitude_ratio(scores: jax.Array, pruned: jax.Array) -> jax.Array:
    """mean score of the kept groups / mean score of the pruned groups."""
    kept = ~pruned
    kept_mean = jnp.sum(jnp.where(kept, scores, 0.0)) / jnp.maximum(jnp.sum(kept), 1)
    pruned_mean = jnp.sum(jnp.where(pruned, scores, 0.0)) / jnp.maximum(jnp.sum(pruned), 1)
    return kept_mean / pruned_mean


def _ema(ratio: jax.Array, now: jax.Array) -> jax.Array:
    return jnp.where(ratio == UNSET_RATIO, now, RATIO_MOMENTUM * ratio + (1 - RATIO_MOMENTUM) * now)


def _choose(condition: jax.Array, scores: jax.Array, count: int, current: jax.Array) -> jax.Array:
    """``smallest(scores, count)`` where ``condition`` holds (sorted only then), else current."""
    return jax.lax.cond(condition, lambda: smallest(scores, count), lambda: current)


def _greg1_layer(layer, scores, count, t, live, schedule):
    select_now = t == 0
    selected = _choose(select_now, scores, count, layer.selected)
    picked = layer.picked | select_now
    ratio = layer.ratio
    if schedule.ratio_test:
        ratio = jnp.where(live, _ema(ratio, magnitude_ratio(scores, selected)), ratio)
    penalty = jnp.where(live, layer.penalty + schedule.delta * selected, layer.penalty)
    return layer._replace(penalty=penalty, selected=selected, ratio=ratio, picked=picked)


def _greg2_layer(layer, scores, count, live, schedule):
    grown = layer.penalty + schedule.delta_pick
    picking = live & ~layer.picked
    may_pick = jnp.max(grown) >= schedule.ceiling_pick
    tentative = _choose(picking & (may_pick | schedule.ratio_test), scores, count, layer.selected)
    pushed = jnp.where(layer.selected, layer.penalty + schedule.delta, schedule.delta_recover)
    penalty = jnp.where(live, jnp.where(layer.picked, pushed, grown), layer.penalty)
    ratio = layer.ratio
    if schedule.ratio_test:
        pruned = jnp.where(layer.picked, layer.selected, tentative)
        ratio = jnp.where(live, _ema(ratio, magnitude_ratio(scores, pruned)), ratio)
    pick_now = picking & may_pick
    return layer._replace(
        penalty=penalty,
        selected=jnp.where(pick_now, tentative, layer.selected),
        ratio=ratio,
        picked=layer.picked | pick_now,
    )


def regularise(
    layers: Sequence[LayerState],
    scores: Sequence[jax.Array],
    counts: Sequence[int],
    t: jax.Array,
    phase: jax.Array,
    stabilise_start: jax.Array,
    schedule: Schedule,
) -> tuple[list[LayerState], jax.Array, jax.Array]:
    """The coefficient update of regularisation iteration ``t`` (a no-op unless the phase is
    :data:`REGULARISE` and ``t % interval == 0``); returns the layers, the phase and the
    iteration at which stabilisation started."""
    active = (phase == REGULARISE) & (t % schedule.interval == 0)
    updated = []
    for layer, layer_scores, count in zip(layers, scores, counts):
        live = active & ~layer.finished
        if schedule.variant == 1:
            updated.append(_greg1_layer(layer, layer_scores, count, t, live, schedule))
        else:
            updated.append(_greg2_layer(layer, layer_scores, count, live, schedule))
    over_ceiling = [jnp.max(layer.penalty) > schedule.ceiling for layer in updated]
    if schedule.variant == 1:
        every_ratio = schedule.ratio_test & jnp.all(
            jnp.stack([layer.ratio >= schedule.ratio_limit for layer in updated])
        )
        done = [over | every_ratio for over in over_ceiling]
    else:
        done = [
            layer.picked & (over | (schedule.ratio_test & (layer.ratio >= schedule.ratio_limit)))
            for layer, over in zip(updated, over_ceiling)
        ]
    updated = [
        layer._replace(finished=layer.finished | (active & finish))
        for layer, finish in zip(updated, done)
    ]
    all_finished = jnp.all(jnp.stack([layer.finished for layer in updated]))
    stabilise = active & all_finished
    return (
        updated,
        jnp.where(stabilise, STABILISE, phase),
        jnp.where(stabilise, t, stabilise_start),
    )


def prune(
    layers: Sequence[LayerState],
    t: jax.Array,
    phase: jax.Array,
    stabilise_start: jax.Array,
    schedule: Schedule,
) -> tuple[list[LayerState], jax.Array, jax.Array]:
    """After the update of iteration ``t``: prune when stabilisation has lasted K_s iterations
    (mask = 0 on S_l). Returns the layers, the phase and whether pruning happened now."""
    now = (phase == STABILISE) & (t - stabilise_start == schedule.stabilise_steps)
    pruned = [
        layer._replace(mask=jnp.where(now, (~layer.selected).astype(jnp.float32), layer.mask))
        for layer in layers
    ]
    return pruned, jnp.where(now, FINETUNE, phase), now


def _additions_until(value: np.float32, delta: float, done) -> tuple[int, np.float32]:
    """How many float32 additions of ``delta`` to ``value`` it takes until ``done(value)``,
    and the value then (the coefficients accumulate in float32 inside the step)."""
    count = 0
    while not done(value):
        value = np.float32(value + np.float32(delta))
        count += 1
    return count, value


def longest_regularisation(schedule: Schedule) -> int:
    """Iterations of the regularisation phase up to and including the one whose update ends
    with pruning, when no layer finishes early on the magnitude ratio: every layer's largest
    coefficient must pass tau, after n updates (GReg-2: the uniform ones up to tau_pick, then
    the pushes), the last at iteration K_u (n - 1); pruning follows K_s iterations later."""
    ceiling = np.float32(schedule.ceiling)
    start = np.float32(0.0)
    updates = 0
    if schedule.variant == 2:
        pick_ceiling = np.float32(schedule.ceiling_pick)
        updates, start = _additions_until(
            start, schedule.delta_pick, lambda value: value >= pick_ceiling
        )
    pushes, _ = _additions_until(start, schedule.delta, lambda value: value > ceiling)
    updates += pushes
    return schedule.interval * (updates - 1) + schedule.stabilise_steps + 1
