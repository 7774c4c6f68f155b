"""JAX's persistent compilation cache, turned off where a cached program would hang the run.

From jax 0.12 on, a run of several processes on the CPU (collectives over Gloo) stops in its
first training step when it loads its programs from the persistent compilation cache
(``JAX_COMPILATION_CACHE_DIR``): every process waits in the step's first collective, for ever.
The first run, which compiles the programs and fills the cache, trains normally; the second one
hangs. jax 0.10 and 0.11 run both. :func:`avoid_hanging_cache` turns the cache off for such a
run, with one warning, before it compiles anything.
"""

from __future__ import annotations

import jax

from sparsejax.errors import warn

HANGING_FROM = (0, 12)
"""The first jax version whose multi-process CPU runs hang on cached programs."""


def jax_version() -> tuple[int, ...]:
    """The installed jax's version as numbers, e.g. ``(0, 12, 1)``."""
    return tuple(int(part) for part in jax.__version__.split(".")[:3] if part.isdigit())


def cache_would_hang(version: tuple[int, ...], processes: int, backend: str) -> bool:
    """Whether a run of ``processes`` processes on ``backend`` with jax ``version`` hangs when it
    loads a cached program."""
    return version >= HANGING_FROM and processes > 1 and backend == "cpu"


def avoid_hanging_cache() -> bool:
    """Turn JAX's persistent compilation cache off when it is set and :func:`cache_would_hang`
    for this process; True when it did. It takes effect only before the process first compiles
    (JAX decides once whether to use the cache)."""
    if not jax.config.jax_compilation_cache_dir or not jax.config.jax_enable_compilation_cache:
        return False
    if not cache_would_hang(jax_version(), jax.process_count(), jax.default_backend()):
        return False
    jax.config.update("jax_enable_compilation_cache", False)
    warn(
        f"JAX's persistent compilation cache ({jax.config.jax_compilation_cache_dir}) is off for "
        f"this run: with jax {jax.__version__}, a run of several processes on the CPU hangs in its "
        "first step when it loads a cached program"
    )
    return True
