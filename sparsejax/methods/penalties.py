"""Sparsity penalties of the L0 family: expected L0 weighted by group size, and gated L2.

With per-gate keep probabilities q_j (P(z_j != 0) for hard-concrete gates, pi_j for binary gates)
the penalty of Louizos et al. (2018, eq. 13-14) and Li & Ji (2019) is

    R = (1/N) * sum_slots lambda_s * |g_s| * sum_j q_j                       (expected L0)
      + (l2/2) * sum_layers [ sum_j q_j * ||theta_g_j||^2 + ||ungated params||^2 ]   (gated L2)

where |g_s| is the number of weights one gate of slot s removes and N the training-set size:
a paper's "lambda = c/N" is ``lambda = c`` here. The L2 cost of a group is paid only when the group
is expected to be on (E[z^2] is bounded by P(z != 0)); ``l2`` is the effective coefficient (the
reference code passes N * wd to its layers and divides by N again).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from sparsejax.models.base import GatedModel, GateSlot


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


def _group_sum(squares: jax.Array, axis: int) -> jax.Array:
    other = tuple(a for a in range(squares.ndim) if a != axis % squares.ndim)
    return jnp.sum(squares, axis=other)


def gated_l2(model: GatedModel, keep_probs: Mapping[str, jax.Array], l2: float) -> jax.Array:
    """(l2/2) times the squared norms of all kernels and biases, each gated group weighted by its
    keep probability."""
    if l2 == 0.0:
        return jnp.zeros(())
    slot_of_layer = {s.layer: s for s in model.gate_slots if s.name in keep_probs}
    total = jnp.zeros(())
    for layer in model.layers:
        module = model.layer_module(layer.name)
        kernel_sq = jnp.square(module.kernel[...])
        bias_sq = None if module.bias is None else jnp.square(module.bias[...])
        slot = slot_of_layer.get(layer.name)
        if slot is None:
            total = total + jnp.sum(kernel_sq)
        elif slot.axis is None:
            total = total + jnp.sum(keep_probs[slot.name] * kernel_sq)
        else:
            total = total + jnp.sum(keep_probs[slot.name] * _group_sum(kernel_sq, slot.axis))
        if bias_sq is not None:
            gates_bias = slot is not None and slot.gates_bias
            total = total + jnp.sum(keep_probs[slot.name] * bias_sq if gates_bias else bias_sq)
    return 0.5 * l2 * total
