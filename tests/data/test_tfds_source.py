"""Tests for reading prepared tfds data, and for the error when no copy exists anywhere."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants

from sparsejax.data import DatasetNotFoundError, load_dataset, mnist

NOT_FOUND_SECONDS = 5.0
"""Upper bound on the time to give up on a dataset that is nowhere (no download attempt)."""


class _TinyMnist(tfds.image_classification.MNIST, skip_registration=True):
    """tfds's MNIST builder with a few generated examples in place of the downloaded files.

    Example ``i`` is an image filled with the value ``i`` and has label ``i % 10``. Images are
    given as PIL images, which tfds encodes without TensorFlow.
    """

    name = "mnist"
    SPLIT_SIZES = {"train": 23, "test": 12}

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._examples(count) for split, count in self.SPLIT_SIZES.items()}

    def _examples(self, count: int) -> Iterator[tuple[int, dict]]:
        for i in range(count):
            image = PIL.Image.fromarray(np.full((28, 28), i, dtype=np.uint8))
            yield i, {"image": image, "label": i % 10}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes any attempt to open a connection fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _prepare_tiny_mnist(data_dir: Path) -> None:
    """Prepares :class:`_TinyMnist` as ArrayRecord files under ``data_dir``."""
    _TinyMnist(data_dir=os.fspath(data_dir), file_format="array_record").download_and_prepare()


def test_reads_prepared_array_record_data(no_local_copies: Path):
    _prepare_tiny_mnist(no_local_copies)
    dataset = load_dataset("mnist", data_dir=os.fspath(no_local_copies))
    assert dataset.source == "tfds:mnist"
    assert dataset.num_classes == 10
    for split, images, labels in (
        ("train", dataset.train_images, dataset.train_labels),
        ("test", dataset.test_images, dataset.test_labels),
    ):
        count = _TinyMnist.SPLIT_SIZES[split]
        assert images.shape == (count, 28, 28, 1) and images.dtype == np.float32
        assert labels.shape == (count,) and labels.dtype == np.int32
        # tfds shuffles examples when preparing; recover each one's index from its pixels.
        index = np.rint(images[:, 0, 0, 0] * 255).astype(int)
        assert sorted(index) == list(range(count))
        expected = np.broadcast_to(index[:, None, None, None] / 255, images.shape)
        np.testing.assert_allclose(images, expected, rtol=1e-6)
        np.testing.assert_array_equal(labels, index % 10)


def test_counts_cap_tfds_reads(no_local_copies: Path):
    _prepare_tiny_mnist(no_local_copies)
    full = load_dataset("mnist", data_dir=os.fspath(no_local_copies))
    small = load_dataset("mnist", data_dir=os.fspath(no_local_copies), num_train=5, num_test=3)
    np.testing.assert_array_equal(small.train_images, full.train_images[:5])
    np.testing.assert_array_equal(small.test_labels, full.test_labels[:3])




@pytest.mark.usefixtures("getitems_by_index")
def test_reads_mocked_tfds_data(no_local_copies: Path):
    with tfds.testing.mock_data(num_examples=9, policy=tfds.testing.MockPolicy.USE_CODE):
        dataset = load_dataset("mnist", data_dir=os.fspath(no_local_copies))
        capped = load_dataset("mnist", data_dir=os.fspath(no_local_copies), num_train=4)
    assert dataset.source == "tfds:mnist"
    assert dataset.train_images.shape == (9, 28, 28, 1)
    assert dataset.test_images.shape == (9, 28, 28, 1)
    assert dataset.train_images.dtype == np.float32 and dataset.train_labels.dtype == np.int32
    assert 0.0 <= dataset.train_images.min() and dataset.train_images.max() <= 1.0
    assert set(dataset.train_labels) <= set(range(10))
    assert capped.train_images.shape == (4, 28, 28, 1)
    np.testing.assert_array_equal(capped.train_images, dataset.train_images[:4])


def _load_missing(name: str, data_dir: str | None) -> str:
    """Loads a dataset that exists nowhere; returns the error message."""
    start = time.monotonic()
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset(name, data_dir=data_dir)
    assert time.monotonic() - start < NOT_FOUND_SECONDS
    return str(caught.value)


def test_missing_data_lists_places_and_remedies(no_local_copies: Path):
    message = _load_missing("fashion_mnist", os.fspath(no_local_copies))
    searched = [
        no_local_copies,
        no_local_copies / "fashion_mnist",
        no_local_copies / "fashion-mnist",
        Path(os.environ[mnist.DATA_DIR_ENV]),
        Path(os.environ[mnist.DATA_DIR_ENV]) / "fashion_mnist",
        Path(os.environ[mnist.DATA_DIR_ENV]) / "fashion-mnist",
        Path(mnist.SYSTEM_DATA_DIRS["fashion_mnist"]),
    ]
    for directory in searched:
        assert f"{directory} (" in message
    assert f"tfds:fashion_mnist in {no_local_copies}" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "train-images-idx3-ubyte.gz" in message and "--data_dir" in message
    assert "tfds build fashion_mnist --file_format=array_record" in message
    assert not list(no_local_copies.iterdir()), "nothing may be written while searching"


def test_missing_data_without_data_dir_searches_tfds_default(
    no_local_copies: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(tfds_constants, "DATA_DIR", os.fspath(no_local_copies))
    monkeypatch.delenv(mnist.DATA_DIR_ENV)
    message = _load_missing("mnist", None)
    assert f"tfds:mnist in {no_local_copies}" in message
    assert f"data_dir and ${mnist.DATA_DIR_ENV} not set" in message
    assert "apt-get" not in message  # there is no Debian package for MNIST
