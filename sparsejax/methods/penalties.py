"""Sparsity penalties of the L0 family: expected L0 weighted by group size, and gated L2.

With per-gate keep probabilities q_j (P(z_j != 0) for hard-concrete gates, pi_j for binary gates)
the penalty of Louizos et al. (2018, eq. 13-14) and Li & Ji (2019) is

    R = (1/N) * sum_slots lambda_s * |g_s| * sum_j q_j                       (expected L0)
      + (l2/2) * sum_layers [ sum_j q_j * ||theta_g_j||^2 + ||ungated params||^2 ]   (gated L2)

(an entry in the groups of several gates, e.g. a transformer's query kernel, is weighted by the
product of their keep probabilities; see :func:`gated_l2`)

where |g_s| is the number of weights one gate of slot s removes and N the training-set size:
a paper's "lambda = c/N" is ``lambda = c`` here. The L2 cost of a group is paid only when the group
is expected to be on (E[z^2] is bounded by P(z != 0)); ``l2`` is the effective coefficient (the
reference code passes N * wd to its layers and divides by N again).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from sparsejax.methods.slot_groups import LAYER_PARAMETERS, unit_sums
from sparsejax.models.base import GatedModel, GateSlot, SlotMember, per_unit


def expected_l0(
    slots: tuple[GateSlot, ...],
    keep_probs: Mapping[str, jax.Array],
    lambdas: Mapping[str, float],
    num_train: int,
    *,
    reference_bias_sign: bool = False,
) -> jax.Array:
    """(1/N) sum_s lambda_s |g_s| sum_j q_j over the gated slots.

    ``reference_bias_sign`` reproduces the L0-HC reference code, whose convolution gates count
    their bias with -lambda instead of +lambda (a reward for every open channel).
    """
    total = jnp.zeros(())
    for slot in slots:
        if slot.name not in keep_probs:
            continue
        group = slot.group_size
        if reference_bias_sign and slot.gates_bias:
            group -= 2
        total = total + lambdas[slot.name] * group * jnp.sum(keep_probs[slot.name])
    return total / num_train


def _weighted_squares(
    squares: jax.Array, members: list[tuple[SlotMember, GateSlot]], keep_probs
) -> jax.Array:
    """sum_e prod_{gates g over entry e} q_g * theta_e^2 of one parameter's squares, over the
    members of the gated slots that name it (one member: reduced to its units first)."""
    if not members:
        return jnp.sum(squares)
    if len(members) == 1:
        member, slot = members[0]
        return jnp.sum(keep_probs[slot.name] * unit_sums(squares, member, slot))
    weights = jnp.ones((), squares.dtype)
    for member, slot in members:
        weights = weights * per_unit(member, keep_probs[slot.name], squares.shape)
    return jnp.sum(weights * squares)


def gated_l2(model: GatedModel, keep_probs: Mapping[str, jax.Array], l2: float) -> jax.Array:
    """(l2/2) times the squared norms of all kernels and biases, each entry weighted by the keep
    probability of every gate whose group contains it (:meth:`GatedModel.slot_members`):
    E[||theta * z||^2] <= sum_e prod_g q_g theta_e^2 for independent gates (Louizos et al.
    2018, eq. 14, the group form). A kernel with one gated axis (the convolutional zoo) is
    ``sum_j q_j ||theta_g_j||^2``; an entry of a transformer's query kernel is weighted by its
    head's, KV group's, sublayer's and hidden dimension's probabilities."""
    if l2 == 0.0:
        return jnp.zeros(())
    members_of: dict[str, list[tuple[SlotMember, GateSlot]]] = {}
    for slot in model.gate_slots:
        if slot.name in keep_probs:
            for member in model.slot_members(slot):
                members_of.setdefault(member.path, []).append((member, slot))
    total = jnp.zeros(())
    for layer in model.layers:
        module = model.layer_module(layer.name)
        for name in LAYER_PARAMETERS:
            value = getattr(module, name, None)
            if value is not None:
                members = members_of.get(f"{layer.name}.{name}", [])
                total = total + _weighted_squares(jnp.square(value[...]), members, keep_probs)
    return 0.5 * l2 * total
