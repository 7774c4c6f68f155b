"""NumPy image augmentation for CIFAR-style training (pure functions of images and a generator).

The CIFAR recipe of the L0, Dep-L0 and GReg papers: pad 4 pixels with zeros, take a random 32x32
crop, flip horizontally with probability 1/2, then normalise every channel with the training set's
mean and standard deviation. Each function takes a batch ``(N, H, W, C)`` and returns a new one, so
they serve an in-memory input as well as a grain ``map`` transform.
"""

from __future__ import annotations

import numpy as np

from sparsejax.data.arrays import ImageArray

CROP_PADDING = 4
FLIP_PROBABILITY = 0.5


def random_crop(images: np.ndarray, rng: np.random.Generator, padding: int = CROP_PADDING) -> np.ndarray:
    """Zero-pad every image by ``padding`` pixels and cut a random window of the original size."""
    count, height, width, _ = images.shape
    padded = np.pad(images, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    tops = rng.integers(0, 2 * padding + 1, size=count)
    lefts = rng.integers(0, 2 * padding + 1, size=count)
    rows = tops[:, None] + np.arange(height)
    cols = lefts[:, None] + np.arange(width)
    return padded[np.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror each image left-right with probability 1/2."""
    flip = rng.random(images.shape[0]) < FLIP_PROBABILITY
    return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


STATISTICS_CHUNK = 1024
"""Images read at a time when the statistics of images not held in memory are summed."""


def channel_statistics(images: ImageArray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over a set of NHWC images.

    Images not held in memory (e.g. synthetic images drawn when read) are read
    :data:`STATISTICS_CHUNK` at a time, their per-channel sums and sums of squares kept in
    float64; the statistics are returned in float32, as NumPy's of an in-memory array are."""
    if isinstance(images, np.ndarray):
        return images.mean(axis=(0, 1, 2)), images.std(axis=(0, 1, 2))
    count = images.shape[0]
    total = np.zeros(images.shape[-1])
    squares = np.zeros(images.shape[-1])
    for start in range(0, count, STATISTICS_CHUNK):
        chunk = images[start : start + STATISTICS_CHUNK].astype(np.float64)
        total += chunk.sum(axis=(0, 1, 2))
        squares += np.square(chunk).sum(axis=(0, 1, 2))
    pixels = count * int(np.prod(images.shape[1:3]))
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - np.square(mean), 0.0))
    return mean.astype(np.float32), std.astype(np.float32)


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(images - mean) / std, per channel, in float32."""
    return ((images - mean) / std).astype(np.float32)


def crop_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The CIFAR training augmentation: random crop after 4-pixel padding, then random flip."""
    return random_flip(random_crop(images, rng), rng)
