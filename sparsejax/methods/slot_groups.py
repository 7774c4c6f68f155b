"""Per-unit sums, norms and scalings over the parameter groups of a slot.

A gate slot's units own parameter entries (:meth:`~sparsejax.models.base.GatedModel.slot_members`):
one kernel axis for the convolutional zoo, entries of several kernels, biases and norms for a
transformer head, FFN unit or hidden dimension. With m a member, ``units_m(i)`` the unit of index
i along its axis, the squared norm of unit j is

    ||theta_j||^2 = sum_m sum_{entries e of m with units_m(e) = j} theta_e^2

and removing unit j zeroes every such entry. *Layer members* are the kernels and biases of
declared layers: the parameters that the accounting, the gated L2 and the group norms count;
the other members (norm scales and biases, position embeddings, a class token) are only zeroed
with their unit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.estimators.bounded_lp import safe_norm
from sparsejax.models.base import GatedModel, GateSlot, SlotMember

LAYER_PARAMETERS = ("kernel", "bias")


def is_layer_member(model: GatedModel, member: SlotMember) -> bool:
    """Whether the member is a kernel or bias of a declared layer."""
    owner, _, name = member.path.rpartition(".")
    return name in LAYER_PARAMETERS and any(layer.name == owner for layer in model.layers)


def layer_members(model: GatedModel, slot: GateSlot) -> tuple[SlotMember, ...]:
    """The slot's members that are kernels or biases of declared layers."""
    return tuple(m for m in model.slot_members(slot) if is_layer_member(model, m))


def kernel_members(model: GatedModel, slot: GateSlot) -> tuple[SlotMember, ...]:
    """The slot's members that are kernels of declared layers."""
    return tuple(m for m in layer_members(model, slot) if m.path.endswith(".kernel"))


def reduce_to_axis(values: jax.Array, axis: int) -> jax.Array:
    """The sum of ``values`` over every axis but ``axis``."""
    other = tuple(a for a in range(values.ndim) if a != axis % values.ndim)
    return jnp.sum(values, axis=other)


def unit_sums(values: jax.Array, member: SlotMember, slot: GateSlot) -> jax.Array:
    """Entry values of one member (shaped like its parameter) summed per unit of ``slot``."""
    if member.axis is None:
        return values
    along = reduce_to_axis(values, member.axis)
    if member.units is None:
        return along
    return jax.ops.segment_sum(along, jnp.asarray(member.units), num_segments=slot.shape[0])


def unit_square_sums(
    model: GatedModel, slot: GateSlot, members: tuple[SlotMember, ...] | None = None
) -> jax.Array:
    """||theta_j||^2 of every unit over ``members`` (default: the layer members)."""
    members = layer_members(model, slot) if members is None else members
    total = jnp.zeros(slot.shape, jnp.float32)
    for member in members:
        total = total + unit_sums(jnp.square(model.parameter(member.path)[...]), member, slot)
    return total


def unit_norms(model: GatedModel, slot: GateSlot) -> jax.Array:
    """||theta_j||_2 of every unit over its layer members, with gradient 0 at a zero group.

    When every member indexes its units one to one (a kernel axis and its bias, the
    convolutional zoo) the groups are concatenated rows, one norm per row; weight gates take
    |w| of their entry."""
    members = layer_members(model, slot)
    if all(m.axis is not None and m.units is None for m in members):
        rows = [
            jnp.moveaxis(value, m.axis, 0).reshape(value.shape[m.axis], -1)
            for m in members
            for value in (model.parameter(m.path)[...],)
        ]
        return safe_norm(jnp.concatenate(rows, axis=1), axis=1)
    if all(m.axis is None for m in members):
        return safe_norm(jnp.stack([model.parameter(m.path)[...] for m in members], -1), axis=-1)
    squares = unit_square_sums(model, slot, members)
    positive = squares > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def unit_mean_magnitudes(model: GatedModel, slot: GateSlot) -> jax.Array:
    """mean |w| over the kernel entries of every unit (GReg's filter score, over all kernels a
    unit spans)."""
    members = kernel_members(model, slot)
    total = jnp.zeros(slot.shape, jnp.float32)
    count = jnp.zeros(slot.shape, jnp.float32)
    for member in members:
        value = jnp.abs(jax.lax.stop_gradient(model.parameter(member.path)[...]))
        total = total + unit_sums(value, member, slot)
        count = count + unit_sums(jnp.ones_like(value), member, slot)
    return total / count
