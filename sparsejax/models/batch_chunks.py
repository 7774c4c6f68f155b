"""Convolutions split along the batch on a CPU, so that XLA runs the pieces on every core.

XLA's CPU backend runs each convolution as one library call (YNNPACK, or Eigen for some
gradients) that keeps a single core busy for most of its time, while it runs independent ops of
the same step concurrently on its thread pool. A convolution over ``C`` slices of the batch,

    conv(x, W) = concat_c conv(x[c], W),

is the same function (each output row depends only on its own input row), and its gradients
are the slices' input gradients concatenated and their kernel gradients summed, which differ
from the whole-batch ones only by the order of a float sum. The ``C`` convolutions are
independent, so XLA spreads them, and their gradients, over the cores.

Smaller slices also keep each convolution's operands in the cores' caches. On a 2-core CPU
(``benchmarks.step_time``, ``NAME@conv_chunks=N``) a LeNet-5 training step at batch 100 went
from 27.8 ms on the whole batch to 25.4 ms on four slices of 25 examples and 19.6 ms on ten of
10, and a ResNet-56 step at batch 128 from 2.94 s to 2.19 s (4 slices) and 1.84 s (8 or 12).
Each slice is one more convolution in the compiled program, so compilation takes longer: two
ResNet-56 steps compiled and timed took 80 s on the whole batch, 127 s on 8 slices and 249 s
on 16.

A sliced stride-1 convolution whose output has fewer positions than its input (LeNet-5's
unpadded 5x5 convolutions) takes its input gradient by columns over the whole batch
(:func:`~sparsejax.models.column_gradient.sliced_convolution`): one matmul of the forward pass's
size and shifted sums, in place of XLA's convolution over every input position, which does
``(input positions / output positions)`` times the forward pass's multiply-adds (2.25x for
LeNet-5's conv2) on one core. A SAME convolution's input gradient does no more work than its
forward pass, and XLA's is then faster: on ResNet-56 (3x3 SAME convolutions) columns made the
step 1.4-1.7x slower. :func:`column_gradients` turns the columns off for a comparison.

The number of slices comes from :func:`batch_chunks`: ``SPARSEJAX_CONV_CHUNKS=N`` sets it
(``1`` turns the splitting off); by default, on a CPU backend with one device, slices of about
:data:`CHUNK_EXAMPLES` examples, at most :data:`MAX_CHUNKS` of them. On GPUs and TPUs, and when
the batch is sharded over several devices, the batch is not split. Code that reads the
computation rather than runs it (the structure tracer) traces it under :func:`whole_batch`, so
that it sees one convolution per layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp

from sparsejax.errors import ConfigError
from sparsejax.models.column_gradient import DIMENSIONS, explicit_padding, sliced_convolution

CHUNKS_VARIABLE = "SPARSEJAX_CONV_CHUNKS"
CHUNK_EXAMPLES = 10
"""Examples per slice under the automatic policy."""
MAX_CHUNKS = 16
"""The most slices the automatic policy makes, which bounds the growth of compilation time."""


COLUMN_OPTIONS = frozenset(
    {"window_strides", "padding", "dimension_numbers", "feature_group_count"}
)
"""The convolution options under which a sliced convolution can take column input gradients."""

_COLUMN_GRADIENTS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "column_gradients", default=True
)
_FIXED_CHUNKS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "fixed_conv_chunks", default=None
)


@contextlib.contextmanager
def fixed_chunks(chunks: int) -> Iterator[None]:
    """Within this context every convolution traced runs on ``chunks`` slices of its batch
    (at most one per example), whatever the environment says."""
    if chunks < 1:
        raise ValueError(f"chunks must be a positive integer, got {chunks}")
    token = _FIXED_CHUNKS.set(chunks)
    try:
        yield
    finally:
        _FIXED_CHUNKS.reset(token)


def whole_batch() -> contextlib.AbstractContextManager[None]:
    """Within this context every convolution traced runs on the whole batch (one slice)."""
    return fixed_chunks(1)


def batch_chunks(
    batch: int,
    *,
    environ: Mapping[str, str] | None = None,
    backend: str | None = None,
    device_count: int | None = None,
) -> int:
    """How many slices of a batch of ``batch`` examples each convolution runs on.

    Inside :func:`fixed_chunks`, its count; else ``$SPARSEJAX_CONV_CHUNKS`` (a positive
    integer); either capped at ``batch``. Otherwise:
    ``min(MAX_CHUNKS, batch // CHUNK_EXAMPLES)`` (at least 1) on a CPU backend with one device,
    and 1 elsewhere. ``backend`` and ``device_count`` default to the process's.
    """
    fixed = _FIXED_CHUNKS.get()
    if fixed is not None:
        return min(fixed, batch)
    environ = os.environ if environ is None else environ
    setting = environ.get(CHUNKS_VARIABLE, "").strip()
    if setting:
        if not setting.isdigit() or int(setting) < 1:
            raise ConfigError(
                f"{CHUNKS_VARIABLE}={setting!r} is not a positive integer; set it to the number "
                "of batch slices per convolution (1 turns the splitting off) or unset it"
            )
        return max(1, min(int(setting), batch))
    backend = jax.default_backend() if backend is None else backend
    device_count = jax.device_count() if device_count is None else device_count
    if backend != "cpu" or device_count != 1:
        return 1
    return max(1, min(MAX_CHUNKS, batch // CHUNK_EXAMPLES))


@contextlib.contextmanager
def column_gradients(enabled: bool) -> Iterator[None]:
    """Within this context the sliced stride-1 convolutions traced take their input gradient by
    columns (:mod:`sparsejax.models.column_gradient`, the default) or, with ``enabled=False``,
    XLA's own, so that one run can time a step with both."""
    token = _COLUMN_GRADIENTS.set(enabled)
    try:
        yield
    finally:
        _COLUMN_GRADIENTS.reset(token)


def _takes_column_gradient(
    conv_options: Mapping[str, object], input_hw: tuple[int, int], kernel_hw: tuple[int, int]
) -> bool:
    """Whether a convolution takes its input gradient by columns: one that
    :func:`sliced_convolution` computes (stride 1, NHWC / HWIO, no feature groups, dilation or
    other options) and whose input has more positions than its output, so that XLA's input
    gradient, a convolution over the input's positions, does more multiply-adds than the
    forward pass (a SAME convolution's does as many, and XLA's is then the faster)."""
    if not (
        _COLUMN_GRADIENTS.get()
        and set(conv_options) <= COLUMN_OPTIONS
        and tuple(conv_options.get("window_strides", (1, 1))) == (1, 1)
        and conv_options.get("feature_group_count", 1) == 1
        and tuple(conv_options.get("dimension_numbers", ())) == DIMENSIONS
    ):
        return False
    (top, bottom), (left, right) = explicit_padding(
        conv_options.get("padding", "VALID"), input_hw, kernel_hw
    )
    out_h = input_hw[0] + top + bottom - kernel_hw[0] + 1
    out_w = input_hw[1] + left + right - kernel_hw[1] + 1
    return input_hw[0] * input_hw[1] > out_h * out_w


def convolve(
    x: jax.Array,
    kernel: jax.Array,
    *,
    then: Callable[[jax.Array], jax.Array] | None = None,
    **conv_options,
) -> jax.Array:
    """``then(jax.lax.conv_general_dilated(x, kernel, **conv_options))`` for a batch-first
    ``x``, run on :func:`batch_chunks` slices of the batch (sizes differing by at most one) and
    concatenated. Without ``then``, a stride-1 NHWC convolution whose output has fewer positions
    than its input takes its input gradient by columns
    (:func:`~sparsejax.models.column_gradient.sliced_convolution`). ``then``, a function of
    each example alone (bias, activation, pooling), runs on every slice before the
    concatenation, which then copies its smaller output; the slices take XLA's gradients, which
    loses nothing for a first layer, whose input gradient is never computed."""
    chunks = batch_chunks(x.shape[0])
    finish = (lambda y: y) if then is None else then
    if chunks == 1:
        return finish(jax.lax.conv_general_dilated(x, kernel, **conv_options))
    if then is None and _takes_column_gradient(conv_options, x.shape[1:3], kernel.shape[:2]):
        return sliced_convolution(x, kernel, conv_options.get("padding", "VALID"), chunks)
    pieces = jnp.array_split(x, chunks, axis=0)
    return jnp.concatenate(
        [finish(jax.lax.conv_general_dilated(piece, kernel, **conv_options)) for piece in pieces],
        axis=0,
    )
