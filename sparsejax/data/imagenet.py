"""ImageNet preprocessing in NumPy and PIL (the torchvision recipe the ResNet-50 papers train with).

Training: a random crop covering 8%-100% of the image area with aspect ratio in [3/4, 4/3]
(up to ten tries, else the largest central crop of a clamped aspect ratio), resized bilinearly to
224x224, mirrored with probability 1/2. Evaluation: the shorter side resized to 256, then the
central 224x224 crop. Both then normalise every channel with the ImageNet mean and standard
deviation (of images scaled to [0, 1]). Every function takes one uint8 ``(H, W, 3)`` image of any
size, so they run per example inside grain workers.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

IMAGE_SIZE = 224
RESIZE_SIZE = 256
AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
FLIP_PROBABILITY = 0.5
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

Box = tuple[int, int, int, int]
"""(top, left, height, width) of a crop."""


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator) -> Box:
    """A crop of area fraction ~ U(AREA_RANGE) and log-uniform aspect ratio in ASPECT_RANGE."""
    area = height * width
    log_ratio = np.log(ASPECT_RANGE)
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(*AREA_RANGE)
        ratio = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target * ratio))
        crop_h = round(math.sqrt(target / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    ratio = width / height
    if ratio < ASPECT_RANGE[0]:
        crop_w, crop_h = width, round(width / ASPECT_RANGE[0])
    elif ratio > ASPECT_RANGE[1]:
        crop_h, crop_w = height, round(height * ASPECT_RANGE[1])
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Grayscale ``(H, W)`` or ``(H, W, 1)`` images repeated to three channels."""
    if image.ndim == 2:
        image = image[:, :, None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 images to float32, scaled to [0, 1], minus MEAN, over STD."""
    return (images.astype(np.float32) / 255.0 - MEAN) / STD


def train_image(image: np.ndarray, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Random resized crop to ``size`` and random flip of one uint8 image (uint8 result)."""
    image = _as_rgb(image)
    top, left, height, width = random_resized_crop_box(*image.shape[:2], rng)
    crop = _resize(image[top : top + height, left : left + width], size, size)
    return crop[:, ::-1] if rng.random() < FLIP_PROBABILITY else crop


def eval_image(
    image: np.ndarray, size: int = IMAGE_SIZE, resize: int = RESIZE_SIZE
) -> np.ndarray:
    """Shorter side resized to ``resize`` (aspect kept), then the central ``size`` crop."""
    image = _as_rgb(image)
    height, width = image.shape[:2]
    scale = resize / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = _resize(image, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]
