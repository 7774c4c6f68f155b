"""Fixtures shared by every test directory, and one compilation cache for the whole run."""

import os
import shutil
import tempfile

import pytest
from tensorflow_datasets.core.data_sources import base as tfds_data_sources

CACHE_SETTINGS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
"""Many tests start the command line in a subprocess, and most of each start is compiling the
same training and evaluation steps; JAX's persistent compilation cache, shared by the xdist
workers and every subprocess through the environment, compiles each program once per run.
Every program is cached, however quickly it compiled: on this suite's small programs that was
faster than JAX's default of caching those that took a second or more."""
CACHE_KEY = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """In the controlling process (before xdist starts its workers, which inherit the
    environment): a fresh cache directory for this run, unless one is set already."""
    directory, min_seconds = CACHE_SETTINGS
    if hasattr(config, "workerinput") or directory in os.environ:
        return
    config.stash[CACHE_KEY] = os.environ[directory] = tempfile.mkdtemp(
        prefix="sparsejax-test-jax-cache-"
    )
    os.environ[min_seconds] = "0"


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the cache this run made, and its settings."""
    made = config.stash.get(CACHE_KEY, None)
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        for name in CACHE_SETTINGS:
            os.environ.pop(name, None)


@pytest.fixture
def getitems_by_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Works around tfds 4.9.10's mocked data sources, whose ``__getitems__`` is a plain attribute
    that is not passed ``self`` and so fails with a TypeError; reads records one at a time."""
    monkeypatch.setattr(
        tfds_data_sources.BaseDataSource,
        "__getitems__",
        lambda self, keys: [self[key] for key in keys],
    )
