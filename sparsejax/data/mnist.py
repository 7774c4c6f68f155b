"""Locating and loading MNIST and Fashion-MNIST.

The four standard IDX files (see :mod:`sparsejax.data.idx`) are looked for, each plain or
gzip-compressed, in this order:

1. ``data_dir``, ``data_dir/<name>`` and ``data_dir/<name with "-" for "_">``;
2. the same under the directory in the environment variable :data:`DATA_DIR_ENV`;
3. the system location in :data:`SYSTEM_DATA_DIRS` (Debian's ``dataset-fashion-mnist`` package
   installs Fashion-MNIST in ``/usr/share/datasets/fashion-mnist``).

If none holds them, a prepared tfds copy is read (see :mod:`sparsejax.data.tfds_source`); if there
is none either, :class:`~sparsejax.data.errors.DatasetNotFoundError` lists every place searched.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sparsejax.data.arrays import ArrayDataset, from_uint8_splits
from sparsejax.data.errors import (
    DatasetFileError,
    DatasetNotFoundError,
    not_found_message,
)
from sparsejax.data.idx import read_idx
from sparsejax.data.tfds_source import read_tfds_arrays, tfds_prepare_hint

NUM_CLASSES = 10
"""Both datasets have ten classes."""

DATA_DIR_ENV = "SPARSEJAX_DATA_DIR"
"""Environment variable naming a directory searched after ``data_dir``."""

SYSTEM_DATA_DIRS: dict[str, str] = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
"""Where each dataset is looked for last before tfds; also the names of the datasets served."""

DOWNLOAD_PAGES: dict[str, str] = {
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist",
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
}
"""Where the IDX files of each dataset can be downloaded."""

APT_PACKAGES: dict[str, str] = {"fashion_mnist": "dataset-fashion-mnist"}
"""Debian/Ubuntu packages that install a dataset into its system location."""

IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""The (images, labels) IDX file names of each split, without the optional ``.gz``."""

_GZIP_SUFFIX = ".gz"


def candidate_dirs(name: str, data_dir: str | None) -> list[tuple[Path, str]]:
    """The directories searched for ``name``'s IDX files, in order, each with where it came from."""
    roots = [(data_dir, "data_dir"), (os.environ.get(DATA_DIR_ENV), f"${DATA_DIR_ENV}")]
    candidates: list[tuple[Path, str]] = []
    for root, origin in roots:
        if root:
            for sub in dict.fromkeys(("", name, name.replace("_", "-"))):
                candidates.append((Path(root, sub).expanduser(), origin))
    candidates.append((Path(SYSTEM_DATA_DIRS[name]), "system location"))
    return candidates


def _find_file(directory: Path, base: str) -> Path | None:
    """``directory/base`` or ``directory/base.gz``, whichever exists first, else None."""
    for path in (directory / base, directory / (base + _GZIP_SUFFIX)):
        if path.is_file():
            return path
    return None


def find_idx_files(name: str, directory: Path) -> dict[str, tuple[Path, Path]] | None:
    """The (images, labels) files of each split in ``directory``, or None if it holds none.

    Raises:
      DatasetNotFoundError: if the directory holds some of the four files but not all, which
        would otherwise be silently passed over for another copy.
    """
    bases = [base for pair in IDX_FILES.values() for base in pair]
    found = {base: path for base in bases if (path := _find_file(directory, base)) is not None}
    if not found:
        return None
    missing = [base for base in bases if base not in found]
    if missing:
        raise DatasetNotFoundError(
            f"{directory} holds only some of the {name} IDX files; missing "
            f"{', '.join(missing)} (plain or {_GZIP_SUFFIX}). Download them from "
            f"{DOWNLOAD_PAGES[name]} into {directory}, or remove the partial copy."
        )
    return {split: (found[images], found[labels]) for split, (images, labels) in IDX_FILES.items()}


def _read_split(
    images_path: Path, labels_path: Path, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split's IDX files: the first ``limit`` uint8 images ``(N, H, W)`` and labels."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetFileError(
            f"{images_path} should hold uint8 images of shape (N, H, W), got {images.dtype} of "
            f"shape {images.shape}; is it the right file?"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetFileError(
            f"{labels_path} should hold one label per image of {images_path} "
            f"({images.shape[0]}), got an array of shape {labels.shape}; are the files from the "
            "same dataset and split?"
        )
    return images[:limit], labels[:limit]


def _not_found_message(name: str, data_dir: str | None, searched: list[str]) -> str:
    """Lists the places searched and the ways to obtain the dataset."""
    files = ", ".join(f"{base}{_GZIP_SUFFIX}" for bases in IDX_FILES.values() for base in bases)
    ways = []
    if name in APT_PACKAGES:
        ways.append(
            f"apt-get install {APT_PACKAGES[name]}  (Debian/Ubuntu; installs "
            f"{SYSTEM_DATA_DIRS[name]})"
        )
    ways += [
        f"download {files} from {DOWNLOAD_PAGES[name]} into a directory and pass it with "
        f"--data_dir (load_dataset(data_dir=...)) or set ${DATA_DIR_ENV}",
        tfds_prepare_hint(name),
        'use the "synthetic" dataset for random data of the same shape',
    ]
    return not_found_message(name, searched, ways, search_settings(data_dir))


def search_settings(data_dir: str | None) -> dict[str, str | None]:
    """The user's search settings, by the name a message should give them."""
    return {"data_dir": data_dir, f"${DATA_DIR_ENV}": os.environ.get(DATA_DIR_ENV)}


def load_mnist_family(
    name: str,
    *,
    data_dir: str | None = None,
    num_train: int | None = None,
    num_test: int | None = None,
) -> ArrayDataset:
    """Loads MNIST or Fashion-MNIST from IDX files or, failing that, from a prepared tfds copy.

    Args:
      name: ``"mnist"`` or ``"fashion_mnist"`` (a key of :data:`SYSTEM_DATA_DIRS`).
      data_dir: a directory searched first, and the tfds data directory; see the module docstring.
      num_train: keep only the first this many training examples; None keeps all 60000.
      num_test: keep only the first this many test examples; None keeps all 10000.

    Returns:
      The dataset with 28x28x1 float32 images in [0, 1] and int32 labels.

    Raises:
      DatasetNotFoundError: if no copy is found; the message lists where it was searched.
      DatasetFileError: if a file found is corrupt or not the expected IDX file.
    """
    if name not in SYSTEM_DATA_DIRS:
        raise ValueError(
            f"unknown MNIST-family dataset {name!r}; expected one of {sorted(SYSTEM_DATA_DIRS)}."
        )
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    limits = {"train": num_train, "test": num_test}
    searched = []
    for directory, origin in candidate_dirs(name, data_dir):
        files = find_idx_files(name, directory)
        if files is None:
            problem = "no IDX files" if directory.is_dir() else "does not exist"
            searched.append(f"{directory} ({origin}): {problem}")
            continue
        arrays = {split: _read_split(*files[split], limits[split]) for split in IDX_FILES}
        return from_uint8_splits(name, arrays, num_classes=NUM_CLASSES, source=str(directory))
    try:
        arrays = read_tfds_arrays(name, data_dir=data_dir, num_train=num_train, num_test=num_test)
    except DatasetNotFoundError as err:
        searched.append(str(err))
        raise DatasetNotFoundError(_not_found_message(name, data_dir, searched)) from err
    return from_uint8_splits(name, arrays, num_classes=NUM_CLASSES, source=f"tfds:{name}")

