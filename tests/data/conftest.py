"""Fixtures shared by the data tests: an IDX writer and a search path with no local copies."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sparsejax.data import mnist

# IDX data-type codes, written out here independently of the reader under test.
_IDX_CODES = {
    np.dtype("u1"): 0x08,
    np.dtype("i1"): 0x09,
    np.dtype("i2"): 0x0B,
    np.dtype("i4"): 0x0C,
    np.dtype("f4"): 0x0D,
    np.dtype("f8"): 0x0E,
}

def encode_idx(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``: magic number, big-endian sizes, big-endian values."""
    header = bytes([0, 0, _IDX_CODES[array.dtype], array.ndim])
    sizes = struct.pack(f">{array.ndim}I", *array.shape)
    return header + sizes + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Writes ``array`` as an IDX file, gzip-compressed if ``path`` ends in ``.gz``."""
    data = encode_idx(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture
def idx_encoder() -> Callable[[np.ndarray], bytes]:
    """:func:`encode_idx`."""
    return encode_idx


@pytest.fixture
def idx_writer() -> Callable[[Path, np.ndarray], Path]:
    """:func:`write_idx`."""
    return write_idx


def write_mnist_files(
    directory: Path, *, num_train: int, num_test: int, seed: int, suffix: str = ".gz"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes the four MNIST IDX files with random 28x28 uint8 images; returns them by split."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, count in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        images_name, labels_name = mnist.IDX_FILES[split]
        write_idx(directory / (images_name + suffix), images)
        write_idx(directory / (labels_name + suffix), labels)
        written[split] = (images, labels)
    return written


@pytest.fixture
def mnist_files_writer() -> Callable[..., dict[str, tuple[np.ndarray, np.ndarray]]]:
    """:func:`write_mnist_files`."""
    return write_mnist_files


@pytest.fixture
def no_local_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Points $SPARSEJAX_DATA_DIR and every system location at empty directories.

    Returns an empty directory to pass as ``data_dir``.
    """
    env_dir = tmp_path / "env"
    system_dir = tmp_path / "system"
    data_dir = tmp_path / "data_dir"
    for directory in (env_dir, system_dir, data_dir):
        directory.mkdir()
    monkeypatch.setenv(mnist.DATA_DIR_ENV, os.fspath(env_dir))
    for name in mnist.SYSTEM_DATA_DIRS:
        monkeypatch.setitem(mnist.SYSTEM_DATA_DIRS, name, os.fspath(system_dir / name))
    return data_dir

