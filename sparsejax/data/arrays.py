"""An image-classification dataset held in memory as NumPy arrays."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

IMAGE_DTYPE = np.dtype(np.float32)
"""dtype of :class:`ArrayDataset` images (scaled to [0, 1])."""

LABEL_DTYPE = np.dtype(np.int32)
"""dtype of :class:`ArrayDataset` labels."""

_UINT8_MAX = 255.0


class ImageArray(Protocol):
    """Images indexable like a NumPy array's first axis: a NumPy array, or images drawn when read
    (:class:`sparsejax.data.synthetic.SyntheticImages`)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    ndim: int

    def __getitem__(self, key) -> np.ndarray: ...

    def __array__(self, dtype=None, copy=None) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Train and test splits of an image-classification dataset.

    The arrays are checked on construction. Instances compare by identity, not by content.

    Attributes:
      name: the dataset's name, one of :data:`sparsejax.data.DATASETS`.
      train_images: float32 images of shape ``(num_train, height, width, channels)`` in [0, 1]
        (a NumPy array, or any :class:`ImageArray`).
      train_labels: int32 array of shape ``(num_train,)`` with values in ``[0, num_classes)``.
      test_images: float32 images of shape ``(num_test, height, width, channels)`` in [0, 1].
      test_labels: int32 array of shape ``(num_test,)`` with values in ``[0, num_classes)``.
      num_classes: the number of classes.
      source: where the data was read from, for logs: a directory, ``"tfds:<name>"`` or
        ``"synthetic"``.
    """

    name: str
    train_images: ImageArray
    train_labels: np.ndarray
    test_images: ImageArray
    test_labels: np.ndarray
    num_classes: int
    source: str

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"{self.name}: num_classes must be positive, got {self.num_classes}.")
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != IMAGE_DTYPE or images.ndim != 4:
                raise ValueError(
                    f"{self.name}: {split}_images must be a 4-D {IMAGE_DTYPE} array (N, H, W, C), "
                    f"got {images.dtype} of shape {images.shape}; see scale_images()."
                )
            if labels.dtype != LABEL_DTYPE or labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{self.name}: {split}_labels must hold one {LABEL_DTYPE} label per image, "
                    f"shape {images.shape[:1]}; got {labels.dtype} of shape {labels.shape}."
                )
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"{self.name}: {split}_labels must lie in [0, {self.num_classes}), got values "
                    f"in [{labels.min()}, {labels.max()}]."
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"{self.name}: train and test images differ in shape: "
                f"{self.train_images.shape[1:]} vs {self.test_images.shape[1:]}."
            )

    @property
    def num_train(self) -> int:
        """The number of training examples."""
        return int(self.train_images.shape[0])

    @property
    def num_test(self) -> int:
        """The number of test examples."""
        return int(self.test_images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape ``(height, width, channels)`` of one image."""
        height, width, channels = self.train_images.shape[1:]
        return int(height), int(width), int(channels)


def scale_images(images: np.ndarray) -> np.ndarray:
    """Converts uint8 images, ``(N, H, W)`` or ``(N, H, W, C)``, to float32 NHWC in [0, 1]."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"expected uint8 images of shape (N, H, W) or (N, H, W, C), got {images.dtype} of "
            f"shape {images.shape}."
        )
    scaled = images.astype(IMAGE_DTYPE)
    scaled /= _UINT8_MAX
    return scaled if scaled.ndim == 4 else scaled[..., np.newaxis]


def as_labels(labels: np.ndarray) -> np.ndarray:
    """Converts integer labels of any width to a 1-D int32 array."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"expected a 1-D integer label array, got {labels.dtype} of shape {labels.shape}."
        )
    return labels.astype(LABEL_DTYPE)



Splits = dict[str, tuple[np.ndarray, np.ndarray]]
"""``{"train": (uint8 NHWC images, labels), "test": (...)}``."""


def from_uint8_splits(name: str, splits: Splits, *, num_classes: int, source: str) -> ArrayDataset:
    """The :class:`ArrayDataset` of each split's uint8 images (scaled to [0, 1]) and labels."""
    (train_images, train_labels), (test_images, test_labels) = splits["train"], splits["test"]
    return ArrayDataset(
        name=name,
        train_images=scale_images(train_images),
        train_labels=as_labels(train_labels),
        test_images=scale_images(test_images),
        test_labels=as_labels(test_labels),
        num_classes=num_classes,
        source=source,
    )
