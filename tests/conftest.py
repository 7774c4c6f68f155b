"""Fixtures shared by every test directory; one compilation cache and quick compiles for the
whole run.

Many tests start the command line in a subprocess, and most of each start is compiling the
same training and evaluation steps; JAX's persistent compilation cache, shared by the xdist
workers and every command a test starts (``tests.commands.command_env``), compiles each program
once per run. Every program is cached, however quickly it compiled: on this suite's small
programs that was faster than JAX's default of caching those that took a second or more.
"""

import os
import shutil
import tempfile

import pytest
from tensorflow_datasets.core.data_sources import base as tfds_data_sources

from tests.commands import COMPILATION_CACHE, SUITE_SETTINGS

QUICK_COMPILE = "--xla_backend_optimization_level=0"
"""Most of the suite's time is compiling small programs that then run for a few steps: without
LLVM's optimisation passes, XLA on the CPU compiles them faster than the steps lose (28% less
time on the placed zoo models' training and logit tests). The suite checks behaviour, not speed; the
package's own runs compile as always."""
SAVED_KEY = pytest.StashKey[dict[str, str | None]]()


def pytest_configure(config: pytest.Config) -> None:
    """In the controlling process (before xdist starts its workers, which inherit the
    environment): a fresh cache directory for this run, unless one is set already, and the
    quick compiler flag."""
    if hasattr(config, "workerinput"):
        return
    directory, min_seconds = COMPILATION_CACHE
    flags = os.environ.get("XLA_FLAGS", "")
    saved = config.stash[SAVED_KEY] = {name: os.environ.get(name) for name in SUITE_SETTINGS}
    if saved[directory] is None:
        os.environ[directory] = tempfile.mkdtemp(prefix="sparsejax-test-jax-cache-")
        os.environ[min_seconds] = "0"
    if "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {QUICK_COMPILE}".strip()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the cache this run made, and put back the settings it found."""
    saved = config.stash.get(SAVED_KEY, None)
    if saved is None:
        return
    directory, _ = COMPILATION_CACHE
    if saved[directory] is None:
        shutil.rmtree(os.environ[directory], ignore_errors=True)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def getitems_by_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Works around tfds 4.9.10's mocked data sources, whose ``__getitems__`` is a plain attribute
    that is not passed ``self`` and so fails with a TypeError; reads records one at a time."""
    monkeypatch.setattr(
        tfds_data_sources.BaseDataSource,
        "__getitems__",
        lambda self, keys: [self[key] for key in keys],
    )
