"""The Dep-L0 sparsity penalty: expected weights of the gated layers, with no 1/N
(Li & Ji 2021, arXiv 2107.00070; the form of the reference code).

With keep probabilities q (P(z != 0) for hard-concrete gates, pi for binary gates) and
E[active] = sum of q over a layer's units,

    R = lambda * ( sum_{conv layers l} k_l^2 * E[active in_l] * E[active out_l]
                 + sum_{dense slots s} |g_s| * sum_j q_j )

The product term is the expected number of kernel weights of convolution l when its input and
output channels are switched off by independent gates, so the gradient reaches the gates on both
sides of a layer; the dense term is the expected L0 of Louizos et al. (2018) weighted by the group
size (a dense slot gates input neurons, |g| = out features). A transformer's slots span several
layers (a head's query, key, value and output slices; the hidden dimension every block's), so
for them the dense term is the expected number of kernel weights of every layer they gate, with
the product of the keep probabilities on its input and output units, like the convolution term
(:func:`span_expected_weights`). Which slots switch off a layer's
input and output channels is read from the model's :class:`~sparsejax.models.base.Layer`
declarations (``form="layers"``): a layer with no gated input (the first convolution; a ResNet
block's conv1, which reads the ungated residual stream) counts its full input width, e.g. 3 for
RGB, and every convolution with a gated side counts, the second convolution of a ResNet block
(gated inputs) included.

The method adds the gated L2 of the L0 methods (coefficient ``l2``) to R; see
:mod:`sparsejax.methods.dep_l0`.

Two reference forms are kept for comparison with the published lambdas:

- ``"reference_chain"`` (VGG-16 and ResNet-56 code): a chain over the gated convolution slots in
  network order, k_l^2 * E_{l-1} * E_l with E_0 the first gated convolution's input channels. For
  VGG-16 this is the ``"layers"`` form; for a ResNet it treats a block's conv1 as reading the
  previous gate's channels and leaves out conv2.
- ``"reference_k4"`` (ResNet-50 code): sum_l k_l^4 * C_in,l * E_l, uncoupled, with the full input
  width and k^2 applied twice (x81 for a 3x3 kernel, x2401 for a 7x7 one), a bug of the reference.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from sparsejax.models.base import GateSlot, Layer, SpanSlot
from sparsejax.structure.accounting import count_layer

PENALTY_FORMS: tuple[str, ...] = ("layers", "reference_chain", "reference_k4")


def _is_conv(kernel_shape: tuple[int, ...]) -> bool:
    return len(kernel_shape) == 4


def _gated_conv_slots(
    slots: tuple[GateSlot, ...], keep_probs: Mapping[str, jax.Array]
) -> list[GateSlot]:
    return [s for s in slots if s.name in keep_probs and _is_conv(s.kernel_shape)]


def _spans(slot: GateSlot) -> bool:
    return isinstance(slot, SpanSlot)


def dense_expected_l0(
    slots: tuple[GateSlot, ...], keep_probs: Mapping[str, jax.Array]
) -> jax.Array:
    """sum over the dense-layer slots of |g_s| * sum_j q_j (slots spanning several layers are
    counted by :func:`span_expected_weights` instead)."""
    total = jnp.zeros(())
    for slot in slots:
        if slot.name in keep_probs and not _is_conv(slot.kernel_shape) and not _spans(slot):
            total = total + slot.group_size * jnp.sum(keep_probs[slot.name])
    return total


def conv_expected_weights(
    layers: tuple[Layer, ...], keep_probs: Mapping[str, jax.Array]
) -> jax.Array:
    """sum over convolutions with a gated side of k^2 * E[active in] * E[active out]."""
    total = jnp.zeros(())
    for layer in layers:
        sources = (*layer.inputs, *layer.outputs)
        if _is_conv(layer.kernel_shape) and any(name in keep_probs for name, _ in sources):
            total = total + count_layer(layer, keep_probs).weights
    return total


def span_expected_weights(
    layers: tuple[Layer, ...], slots: tuple[GateSlot, ...], keep_probs: Mapping[str, jax.Array]
) -> jax.Array:
    """sum over the dense layers that a spanning slot (a transformer's heads, KV groups, FFN
    units, sublayers, hidden dimension) gates of their expected kernel weights: each weight
    counted once with the product of the keep probabilities of every gate on its input and
    output (:func:`~sparsejax.structure.accounting.count_layer`), the dense analogue of the
    convolution term."""
    spanning = {s.name for s in slots if s.name in keep_probs and _spans(s)}
    total = jnp.zeros(())
    for layer in layers:
        sources = (*layer.inputs, *layer.outputs)
        if not _is_conv(layer.kernel_shape) and any(name in spanning for name, _ in sources):
            total = total + count_layer(layer, keep_probs).weights
    return total


def reference_chain(
    slots: tuple[GateSlot, ...], keep_probs: Mapping[str, jax.Array]
) -> jax.Array:
    """sum_l k_l^2 * E_{l-1} * E_l over the gated convolution slots in order."""
    total = jnp.zeros(())
    conv_slots = _gated_conv_slots(slots, keep_probs)
    if not conv_slots:
        return total
    previous = jnp.asarray(float(conv_slots[0].kernel_shape[2]))
    for slot in conv_slots:
        active = jnp.sum(keep_probs[slot.name])
        total = total + slot.kernel_shape[0] * slot.kernel_shape[1] * previous * active
        previous = active
    return total


def reference_k4(slots: tuple[GateSlot, ...], keep_probs: Mapping[str, jax.Array]) -> jax.Array:
    """sum_l k_l^4 * C_in,l * E_l over the gated convolution slots."""
    total = jnp.zeros(())
    for slot in _gated_conv_slots(slots, keep_probs):
        kh, kw, in_channels, _ = slot.kernel_shape
        total = total + (kh * kw) ** 2 * in_channels * jnp.sum(keep_probs[slot.name])
    return total


def dep_l0_penalty(
    layers: tuple[Layer, ...],
    slots: tuple[GateSlot, ...],
    keep_probs: Mapping[str, jax.Array],
    lam: float,
    *,
    form: str = "layers",
) -> jax.Array:
    """lambda * (convolution term of ``form`` + dense expected L0); see the module docstring."""
    if form == "layers":
        conv = conv_expected_weights(layers, keep_probs)
    elif form == "reference_chain":
        conv = reference_chain(slots, keep_probs)
    elif form == "reference_k4":
        conv = reference_k4(slots, keep_probs)
    else:
        raise ValueError(f"penalty form must be one of {PENALTY_FORMS}, got {form!r}")
    dense = dense_expected_l0(slots, keep_probs) + span_expected_weights(layers, slots, keep_probs)
    return lam * (conv + dense)
