"""Starting the package's commands from a test, in a subprocess with a known environment."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPILATION_CACHE = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
"""The run's compilation cache (``tests/conftest.py``): a command started with it compiles only
the programs that no earlier test or command of the run compiled."""
SUITE_SETTINGS = (*COMPILATION_CACHE, "XLA_FLAGS")
"""What the suite sets for every process of the run (``tests/conftest.py``): the compilation
cache and the compiler's flags."""


def command_env(pythonpath: str = str(ROOT), **extra: str) -> dict[str, str]:
    """A command's environment: ``pythonpath``, the CPU, the suite's settings, then ``extra``;
    nothing else of the caller's (so it runs as on a clean shell)."""
    suite = {name: os.environ[name] for name in SUITE_SETTINGS if name in os.environ}
    return {
        "PYTHONPATH": pythonpath, "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", **suite,
        **extra,
    }


def run_module(
    module: str, *args: str, cwd: Path | str = ROOT, pythonpath: str = str(ROOT),
    timeout: float = 600, **extra_env: str,
) -> subprocess.CompletedProcess:
    """``python -m module *args`` in ``cwd`` with :func:`command_env`; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env=command_env(pythonpath, **extra_env),
    )
