"""Process-wide host settings that the command-line entry points make before JAX starts.

XLA on CPU allocates each step's scratch memory (one buffer for all temporaries, ~50 MB for a
LeNet-5 step at batch 100) with ``malloc`` and frees it when the step ends. glibc serves a request
that large with ``mmap`` (above its mmap threshold, or beyond the 64 MB heaps of the per-thread
arenas XLA's worker threads use) and returns it to the kernel on ``free``, so every step touched
the buffer's pages afresh: ~13,000 minor page faults and ~17 ms of system time per LeNet-5 step
(2-core CPU). :func:`configure` makes glibc keep freed memory for reuse:

- ``M_ARENA_MAX = 1``: one arena (the main heap, grown with ``brk``) for every thread;
- ``M_MMAP_THRESHOLD = 1 GiB``: requests below it come from the heap, not from ``mmap``;
- ``M_TRIM_THRESHOLD = 1 GiB``: free memory at the top of the heap is kept up to this much.

The process then keeps its peak heap, which the next step reuses. The settings must come before
JAX's threads first allocate, i.e. before ``import jax`` starts anything. They are left alone on
a C library other than glibc, and each one is skipped when its glibc environment variable
(``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) or
``GLIBC_TUNABLES`` is set, so a user's own choice wins; ``SPARSEJAX_MALLOC=default`` skips all.
"""

from __future__ import annotations

import ctypes
import os

OPT_OUT_VARIABLE = "SPARSEJAX_MALLOC"
OPT_OUT_VALUE = "default"

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
"""``mallopt`` parameter numbers from glibc's ``malloc.h``."""

KEEP_BYTES = 1 << 30

MALLOC_SETTINGS: tuple[tuple[str, int, int], ...] = (
    ("MALLOC_ARENA_MAX", M_ARENA_MAX, 1),
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
