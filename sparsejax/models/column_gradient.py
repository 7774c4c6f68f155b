"""A stride-1 convolution on batch slices whose input gradient is one matmul and shifted sums.

The input gradient of ``y = conv(x, W)`` (NHWC, HWIO, stride 1, padding ``p``, kernel
``kh x kw``) is

    dx[b, h, w, c] = sum_{i, j, o} dy[b, h + p_top - i, w + p_left - j, o] W[i, j, c, o].

XLA computes it as a convolution of the output gradient (padded by ``k - 1 - p`` on each side)
with the flipped kernel, at every input position: ``input positions / output positions`` times
the forward pass's multiply-adds (2.25x for LeNet-5's conv2, 12x12 inputs and 8x8 outputs), and
on a CPU it runs outside the convolution library, on one core. Written with columns,

    cols[i, j, b, h, w, c] = sum_o dy[b, h, w, o] W[i, j, c, o]
                             (one (B Ho Wo, O) x (O, kh kw C) matmul: the forward pass's work)
    dx = crop_p( sum_{i, j} cols[i, j] shifted by (i, j) ),

it is a matmul over the whole batch, which XLA runs on every core, and ``kh kw`` shifted
additions. Jitted alone on a 2-core CPU, the input gradient of LeNet-5's conv2 (batch 100,
12x12x20 -> 8x8x50) took 4.1 ms this way against 8.2 ms as XLA's convolution.

:func:`sliced_convolution` is the forward pass of :mod:`sparsejax.models.batch_chunks` (the
convolution on slices of the batch, concatenated) with this input gradient; its kernel gradient
is the sum of the slices' kernel gradients, as XLA derives it for the slices. The results differ
from XLA's gradients only by the order of float sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp

Padding = tuple[tuple[int, int], tuple[int, int]]
DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def explicit_padding(
    padding: str | Sequence[tuple[int, int]],
    input_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
) -> Padding:
    """``padding`` ("VALID", "SAME" or two pairs) as ``((top, bottom), (left, right))`` for a
    stride-1 convolution of an ``input_hw`` image with a ``kernel_hw`` kernel."""
    if isinstance(padding, str):
        (top, bottom), (left, right) = jax.lax.padtype_to_pads(
            input_hw, kernel_hw, (1, 1), padding
        )
    else:
        (top, bottom), (left, right) = padding
    return (int(top), int(bottom)), (int(left), int(right))


def _convolve(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=DIMENSIONS)


def column_input_gradient(
    output_gradient: jax.Array,
    kernel: jax.Array,
    input_hw: tuple[int, int],
    padding: Padding,
) -> jax.Array:
    """The input gradient ``dx`` of a stride-1 NHWC / HWIO convolution of an ``input_hw`` image,
    from its output gradient ``dy``, by columns (module docstring)."""
    kernel_h, kernel_w, in_channels, _ = kernel.shape
    batch, out_h, out_w, _ = output_gradient.shape
    columns = jnp.einsum("bhwo,ijco->ijbhwc", output_gradient, kernel)
    padded = jnp.zeros(
        (batch, out_h + kernel_h - 1, out_w + kernel_w - 1, in_channels), columns.dtype
    )
    for i in range(kernel_h):
        for j in range(kernel_w):
            padded = padded.at[:, i : i + out_h, j : j + out_w, :].add(columns[i, j])
    (top, _), (left, _) = padding
    return padded[:, top : top + input_hw[0], left : left + input_hw[1], :]


def _on_slices(x: jax.Array, kernel: jax.Array, padding: Padding, chunks: int) -> jax.Array:
    pieces = jnp.array_split(x, chunks, axis=0)
    return jnp.concatenate([_convolve(piece, kernel, padding) for piece in pieces], axis=0)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _sliced(x: jax.Array, kernel: jax.Array, padding: Padding, chunks: int) -> jax.Array:
    return _on_slices(x, kernel, padding, chunks)


def _sliced_forward(x, kernel, padding, chunks):
    return _on_slices(x, kernel, padding, chunks), (x, kernel)


def _sliced_backward(padding, chunks, residuals, output_gradient):
    x, kernel = residuals
    kernel_gradient = jnp.zeros_like(kernel)
    for piece, piece_gradient in zip(
        jnp.array_split(x, chunks, axis=0), jnp.array_split(output_gradient, chunks, axis=0)
    ):
        _, kernel_vjp = jax.vjp(lambda k, piece=piece: _convolve(piece, k, padding), kernel)
        kernel_gradient = kernel_gradient + kernel_vjp(piece_gradient)[0]
    input_gradient = column_input_gradient(output_gradient, kernel, x.shape[1:3], padding)
    return input_gradient, kernel_gradient


_sliced.defvjp(_sliced_forward, _sliced_backward)


def sliced_convolution(
    x: jax.Array,
    kernel: jax.Array,
    padding: str | Sequence[tuple[int, int]],
    chunks: int,
) -> jax.Array:
    """``conv_general_dilated(x, kernel, (1, 1), padding)`` on NHWC / HWIO, run on ``chunks``
    slices of the batch (sizes differing by at most one) and concatenated; its input gradient is
    :func:`column_input_gradient` over the whole batch, its kernel gradient the sum of the
    slices' kernel gradients."""
    pads = explicit_padding(padding, x.shape[1:3], kernel.shape[:2])
    return _sliced(x, kernel, pads, chunks)
