"""Reading prepared TensorFlow Datasets (tfds) image-classification data into NumPy arrays.

Uses ``tfds.data_source``, which reads ArrayRecord files without TensorFlow. It never downloads or
prepares anything: a dataset that is not prepared as ArrayRecord raises
:class:`~sparsejax.data.errors.DatasetNotFoundError` at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsejax.data.errors import DatasetFileError, DatasetNotFoundError

TFDS_SPLITS = ("train", "test")
"""The tfds splits read, in order."""

IMAGE_KEY = "image"
LABEL_KEY = "label"

_READ_CHUNK = 4096
"""Records fetched per ``__getitems__`` call; reading in batches is about twice as fast as reading
one record at a time."""

FILE_FORMAT = "array_record"
"""The tfds file format read; what ``tfds build --file_format=array_record`` writes."""

_NOT_PREPARED_ERRORS = (KeyError, NotImplementedError, ValueError, OSError)
"""What ``tfds.data_source(..., download=False)`` raises for data that is not prepared (KeyError:
no splits), prepared in another file format (ValueError), or unreadable (OSError,
NotImplementedError)."""


def _read_records(source: Sequence[Any], count: int) -> list[Any]:
    """The first ``count`` records of a tfds data source, fetched in batches."""
    records: list[Any] = []
    for start in range(0, count, _READ_CHUNK):
        records.extend(source.__getitems__(list(range(start, min(start + _READ_CHUNK, count)))))
    return records


def _to_arrays(name: str, split: str, records: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Stacks ``{'image', 'label'}`` records into an image array and an int64 label array."""
    if not records:
        raise DatasetFileError(
            f"tfds:{name} has no {split} records; prepare it again with tfds build."
        )
    if not {IMAGE_KEY, LABEL_KEY} <= set(records[0]):
        raise DatasetFileError(
            f"tfds:{name} {split} records have keys {sorted(records[0])}; expected "
            f"{IMAGE_KEY!r} and {LABEL_KEY!r}. Only image-classification datasets can be read."
        )
    images = np.stack([r[IMAGE_KEY] for r in records])
    labels = np.asarray([r[LABEL_KEY] for r in records], dtype=np.int64)
    return images, labels


def read_tfds_arrays(
    name: str,
    *,
    data_dir: str | None,
    num_train: int | None,
    num_test: int | None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads the train and test splits of a prepared tfds image-classification dataset.

    Args:
      name: the tfds dataset name, e.g. ``"fashion_mnist"``.
      data_dir: the tfds data directory; None for tfds's default (``$TFDS_DATA_DIR`` as it was
        when tfds was imported, else ``~/tensorflow_datasets``).
      num_train: read at most this many train records (the first ones); None for all.
      num_test: read at most this many test records (the first ones); None for all.

    Returns:
      For each split, the images ``(N, H, W, C)`` as stored (uint8 for MNIST) and int64 labels.

    Raises:
      DatasetNotFoundError: if tfds is not installed or the dataset is not prepared as
        ArrayRecord under the data directory. The message is one line saying why.
      DatasetFileError: if the records are not ``{'image', 'label'}`` examples.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DatasetNotFoundError(f"tfds:{name}: tensorflow_datasets is not installed") from err
    location = f"tfds:{name} in {data_dir or tfds.core.constants.DATA_DIR}"
    try:
        sources = {
            split: tfds.data_source(
                name,
                split=split,
                data_dir=data_dir,
                download=False,
                builder_kwargs={"file_format": FILE_FORMAT},
            )
            for split in TFDS_SPLITS
        }
    except _NOT_PREPARED_ERRORS as err:
        reason = " ".join(str(err).split())
        raise DatasetNotFoundError(f"{location}: {type(err).__name__}: {reason}") from err
    limits = dict(zip(TFDS_SPLITS, (num_train, num_test)))
    arrays = {}
    for split, source in sources.items():
        limit = limits[split]
        count = len(source) if limit is None else min(limit, len(source))
        arrays[split] = _to_arrays(name, split, _read_records(source, count))
    return arrays


def tfds_prepare_hint(name: str) -> str:
    """How to prepare ``name`` for :func:`read_tfds_arrays` (a way to obtain it)."""
    return (
        f"prepare it with tfds: tfds build {name} --file_format={FILE_FORMAT}  (needs "
        "TensorFlow once; reading it afterwards does not)"
    )
