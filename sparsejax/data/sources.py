"""Batch sources: what the input pipeline reads, one batch of examples at a time.

A source turns example indices into a batch of float32 NHWC images and int32 labels, applying the
training augmentation (with a NumPy generator it is given) or the evaluation preprocessing. Two
kinds exist:

- :class:`ArraySource`: a dataset held in memory (MNIST family, CIFAR, synthetic), with optional
  CIFAR augmentation (4-pixel pad, random crop, flip) and per-channel normalisation by the
  training set's statistics.
- :class:`ImageNetSource`: ImageNet read record by record from a prepared ``tfds.data_source``
  (ArrayRecord, no TensorFlow), with the random-resized-crop / resize-and-center-crop recipe of
  :mod:`sparsejax.data.imagenet`.

Sources are plain picklable objects, so grain can run them in worker processes. A pickled
:class:`ArraySource` holds the names of its arrays in shared memory, not the arrays: every worker
process attaches to the one copy.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from sparsejax.data import imagenet
from sparsejax.data.arrays import IMAGE_DTYPE, LABEL_DTYPE, ArrayDataset
from sparsejax.data.augment import channel_statistics, crop_flip, normalize
from sparsejax.data.errors import DatasetNotFoundError
from sparsejax.data.load import DATASETS, check_data_dir, load_dataset
from sparsejax.data.shared import SharedArrays
from sparsejax.data.text import TEXT_DATASETS, TokenSource, load_text
from sparsejax.data.tfds_source import (
    FILE_FORMAT,
    IMAGE_KEY,
    LABEL_KEY,
    tfds_prepare_hint,
)
from sparsejax.errors import ConfigError

Batch = tuple[np.ndarray, np.ndarray]
Augmentation = Callable[[np.ndarray, np.random.Generator], np.ndarray]
AUGMENTATIONS: dict[str, Augmentation | None] = {"none": None, "crop_flip": crop_flip}

IMAGENET = "imagenet2012"
SOURCES: tuple[str, ...] = (*DATASETS, IMAGENET, *TEXT_DATASETS)
"""Every dataset name :func:`open_source` accepts."""

IMAGENET_SPLITS = ("train", "validation")
"""ImageNet's test split has no labels; the validation split is the test set of the papers."""

_SHARING = threading.Lock()
"""Held while an :class:`ArraySource` moves its arrays into shared memory (grain pickles the
sources of its workers from several threads)."""


class BatchSource(Protocol):
    """What the input pipeline needs from a dataset."""

    name: str
    source: str
    num_classes: int
    image_shape: tuple[int, ...]
    input_dtype: np.dtype
    """What the model reads: float32 images, or int32 token ids for a text dataset."""
    num_train: int
    num_test: int

    def train_batch(self, indices: np.ndarray, rng: np.random.Generator) -> Batch:
        """Augmented, normalised training examples ``indices``."""

    def test_batch(self, indices: np.ndarray) -> Batch:
        """Preprocessed test examples ``indices``."""


class ArraySource:
    """An in-memory dataset with optional augmentation and per-channel normalisation (by the
    training set's mean and standard deviation).

    The first time it is pickled (grain pickles it for each worker process) its NumPy arrays are
    moved into shared memory (:class:`~sparsejax.data.shared.SharedArrays`), where this process
    then reads them too; the pickle holds their names, and unpickling attaches to them.
    """

    def __init__(self, data: ArrayDataset, augment: str = "none", normalize_channels: bool = False):
        if augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {tuple(AUGMENTATIONS)}, got {augment!r}")
        self.data, self.augment = data, augment
        self.statistics = channel_statistics(data.train_images) if normalize_channels else None
        self.name, self.source, self.num_classes = data.name, data.source, data.num_classes
        self.image_shape, self.input_dtype = data.image_shape, IMAGE_DTYPE
        self.num_train, self.num_test = data.num_train, data.num_test
        self._shared: SharedArrays | None = None

    def _fields(self) -> dict:
        return {f.name: getattr(self.data, f.name) for f in dataclasses.fields(self.data)}

    def __getstate__(self) -> dict:
        with _SHARING:
            if self._shared is None:
                fields = self._fields()
                self._shared = SharedArrays(
                    {k: v for k, v in fields.items() if isinstance(v, np.ndarray)}
                )
                self.data = dataclasses.replace(self.data, **self._shared.arrays)
        fields = self._fields()
        state = dict(self.__dict__)
        state["data"] = {k: v for k, v in fields.items() if k not in self._shared.arrays}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.data = ArrayDataset(**state["data"], **self._shared.arrays)

    def _prepare(self, images: np.ndarray) -> np.ndarray:
        return images if self.statistics is None else normalize(images, *self.statistics)

    def train_batch(self, indices: np.ndarray, rng: np.random.Generator) -> Batch:
        images = self.data.train_images[indices]
        augmentation = AUGMENTATIONS[self.augment]
        if augmentation is not None:
            images = augmentation(images, rng)
        return self._prepare(images), self.data.train_labels[indices]

    def test_batch(self, indices: np.ndarray) -> Batch:
        return self._prepare(self.data.test_images[indices]), self.data.test_labels[indices]


