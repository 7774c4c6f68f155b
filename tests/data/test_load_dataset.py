"""Tests for load_dataset's arguments and the ArrayDataset container."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import sparsejax.data
from sparsejax.data import DATASETS, ArrayDataset, DatasetNotFoundError, load_dataset


def test_public_names():
    assert DATASETS == ("cifar10", "cifar100", "fashion_mnist", "mnist", "synthetic")
    assert set(sparsejax.data.__all__) == {
        "ArrayDataset",
        "DATASETS",
        "DatasetNotFoundError",
        "load_dataset",
        "read_idx",
    }
    assert issubclass(DatasetNotFoundError, FileNotFoundError)


def test_unknown_name_lists_valid_names():
    with pytest.raises(
        ValueError, match="'imagenet'.*cifar10, cifar100, fashion_mnist, mnist, synthetic"
    ):
        load_dataset("imagenet")


@pytest.mark.parametrize("count", [0, -3, 2.5, True, "10"])
@pytest.mark.parametrize("arg", ["num_train", "num_test"])
def test_counts_must_be_positive_integers(arg: str, count):
    with pytest.raises(ValueError, match=f"{arg} must be a positive integer"):
        load_dataset("synthetic", **{arg: count})


def test_numpy_integer_counts_are_accepted():
    dataset = load_dataset("synthetic", num_train=np.int64(30), num_test=np.int32(20))
    assert dataset.num_train == 30 and dataset.num_test == 20


def _arrays(num_train: int = 4, num_test: int = 2, image_shape=(5, 5, 1)) -> dict:
    return dict(
        train_images=np.zeros((num_train, *image_shape), np.float32),
        train_labels=np.zeros(num_train, np.int32),
        test_images=np.zeros((num_test, *image_shape), np.float32),
        test_labels=np.ones(num_test, np.int32),
    )


def test_array_dataset_properties():
    dataset = ArrayDataset(name="toy", num_classes=2, source="memory", **_arrays())
    assert dataset.num_train == 4 and dataset.num_test == 2
    assert dataset.image_shape == (5, 5, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dataset.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"train_images": np.zeros((4, 5, 5, 1), np.float64)}, "train_images must be a 4-D"),
        ({"test_images": np.zeros((2, 5, 5), np.float32)}, "test_images must be a 4-D"),
        ({"train_labels": np.zeros(4, np.int64)}, "train_labels must hold one int32 label"),
        ({"test_labels": np.zeros(3, np.int32)}, r"test_labels must hold .* shape \(2,\)"),
        ({"test_labels": np.array([0, 2], np.int32)}, r"test_labels must lie in \[0, 2\)"),
        ({"test_images": np.zeros((2, 6, 5, 1), np.float32)}, "differ in shape"),
    ],
)
def test_array_dataset_rejects_bad_arrays(change: dict, problem: str):
    with pytest.raises(ValueError, match=problem):
        ArrayDataset(name="toy", num_classes=2, source="memory", **(_arrays() | change))


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_a_data_dir_that_does_not_exist_is_not_passed_over(tmp_path, name):
    missing = tmp_path / "no" / "such"
    with pytest.raises(DatasetNotFoundError, match=f"data_dir {missing} does not exist"):
        load_dataset(name, data_dir=str(missing))
