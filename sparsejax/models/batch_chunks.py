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
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp

from sparsejax.errors import ConfigError

CHUNKS_VARIABLE = "SPARSEJAX_CONV_CHUNKS"
CHUNK_EXAMPLES = 10
"""Examples per slice under the automatic policy."""
MAX_CHUNKS = 16
"""The most slices the automatic policy makes, which bounds the growth of compilation time."""


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


def convolve(x: jax.Array, kernel: jax.Array, **conv_options) -> jax.Array:
    """``jax.lax.conv_general_dilated(x, kernel, **conv_options)`` for a batch-first ``x``, run
    on :func:`batch_chunks` slices of the batch (sizes differing by at most one) and
    concatenated."""
    chunks = batch_chunks(x.shape[0])
    if chunks == 1:
        return jax.lax.conv_general_dilated(x, kernel, **conv_options)
    pieces = jnp.array_split(x, chunks, axis=0)
    return jnp.concatenate(
        [jax.lax.conv_general_dilated(piece, kernel, **conv_options) for piece in pieces], axis=0
    )
