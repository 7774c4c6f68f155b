import numpy as np

from sparsejax.data.augment import (
    channel_statistics,
    crop_flip,
    normalize,
    random_crop,
    random_flip,
)
from sparsejax.data.synthetic import make_synthetic


def images(count=64, size=8, channels=3):
    rng = np.random.default_rng(0)
    return rng.random((count, size, size, channels)).astype(np.float32) + 1.0


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
    batch = images()
    cropped = random_crop(batch, np.random.default_rng(1))
    assert cropped.shape == batch.shape
    padded = np.pad(batch, [(0, 0), (4, 4), (4, 4), (0, 0)])
    offsets = set()
    for original, crop in zip(padded, cropped):
        matches = [
            (top, left)
            for top in range(9)
            for left in range(9)
            if np.array_equal(original[top : top + 8, left : left + 8], crop)
        ]
        assert matches
        offsets.add(matches[0])
    assert len(offsets) > 20


def test_random_flip_mirrors_about_half_of_the_images():
    batch = images(count=400)
    flipped = random_flip(batch, np.random.default_rng(2))
    mirrored = np.array([np.array_equal(f, b[:, ::-1]) for f, b in zip(flipped, batch)])
    kept = np.array([np.array_equal(f, b) for f, b in zip(flipped, batch)])
    assert np.all(mirrored | kept)
    assert 150 < mirrored.sum() < 250


def test_augmentation_is_a_function_of_the_generator_seed():
    batch = images()
    a = crop_flip(batch, np.random.default_rng(5))
    b = crop_flip(batch, np.random.default_rng(5))
    c = crop_flip(batch, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_normalize_gives_zero_mean_unit_std_per_channel():
    batch = images() * np.array([1.0, 2.0, 3.0], np.float32)
    mean, std = channel_statistics(batch)
    out = normalize(batch, mean, std)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1.0, rtol=1e-4)
    np.testing.assert_allclose(mean, [batch[..., c].mean() for c in range(3)], rtol=1e-5)


def test_channel_statistics_of_images_not_in_memory_are_summed_in_chunks():
    lazy = make_synthetic("cifar10", num_train=1100, num_test=1).train_images  # two chunks
    whole = np.asarray(lazy).astype(np.float64)
    mean, std = channel_statistics(lazy)
    assert mean.dtype == std.dtype == np.float32
    np.testing.assert_allclose(mean, whole.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, whole.std(axis=(0, 1, 2)), rtol=1e-5)
