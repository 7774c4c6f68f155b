"""Tests for the IDX reader."""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sparsejax.data import read_idx

SUFFIXES = ["", ".gz"]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-128, -1, 0, 127], dtype=np.int8),
        np.array([[-30000, 5], [7, 30000]], dtype=np.int16),
        np.array([-(2**31), 1, 2**31 - 1], dtype=np.int32),
        np.array([[0.5, -1.25e-3, 3.0e7]], dtype=np.float32),
        np.array([np.pi, -np.e], dtype=np.float64),
    ],
    ids=["u1", "i1", "i2", "i4", "f4", "f8"],
)
def test_round_trip(
    tmp_path: Path, idx_writer: Callable[..., Path], array: np.ndarray, suffix: str
):
    path = idx_writer(tmp_path / f"values{suffix}", array)
    read = read_idx(path)
    assert read.dtype == array.dtype and read.dtype.isnative
    assert read.shape == array.shape
    np.testing.assert_array_equal(read, array)
    read[...] = 0  # the result is writable


def test_gzip_is_detected_from_content(tmp_path: Path, idx_encoder: Callable[..., bytes]):
    array = np.arange(10, dtype=np.uint8)
    path = tmp_path / "no-suffix"
    path.write_bytes(gzip.compress(idx_encoder(array)))
    np.testing.assert_array_equal(read_idx(path), array)


def test_mnist_style_header(tmp_path: Path, idx_writer: Callable[..., Path]):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    path = idx_writer(tmp_path / "train-images-idx3-ubyte.gz", images)
    assert gzip.decompress(path.read_bytes())[:4] == b"\x00\x00\x08\x03"
    np.testing.assert_array_equal(read_idx(path), images)


@pytest.fixture
def good_bytes(idx_encoder: Callable[..., bytes]) -> bytes:
    """A valid IDX file holding a 4x6 int16 array."""
    return idx_encoder(np.arange(24, dtype=np.int16).reshape(4, 6))


CORRUPTIONS = {
    "magic": (lambda good: b"\x01\x00" + good[2:], "not an IDX file"),
    "dtype-code": (lambda good: good[:2] + b"\x07" + good[3:], "not an IDX file"),
    "values-cut": (lambda good: good[:-1], "truncated"),
    "header-cut": (lambda good: good[:6], "truncated"),
    "trailing": (lambda good: good + b"\x00", "longer than its header"),
    "tiny": (lambda good: good[:2], "too short"),
}


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_invalid_file_names_the_file(
    tmp_path: Path, good_bytes: bytes, corruption: str, suffix: str
):
    corrupt, problem = CORRUPTIONS[corruption]
    data = corrupt(good_bytes)
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(gzip.compress(data) if suffix else data)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + problem):
        read_idx(path)


def test_truncated_gzip_names_the_file(tmp_path: Path, good_bytes: bytes):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(good_bytes)[:-6])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*gzip"):
        read_idx(path)


def test_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")