@dataclasses.dataclass(frozen=True, eq=False)
class ImageNetSource:
    """ImageNet from two tfds data sources (train, validation), decoded per example."""

    train: Sequence[Any]
    test: Sequence[Any]
    num_train: int
    num_test: int
    num_classes: int
    source: str
    image_size: int = imagenet.IMAGE_SIZE
    name: str = IMAGENET
    input_dtype: np.dtype = IMAGE_DTYPE

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    @staticmethod
    def _labels(records: list[dict]) -> np.ndarray:
        return np.asarray([r[LABEL_KEY] for r in records], LABEL_DTYPE)

    def train_batch(self, indices: np.ndarray, rng: np.random.Generator) -> Batch:
        records = self.train.__getitems__([int(i) for i in indices])
        images = np.stack([imagenet.train_image(r[IMAGE_KEY], rng, self.image_size) for r in records])
        return imagenet.normalize(images), self._labels(records)

    def test_batch(self, indices: np.ndarray) -> Batch:
        records = self.test.__getitems__([int(i) for i in indices])
        images = np.stack([imagenet.eval_image(r[IMAGE_KEY], self.image_size) for r in records])
        return imagenet.normalize(images), self._labels(records)


def open_imagenet(
    *, data_dir: str | None, num_train: int | None, num_test: int | None
) -> ImageNetSource:
    """ImageNet prepared as ArrayRecord for ``tfds.data_source`` (never downloads).

    Raises:
      DatasetNotFoundError: if it is not prepared under ``data_dir`` (or tfds's default data
        directory); the message says where it looked and how to prepare it.
    """
    check_data_dir(IMAGENET, data_dir)
    import tensorflow_datasets as tfds

    location = data_dir or tfds.core.constants.DATA_DIR
    try:
        train, test = (
            tfds.data_source(
                IMAGENET,
                split=split,
                data_dir=data_dir,
                download=False,
                builder_kwargs={"file_format": FILE_FORMAT},
            )
            for split in IMAGENET_SPLITS
        )
    except (KeyError, NotImplementedError, ValueError, OSError, AssertionError) as err:
        reason = " ".join(str(err).split())
        raise DatasetNotFoundError(
            f"{IMAGENET} is not prepared in {location} ({type(err).__name__}: {reason}). "
            f"Download the ILSVRC2012 tar files by hand into {location}/downloads/manual, then "
            f"{tfds_prepare_hint(IMAGENET)}; pass --data_dir if the data is elsewhere."
        ) from err
    num_classes = train.dataset_info.features[LABEL_KEY].num_classes
    return ImageNetSource(
        train,
        test,
        num_train=min(num_train or len(train), len(train)),
        num_test=min(num_test or len(test), len(test)),
        num_classes=num_classes,
        source=f"tfds:{IMAGENET}",
    )


def open_source(
    name: str,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    synthetic_like: str = "fashion_mnist",
    num_train: int | None = None,
    num_test: int | None = None,
    augment: str = "none",
    normalize_channels: bool = False,
) -> BatchSource:
    """The batch source for dataset ``name``: ImageNet read from tfds, a text corpus as
    sequences of :data:`~sparsejax.data.text.DEFAULT_SEQ_LEN` bytes (``data_dir``: the standard
    library directory of ``python_sources``), anything else in memory (see
    :func:`sparsejax.data.load_dataset` for the arguments)."""
    if name in TEXT_DATASETS:
        if augment != "none" or normalize_channels:
            raise ConfigError(f"{name} is text; set augment='none' and normalize=False")
        data = load_text(name, stdlib_dir=data_dir)
        return TokenSource(data, num_train=num_train, num_test=num_test)
    if name == IMAGENET:
        if augment != "none" or normalize_channels:
            raise ConfigError(
                f"{IMAGENET} has its own preprocessing (random resized crop, flip, ImageNet "
                "mean/std); set augment='none' and normalize=False"
            )
        return open_imagenet(data_dir=data_dir, num_train=num_train, num_test=num_test)
    data = load_dataset(
        name,
        data_dir=data_dir,
        seed=seed,
        synthetic_like=synthetic_like,
        num_train=num_train,
        num_test=num_test,
    )
    return ArraySource(data, augment, normalize_channels)

