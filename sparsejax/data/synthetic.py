"""Random, learnable image-classification data with the shapes of a real dataset.

Each class has a fixed random pattern; an image is its class's pattern blended into a mid-grey
background plus Gaussian pixel noise, clipped to [0, 1]. The label is therefore recoverable from
the image (a nearest-class-mean classifier does well), so a short run can show learning above
chance. Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sparsejax.data.arrays import IMAGE_DTYPE, LABEL_DTYPE, ArrayDataset
from sparsejax.errors import ConfigError

SYNTHETIC_NAME = "synthetic"
"""The dataset name and source of synthetic data."""


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """The image shape ``(height, width, channels)`` and number of classes of a dataset."""

    image_shape: tuple[int, int, int]
    num_classes: int


SYNTHETIC_LIKE: dict[str, ImageSpec] = {
    "fashion_mnist": ImageSpec((28, 28, 1), 10),
    "mnist": ImageSpec((28, 28, 1), 10),
    "cifar10": ImageSpec((32, 32, 3), 10),
    "cifar100": ImageSpec((32, 32, 3), 100),
    "imagenet2012": ImageSpec((224, 224, 3), 1000),
}
"""The datasets whose shapes synthetic data can take."""

DEFAULT_NUM_TRAIN = 2048
DEFAULT_NUM_TEST = 512

BACKGROUND = 0.5
"""Pixel value that class patterns are blended into."""

PATTERN_HALF_RANGE = 0.5
"""Class patterns are uniform in [-PATTERN_HALF_RANGE, PATTERN_HALF_RANGE] per pixel."""

PATTERN_WEIGHT = 0.4
"""How strongly a class pattern shows in its images."""

NOISE_STD = 0.3
"""Standard deviation of the per-pixel Gaussian noise."""


def _sample(
    patterns: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draws ``count`` images with balanced, shuffled labels (every class when count allows)."""
    num_classes = patterns.shape[0]
    labels = rng.permutation(np.arange(count) % num_classes).astype(LABEL_DTYPE)
    images = rng.standard_normal((count, *patterns.shape[1:]), dtype=IMAGE_DTYPE)
    images *= NOISE_STD
    images += BACKGROUND + PATTERN_WEIGHT * patterns[labels]
    np.clip(images, 0.0, 1.0, out=images)
    return images, labels


def make_synthetic(
    like: str = "fashion_mnist",
    *,
    seed: int = 0,
    num_train: int | None = None,
    num_test: int | None = None,
) -> ArrayDataset:
    """Makes a synthetic dataset with the image shape and class count of ``like``.

    Args:
      like: a key of :data:`SYNTHETIC_LIKE`.
      seed: seeds the class patterns and both splits; equal seeds give equal datasets.
      num_train: training examples; :data:`DEFAULT_NUM_TRAIN` if None.
      num_test: test examples; :data:`DEFAULT_NUM_TEST` if None. The class patterns and test
        set do not depend on ``num_train``, nor the training set on ``num_test``.

    Raises:
      ConfigError: if ``like`` is not a key of :data:`SYNTHETIC_LIKE`.
    """
    if like not in SYNTHETIC_LIKE:
        raise ConfigError(
            f"synthetic_like={like!r} is not supported; choose one of {sorted(SYNTHETIC_LIKE)}."
        )
    spec = SYNTHETIC_LIKE[like]
    pattern_seed, train_seed, test_seed = np.random.SeedSequence(seed).spawn(3)
    patterns = np.random.default_rng(pattern_seed).uniform(
        -PATTERN_HALF_RANGE, PATTERN_HALF_RANGE, (spec.num_classes, *spec.image_shape)
    ).astype(IMAGE_DTYPE)
    num_train = DEFAULT_NUM_TRAIN if num_train is None else num_train
    num_test = DEFAULT_NUM_TEST if num_test is None else num_test
    train_images, train_labels = _sample(patterns, num_train, np.random.default_rng(train_seed))
    test_images, test_labels = _sample(patterns, num_test, np.random.default_rng(test_seed))
    return ArrayDataset(
        name=SYNTHETIC_NAME,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=spec.num_classes,
        source=SYNTHETIC_NAME,
    )
