"""Tests for finding and loading MNIST-family IDX files."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from sparsejax.data import ArrayDataset, DatasetNotFoundError, load_dataset, mnist

FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
# The first ten training labels of Fashion-MNIST (ankle boot, T-shirt, T-shirt, dress, ...).
FASHION_FIRST_TRAIN_LABELS = [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]

MnistFilesWriter = Callable[..., dict[str, tuple[np.ndarray, np.ndarray]]]


@pytest.fixture(scope="module")
def fashion() -> Iterator[ArrayDataset]:
    """Fashion-MNIST as installed by the Debian package dataset-fashion-mnist."""
    if not os.path.isdir(FASHION_SYSTEM_DIR):
        pytest.skip(
            f"{FASHION_SYSTEM_DIR} is missing (apt-get install dataset-fashion-mnist installs it)"
        )
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(mnist.DATA_DIR_ENV, raising=False)
        yield load_dataset("fashion_mnist")


def test_fashion_mnist_from_system_files(fashion: ArrayDataset):
    assert fashion.name == "fashion_mnist"
    assert fashion.source == FASHION_SYSTEM_DIR
    assert fashion.num_classes == 10
    assert fashion.train_images.shape == (60000, 28, 28, 1)
    assert fashion.test_images.shape == (10000, 28, 28, 1)
    assert fashion.num_train == 60000 and fashion.num_test == 10000
    assert fashion.image_shape == (28, 28, 1)
    for images, labels in (
        (fashion.train_images, fashion.train_labels),
        (fashion.test_images, fashion.test_labels),
    ):
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert images.min() == 0.0 and images.max() == 1.0
        # Fashion-MNIST is balanced: each class has a tenth of each split.
        np.testing.assert_array_equal(np.bincount(labels), np.full(10, len(labels) // 10))
    # Pixels are k / 255 for integer k.
    levels = fashion.test_images[:100] * 255
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert 0.2 < fashion.train_images.mean() < 0.4
    assert 0.2 < fashion.test_images.mean() < 0.4
    assert fashion.train_labels[: len(FASHION_FIRST_TRAIN_LABELS)].tolist() == (
        FASHION_FIRST_TRAIN_LABELS
    )


def test_counts_keep_the_first_examples(fashion: ArrayDataset, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    small = load_dataset("fashion_mnist", num_train=100, num_test=7)
    assert small.num_train == 100 and small.num_test == 7
    np.testing.assert_array_equal(small.train_images, fashion.train_images[:100])
    np.testing.assert_array_equal(small.train_labels, fashion.train_labels[:100])
    np.testing.assert_array_equal(small.test_images, fashion.test_images[:7])
    np.testing.assert_array_equal(small.test_labels, fashion.test_labels[:7])


def _assert_loaded(dataset: ArrayDataset, written: dict[str, tuple[np.ndarray, np.ndarray]]):
    """Checks that ``dataset`` holds exactly the ``written`` uint8 images and labels."""
    for images, labels, (raw_images, raw_labels) in (
        (dataset.train_images, dataset.train_labels, written["train"]),
        (dataset.test_images, dataset.test_labels, written["test"]),
    ):
        assert images.dtype == np.float32 and labels.dtype == np.int32
        np.testing.assert_allclose(images, raw_images[..., None] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(labels, raw_labels)


@pytest.mark.parametrize("layout", ["", "fashion_mnist", "fashion-mnist"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_data_dir_takes_precedence(
    tmp_path: Path,
    mnist_files_writer: MnistFilesWriter,
    monkeypatch: pytest.MonkeyPatch,
    layout: str,
    suffix: str,
):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    written = mnist_files_writer(
        tmp_path / layout, num_train=6, num_test=3, seed=1, suffix=suffix
    )
    dataset = load_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert dataset.source == str(tmp_path / layout)
    assert dataset.train_images.shape == (6, 28, 28, 1)
    assert dataset.test_images.shape == (3, 28, 28, 1)
    _assert_loaded(dataset, written)


def test_data_dir_expands_home(
    tmp_path: Path, mnist_files_writer: MnistFilesWriter, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    written = mnist_files_writer(tmp_path / "datasets", num_train=3, num_test=2, seed=4)
    dataset = load_dataset("fashion_mnist", data_dir="~/datasets")
    assert dataset.source == str(tmp_path / "datasets")
    _assert_loaded(dataset, written)


def test_environment_variable_then_data_dir(
    tmp_path: Path, mnist_files_writer: MnistFilesWriter, monkeypatch: pytest.MonkeyPatch
):
    from_env = mnist_files_writer(tmp_path / "env" / "mnist", num_train=4, num_test=2, seed=2)
    monkeypatch.setenv(mnist.DATA_DIR_ENV, str(tmp_path / "env"))
    monkeypatch.setitem(mnist.SYSTEM_DATA_DIRS, "mnist", str(tmp_path / "no-system-copy"))
    dataset = load_dataset("mnist")
    assert dataset.source == str(tmp_path / "env" / "mnist")
    _assert_loaded(dataset, from_env)

    from_data_dir = mnist_files_writer(tmp_path / "given", num_train=5, num_test=2, seed=3)
    dataset = load_dataset("mnist", data_dir=str(tmp_path / "given"))
    assert dataset.source == str(tmp_path / "given")
    _assert_loaded(dataset, from_data_dir)


def test_partial_copy_is_reported(
    tmp_path: Path, mnist_files_writer: MnistFilesWriter, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    mnist_files_writer(tmp_path, num_train=4, num_test=2, seed=0)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing t10k-labels-idx1-ubyte \(plain"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))


def test_corrupt_file_is_named(
    tmp_path: Path, mnist_files_writer: MnistFilesWriter, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    mnist_files_writer(tmp_path, num_train=4, num_test=2, seed=0)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))


def test_mismatched_label_count_is_named(
    tmp_path: Path,
    mnist_files_writer: MnistFilesWriter,
    idx_writer: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    mnist_files_writer(tmp_path, num_train=4, num_test=2, seed=0)
    labels = idx_writer(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match=re.escape(str(labels)) + ".*one label per image"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))


def test_out_of_range_labels_are_rejected(
    tmp_path: Path,
    mnist_files_writer: MnistFilesWriter,
    idx_writer: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    mnist_files_writer(tmp_path, num_train=4, num_test=2, seed=0)
    idx_writer(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 10], np.uint8))
    with pytest.raises(ValueError, match=r"test_labels must lie in \[0, 10\)"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))
