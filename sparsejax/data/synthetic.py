"""Random, learnable image-classification data with the shapes of a real dataset.

Each class has a fixed random pattern; an image is its class's pattern blended into a mid-grey
background plus Gaussian pixel noise, clipped to [0, 1]. The label is therefore recoverable from
the image (a nearest-class-mean classifier does well), so a short run can show learning above
chance.

Nothing is held in memory: example ``i`` of a split is drawn when it is read, from a generator
seeded with ``(seed, split, i)``, and class ``c``'s pattern from one seeded with
``(seed, PATTERN_STREAM, c)``; label ``i`` is ``i % num_classes``. So a dataset of any size costs a
few bytes per label, input worker processes receive only the seed and sizes, and every process
reads the same example ``i``.
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


PATTERN_STREAM, TRAIN_STREAM, TEST_STREAM = 0, 1, 2
"""The second seed word of the class patterns and of each split's examples."""


def class_patterns(
    seed: int, classes: np.ndarray, image_shape: tuple[int, int, int]
) -> np.ndarray:
    """The patterns of ``classes``: uniform in [-PATTERN_HALF_RANGE, PATTERN_HALF_RANGE]."""
    patterns = np.empty((len(classes), *image_shape), IMAGE_DTYPE)
    for row, label in enumerate(classes):
        rng = np.random.default_rng([seed, PATTERN_STREAM, int(label)])
        patterns[row] = rng.uniform(-PATTERN_HALF_RANGE, PATTERN_HALF_RANGE, image_shape)
    return patterns


@dataclasses.dataclass(frozen=True)
class SyntheticImages:
    """The images of one synthetic split, drawn when indexed (an array-like of shape
    ``(count, *image_shape)``; ``np.asarray`` draws them all).

    Indexing takes what a NumPy array's first axis takes: an integer, a slice, an integer array
    or a boolean mask, and returns a float32 NumPy array.
    """

    seed: int
    stream: int
    count: int
    image_shape: tuple[int, int, int]
    num_classes: int
    dtype = IMAGE_DTYPE
    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.count, *self.image_shape)

    def __len__(self) -> int:
        return self.count

    def _indices(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(*key.indices(self.count))
        index = np.asarray(key)
        if index.dtype == bool:
            if index.shape != (self.count,):
                raise IndexError(f"a boolean index must have shape ({self.count},)")
            return np.flatnonzero(index)
        if not np.issubdtype(index.dtype, np.integer):
            raise IndexError("only integers, slices and integer or boolean arrays index images")
        if index.size and (index.min() < -self.count or index.max() >= self.count):
            raise IndexError(f"index out of range for {self.count} images")
        return np.where(index < 0, index + self.count, index)

    def __getitem__(self, key) -> np.ndarray:
        indices = self._indices(key)
        flat = indices.reshape(-1)
        classes, rows = np.unique(flat % self.num_classes, return_inverse=True)
        shifted = BACKGROUND + PATTERN_WEIGHT * class_patterns(self.seed, classes, self.image_shape)
        images = np.empty((len(flat), *self.image_shape), IMAGE_DTYPE)
        for row, index in enumerate(flat):
            rng = np.random.default_rng([self.seed, self.stream, int(index)])
            images[row] = rng.standard_normal(self.image_shape, dtype=IMAGE_DTYPE)
        images *= NOISE_STD
        images += shifted[rows]
        np.clip(images, 0.0, 1.0, out=images)
        return images.reshape(*indices.shape, *self.image_shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self[:]
        return images if dtype is None else images.astype(dtype)


def synthetic_labels(count: int, num_classes: int) -> np.ndarray:
    """Label ``i`` is ``i % num_classes``: balanced, every class once ``count >= num_classes``."""
    return (np.arange(count) % num_classes).astype(LABEL_DTYPE)


def make_synthetic(
    like: str = "fashion_mnist",
    *,
    seed: int = 0,
    num_train: int | None = None,
    num_test: int | None = None,
) -> ArrayDataset:
    """Makes a synthetic dataset with the image shape and class count of ``like``; its images
    are :class:`SyntheticImages`, drawn when read.

    Args:
      like: a key of :data:`SYNTHETIC_LIKE`.
      seed: seeds the class patterns and both splits; equal seeds give equal datasets.
      num_train: training examples; :data:`DEFAULT_NUM_TRAIN` if None.
      num_test: test examples; :data:`DEFAULT_NUM_TEST` if None. Example ``i`` of a split does
        not depend on either count.

    Raises:
      ConfigError: if ``like`` is not a key of :data:`SYNTHETIC_LIKE`.
    """
    if like not in SYNTHETIC_LIKE:
        raise ConfigError(
            f"synthetic_like={like!r} is not supported; choose one of {sorted(SYNTHETIC_LIKE)}."
        )
    spec = SYNTHETIC_LIKE[like]
    num_train = DEFAULT_NUM_TRAIN if num_train is None else num_train
    num_test = DEFAULT_NUM_TEST if num_test is None else num_test

    def images(stream: int, count: int) -> SyntheticImages:
        return SyntheticImages(seed, stream, count, spec.image_shape, spec.num_classes)

    return ArrayDataset(
        name=SYNTHETIC_NAME,
        train_images=images(TRAIN_STREAM, num_train),
        train_labels=synthetic_labels(num_train, spec.num_classes),
        test_images=images(TEST_STREAM, num_test),
        test_labels=synthetic_labels(num_test, spec.num_classes),
        num_classes=spec.num_classes,
        source=SYNTHETIC_NAME,
    )
