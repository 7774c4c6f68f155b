"""``load_dataset``: one entry point for every dataset, real or synthetic."""

from __future__ import annotations

import numbers
from pathlib import Path

from sparsejax.data.arrays import ArrayDataset
from sparsejax.data.cifar import CIFAR_FILES, load_cifar
from sparsejax.data.errors import DatasetNotFoundError
from sparsejax.data.mnist import DATA_DIR_ENV, load_mnist_family
from sparsejax.data.synthetic import SYNTHETIC_NAME, make_synthetic
from sparsejax.errors import ConfigError

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "fashion_mnist", "mnist", SYNTHETIC_NAME)
"""The names :func:`load_dataset` accepts."""


def _check_count(arg: str, value: int | None) -> None:
    """Rejects example counts that are not positive integers (None means "all" / the default)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{arg} must be a positive integer or None, got {value!r}.")


def check_data_dir(name: str, data_dir: str | None) -> None:
    """A :class:`DatasetNotFoundError` if ``data_dir`` is given but does not exist: a mistyped
    path must not quietly fall back to another copy of the dataset."""
    if data_dir and not Path(data_dir).expanduser().exists():
        raise DatasetNotFoundError(
            f"data_dir {data_dir} does not exist; pass the directory that holds the {name} "
            f"files with --data_dir, or leave it out to search ${DATA_DIR_ENV} and the system "
            "location"
        )


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    synthetic_like: str = "fashion_mnist",
    num_train: int | None = None,
    num_test: int | None = None,
) -> ArrayDataset:
    """Loads an image-classification dataset into memory.

    Args:
      name: one of :data:`DATASETS`.
      data_dir: a directory searched first for the dataset's files (and used as the tfds data
        directory); see :mod:`sparsejax.data.mnist` and :mod:`sparsejax.data.cifar` for the whole
        search order. For CIFAR it may also be the ``*-python.tar.gz`` file itself. Unused for
        ``"synthetic"``.
      seed: seeds ``"synthetic"`` data; real datasets are returned in their stored order.
      synthetic_like: for ``"synthetic"``, the dataset whose image shape and class count to copy
        (a key of :data:`sparsejax.data.synthetic.SYNTHETIC_LIKE`).
      num_train: for real datasets, keep only the first this many training examples (None: all);
        for ``"synthetic"``, how many to make (None: a small default).
      num_test: as ``num_train``, for the test split.

    Returns:
      The dataset, with float32 NHWC images in [0, 1] and int32 labels.

    Raises:
      ConfigError: for an unknown ``name`` or ``synthetic_like``, or a non-positive count.
      DatasetFileError: for a damaged data file.
      DatasetNotFoundError: if a real dataset is found nowhere, or ``data_dir`` does not exist;
        the message says where it was searched and how to get it.
    """
    _check_count("num_train", num_train)
    _check_count("num_test", num_test)
    if name == SYNTHETIC_NAME:
        return make_synthetic(synthetic_like, seed=seed, num_train=num_train, num_test=num_test)
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    check_data_dir(name, data_dir)
    if name in CIFAR_FILES:
        return load_cifar(name, data_dir=data_dir, num_train=num_train, num_test=num_test)
    return load_mnist_family(name, data_dir=data_dir, num_train=num_train, num_test=num_test)
