"""Fixtures shared by every test directory."""

import pytest
from tensorflow_datasets.core.data_sources import base as tfds_data_sources


@pytest.fixture
def getitems_by_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Works around tfds 4.9.10's mocked data sources, whose ``__getitems__`` is a plain attribute
    that is not passed ``self`` and so fails with a TypeError; reads records one at a time."""
    monkeypatch.setattr(
        tfds_data_sources.BaseDataSource,
        "__getitems__",
        lambda self, keys: [self[key] for key in keys],
    )
