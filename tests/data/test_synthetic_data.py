"""Tests for synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from sparsejax.data import ArrayDataset, load_dataset
from sparsejax.data.synthetic import DEFAULT_NUM_TEST, DEFAULT_NUM_TRAIN

CHANCE_MARGIN = 0.3
"""How far above chance a nearest-class-mean classifier must score on the test split."""


@pytest.mark.parametrize(
    ("like", "image_shape", "num_classes"),
    [
        ("fashion_mnist", (28, 28, 1), 10),
        ("mnist", (28, 28, 1), 10),
        ("cifar10", (32, 32, 3), 10),
        ("cifar100", (32, 32, 3), 100),
    ],
)
def test_shapes_follow_the_real_dataset(like: str, image_shape: tuple, num_classes: int):
    dataset = load_dataset("synthetic", synthetic_like=like)
    assert dataset.name == "synthetic" and dataset.source == "synthetic"
    assert dataset.num_classes == num_classes
    assert dataset.image_shape == image_shape
    assert dataset.train_images.shape == (DEFAULT_NUM_TRAIN, *image_shape)
    assert dataset.test_images.shape == (DEFAULT_NUM_TEST, *image_shape)
    for images, labels in (
        (dataset.train_images, dataset.train_labels),
        (dataset.test_images, dataset.test_labels),
    ):
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert set(labels.tolist()) == set(range(num_classes))


def _equal(a: ArrayDataset, b: ArrayDataset) -> bool:
    return all(
        np.array_equal(getattr(a, field), getattr(b, field))
        for field in ("train_images", "train_labels", "test_images", "test_labels")
    )


def test_deterministic_given_seed():
    assert _equal(load_dataset("synthetic", seed=3), load_dataset("synthetic", seed=3))
    assert not _equal(load_dataset("synthetic", seed=3), load_dataset("synthetic", seed=4))


def test_sizes_are_independent():
    small = load_dataset("synthetic", num_train=100, num_test=30)
    assert small.num_train == 100 and small.num_test == 30
    other = load_dataset("synthetic", num_train=50, num_test=30)
    np.testing.assert_array_equal(small.test_images, other.test_images)
    np.testing.assert_array_equal(small.test_labels, other.test_labels)


@pytest.mark.parametrize("like", ["fashion_mnist", "cifar10"])
def test_labels_are_learnable(like: str):
    dataset = load_dataset("synthetic", synthetic_like=like, seed=1)
    flat_train = dataset.train_images.reshape(dataset.num_train, -1)
    flat_test = dataset.test_images.reshape(dataset.num_test, -1)
    means = np.stack(
        [flat_train[dataset.train_labels == c].mean(0) for c in range(dataset.num_classes)]
    )
    distances = ((flat_test[:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = np.mean(distances.argmin(1) == dataset.test_labels)
    assert accuracy > 1 / dataset.num_classes + CHANCE_MARGIN


def test_unknown_shape_source_lists_choices():
    with pytest.raises(ValueError, match="cifar10.*cifar100.*fashion_mnist.*mnist"):
        load_dataset("synthetic", synthetic_like="imagenet")
