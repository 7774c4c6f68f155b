"""Tests for synthetic data."""

from __future__ import annotations

import multiprocessing
import operator
import pickle
import tracemalloc
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from sparsejax.data import ArrayDataset, load_dataset
from sparsejax.data.synthetic import DEFAULT_NUM_TEST, DEFAULT_NUM_TRAIN, make_synthetic

MIB = 1 << 20

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
        (np.asarray(dataset.train_images), dataset.train_labels),
        (np.asarray(dataset.test_images), dataset.test_labels),
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
    flat_train = np.asarray(dataset.train_images).reshape(dataset.num_train, -1)
    flat_test = np.asarray(dataset.test_images).reshape(dataset.num_test, -1)
    means = np.stack(
        [flat_train[dataset.train_labels == c].mean(0) for c in range(dataset.num_classes)]
    )
    distances = ((flat_test[:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = np.mean(distances.argmin(1) == dataset.test_labels)
    assert accuracy > 1 / dataset.num_classes + CHANCE_MARGIN


def test_unknown_shape_source_lists_choices():
    with pytest.raises(ValueError, match="cifar10.*cifar100.*fashion_mnist.*mnist"):
        load_dataset("synthetic", synthetic_like="imagenet")


def test_a_huge_dataset_is_not_held_in_memory():
    tracemalloc.start()
    dataset = make_synthetic("imagenet2012", num_train=1_000_000, num_test=100_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert dataset.train_images.shape == (1_000_000, 224, 224, 3)  # 600 GB if drawn
    assert peak < 32 * MIB  # the int32 labels and their making
    assert len(pickle.dumps(dataset)) < 8 * MIB  # what a worker process receives
    batch = dataset.train_images[np.array([999_999, 0])]
    assert batch.shape == (2, 224, 224, 3) and batch.dtype == np.float32


def test_example_i_is_a_function_of_the_seed_and_i():
    dataset = make_synthetic("cifar10", seed=5, num_train=40, num_test=8)
    images = np.asarray(dataset.train_images)
    np.testing.assert_array_equal(dataset.train_images[np.array([7, 3, 7])], images[[7, 3, 7]])
    np.testing.assert_array_equal(dataset.train_images[7], images[7])
    bigger = make_synthetic("cifar10", seed=5, num_train=1000, num_test=9)
    np.testing.assert_array_equal(bigger.train_images[:40], images)
    np.testing.assert_array_equal(bigger.train_labels[:40], dataset.train_labels)
    other_seed = make_synthetic("cifar10", seed=6, num_train=40, num_test=8)
    assert not np.array_equal(other_seed.train_images[:1], images[:1])
    assert not np.array_equal(dataset.test_images[:1], images[:1])  # splits differ


def test_a_worker_process_draws_the_same_examples():
    dataset = make_synthetic("mnist", seed=2, num_train=30, num_test=5)
    indices = np.array([29, 0, 11])
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as worker:
        drawn = worker.submit(operator.getitem, dataset.train_images, indices).result()
    np.testing.assert_array_equal(drawn, dataset.train_images[indices])


def test_images_index_like_an_array():
    images = make_synthetic("mnist", num_train=10, num_test=5).train_images
    whole = np.asarray(images)
    assert len(images) == 10 and images.ndim == 4 and whole.shape == (10, 28, 28, 1)
    np.testing.assert_array_equal(images[-1], whole[-1])
    np.testing.assert_array_equal(images[2:9:3], whole[2:9:3])
    mask = np.arange(10) % 3 == 0
    np.testing.assert_array_equal(images[mask], whole[mask])
    assert images[np.zeros((0,), int)].shape == (0, 28, 28, 1)
    for bad in (10, -11, np.array([0, 10])):
        with pytest.raises(IndexError):
            images[bad]
    with pytest.raises(IndexError):
        images[np.array([0.5])]
