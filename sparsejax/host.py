"""Process-wide host settings that the command-line entry points make before JAX starts.

XLA on CPU allocates each step's scratch memory (one buffer for the step's temporaries) with
``malloc`` and frees it when the step ends. glibc serves a request above its mmap threshold
(dynamic, at most 32 MB by default) with ``mmap`` and returns it to the kernel on ``free``, and
trims free memory at the top of its heap, so a step whose scratch buffer is that large touches
its pages afresh every time: one minor page fault per 4 KiB page, in system time. (LeNet-5 at
batch 100 had a ~50 MB buffer with ``nnx.max_pool``'s index arrays: ~13,000 faults and ~17 ms of
system time per step on a 2-core CPU.) :func:`configure` raises both limits:

- ``M_MMAP_THRESHOLD = 1 GiB``: requests below it come from the heap, not from ``mmap``;
- ``M_TRIM_THRESHOLD = 1 GiB``: free memory at the top of the heap is kept up to this much.

The process then keeps its peak heap, which the next step reuses. Requests that XLA's worker
threads make in their own arenas, whose heaps are at most 64 MB, still fall back to ``mmap``
above that size; ``MALLOC_ARENA_MAX=1`` (one arena for all threads) stops that too, at the price
of one malloc lock: it made the LeNet-300-100 step 1.3x slower, so it is left to the user.

The settings must come before JAX's threads first allocate, i.e. before ``import jax`` starts
anything. They are left alone on a C library other than glibc, and each one is skipped when its
glibc environment variable (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) or
``GLIBC_TUNABLES`` is set, so a user's own choice wins; ``SPARSEJAX_MALLOC=default`` skips all.
"""

from __future__ import annotations

import ctypes
import os

OPT_OUT_VARIABLE = "SPARSEJAX_MALLOC"
OPT_OUT_VALUE = "default"

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter numbers from glibc's ``malloc.h``."""

KEEP_BYTES = 1 << 30

MALLOC_SETTINGS: tuple[tuple[str, int, int], ...] = (
    ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, KEEP_BYTES),
    ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, KEEP_BYTES),
)
"""(environment variable that overrides it, ``mallopt`` parameter, value), applied in this
order."""


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (which has ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def configure(environ: dict[str, str] | None = None, libc: ctypes.CDLL | None = None) -> dict[str, int]:
    """Apply :data:`MALLOC_SETTINGS` that the environment does not override.

    Returns the settings applied, by environment variable name (empty when opted out, on
    another C library, or when every one is overridden).
    """
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT_VARIABLE) == OPT_OUT_VALUE or "GLIBC_TUNABLES" in environ:
        return {}
    libc = _glibc() if libc is None else libc
    if libc is None:
        return {}
    applied = {}
    for variable, parameter, value in MALLOC_SETTINGS:
        if variable not in environ and libc.mallopt(parameter, value) == 1:
            applied[variable] = value
    return applied
