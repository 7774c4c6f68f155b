"""Locating and loading CIFAR-10 and CIFAR-100.

The *python* distribution of each dataset (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``
from https://www.cs.toronto.edu/~kriz/cifar.html) is looked for, in this order:

1. under ``data_dir``: ``data_dir`` itself if it is a file (the tarball), ``data_dir/<tarball>``,
   ``data_dir`` itself if it holds the extracted files, ``data_dir/<extracted folder>``
   (``cifar-10-batches-py`` or ``cifar-100-python``);
2. the same under the directory in the environment variable
   :data:`~sparsejax.data.mnist.DATA_DIR_ENV`.

Tarball members are read in memory; nothing is extracted to disk. If no copy is found, a prepared
tfds copy is read (see :mod:`sparsejax.data.tfds_source`); if there is none either,
:class:`~sparsejax.data.errors.DatasetNotFoundError` lists every place searched.

Security: the python distribution stores each batch as a *pickle*, and unpickling can run
arbitrary code. Files are only unpickled from the places above, that is, files the user points at
with ``data_dir`` or ``$SPARSEJAX_DATA_DIR``; the CIFAR batches are pickled by the dataset's
authors. Do not point ``data_dir`` at CIFAR files from a source you do not trust.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sparsejax.data.arrays import ArrayDataset, Splits, from_uint8_splits
from sparsejax.data.errors import (
    DatasetFileError,
    DatasetNotFoundError,
    not_found_message,
)
from sparsejax.data.mnist import DATA_DIR_ENV, search_settings
from sparsejax.data.tfds_source import read_tfds_arrays, tfds_prepare_hint

IMAGE_SHAPE = (32, 32, 3)
"""The ``(height, width, channels)`` of every CIFAR image."""

_STORED_SHAPE = (3, 32, 32)
"""How a row of a batch's ``b"data"`` is laid out: channel-major (all red, all green, all blue)."""

_ROW_SIZE = int(np.prod(_STORED_SHAPE))

DOWNLOAD_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclasses.dataclass(frozen=True)
class CifarFiles:
    """Where one CIFAR dataset's python distribution keeps its data."""

    title: str
    """The dataset's name as its authors write it, for messages."""
    tarball: str
    """The file name of the distributed archive."""
    folder: str
    """The folder the archive extracts to; tarball members are ``<folder>/<file>``."""
    train_files: tuple[str, ...]
    """The training batches, in order."""
    test_files: tuple[str, ...]
    """The test batches, in order."""
    label_key: bytes
    """The key of each batch's labels."""
    num_classes: int

    @property
    def all_files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files


CIFAR_FILES: dict[str, CifarFiles] = {
    "cifar10": CifarFiles(
        title="CIFAR-10",
        tarball="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": CifarFiles(
        title="CIFAR-100",
        tarball="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key=b"fine_labels",
        num_classes=100,
    ),
}
"""The datasets served, keyed by their :func:`~sparsejax.data.load_dataset` (and tfds) names.
tfds's ``label`` of ``cifar100`` is the fine label, as here."""

_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
"""What reading a truncated, corrupt or non-tar file raises (a bad gzip stream is an OSError)."""

Reader = Callable[[str], tuple[bytes, str]]
"""Given a batch file's name (e.g. ``"data_batch_1"``), returns its bytes and a description of
where they came from, for error messages."""


def _has_any_file(files: CifarFiles, directory: Path) -> bool:
    return directory.is_dir() and any((directory / name).is_file() for name in files.all_files)


def _find_copy(
    files: CifarFiles, root: Path, origin: str, searched: list[str]
) -> tuple[str, Path] | None:
    """The first copy under ``root`` as ``("tarball" | "folder", path)``, else None.

    Each place looked at and not used is appended to ``searched``.
    """
    if root.is_file():
        return "tarball", root
    tarball = root / files.tarball
    if tarball.is_file():
        return "tarball", tarball
    for directory in (root, root / files.folder):
        if _has_any_file(files, directory):
            return "folder", directory
    problem = (
        f"no {files.tarball}, {files.folder}/ or {files.title} batch files"
        if root.is_dir()
        else "does not exist"
    )
    searched.append(f"{root} ({origin}): {problem}")
    return None


def _tarball_reader(files: CifarFiles, path: Path) -> Reader:
    """Reads every batch member of the tarball in one pass; returns a lookup of their bytes.

    Raises:
      DatasetFileError: naming the tarball, if it cannot be read or lacks a member.
    """
    wanted = {f"{files.folder}/{name}": name for name in files.all_files}
    contents: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                name = wanted.get(member.name.removeprefix("./"))
                if name is not None and member.isfile():
                    stream = archive.extractfile(member)
                    assert stream is not None  # a regular file always has a stream
                    contents[name] = stream.read()
                    if len(contents) == len(wanted):
                        break
    except _TAR_ERRORS as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise DatasetFileError(
            f"{path} is damaged or not a {files.title} archive ({reason}); download "
            f"{files.tarball} again from {DOWNLOAD_PAGE}"
        ) from err
    missing = [member for member, name in wanted.items() if name not in contents]
    if missing:
        raise DatasetFileError(
            f"{path} lacks the member(s) {', '.join(missing)}; is it the {files.title} python "
            f"distribution {files.tarball} (from {DOWNLOAD_PAGE})?"
        )
    return lambda name: (contents[name], f"{path} member {files.folder}/{name}")


def _folder_reader(files: CifarFiles, directory: Path) -> Reader:
    """Reads batch files from an extracted folder.

    Raises:
      DatasetFileError: naming the missing file(s), if the folder holds only some of the batches.
    """
    missing = [
        str(directory / name) for name in files.all_files if not (directory / name).is_file()
    ]
    if missing:
        raise DatasetFileError(
            f"{directory} holds only some of the {files.title} batch files; missing "
            f"{', '.join(missing)}. Extract {files.tarball} (from {DOWNLOAD_PAGE}) again, or "
            "remove the partial copy."
        )
    return lambda name: ((directory / name).read_bytes(), str(directory / name))


def _load_batch(files: CifarFiles, data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickles one batch: uint8 NHWC images ``(N, 32, 32, 3)`` and integer labels ``(N,)``.

    Raises:
      DatasetFileError: naming ``where``, if the batch is not in the expected format.
    """
    try:
        batch = pickle.loads(data, encoding="bytes")
    # Unpickling a damaged or foreign file can raise nearly anything; all mean the same here.
    except Exception as err:
        raise DatasetFileError(
            f"{where} could not be unpickled as a {files.title} batch: {type(err).__name__}: {err}"
        ) from err
    keys = (b"data", files.label_key)
    if not isinstance(batch, dict) or not all(key in batch for key in keys):
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetFileError(
            f"{where} should hold a dict with keys {keys[0]!r} and {keys[1]!r}, got {found}; "
            f"is it a {files.title} batch?"
        )
    images = np.asarray(batch[b"data"])
    labels = np.asarray(batch[files.label_key])
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != _ROW_SIZE:
        raise DatasetFileError(
            f"{where} should hold uint8 image rows of shape (N, {_ROW_SIZE}), got {images.dtype} "
            f"of shape {images.shape}."
        )
    if (
        labels.ndim != 1
        or labels.shape[0] != images.shape[0]
        or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise DatasetFileError(
            f"{where} should hold one integer {files.label_key!r} per image ({images.shape[0]}), "
            f"got {labels.dtype} of shape {labels.shape}."
        )
    return images.reshape(-1, *_STORED_SHAPE).transpose(0, 2, 3, 1), labels


def _read_split(
    files: CifarFiles,
    names: tuple[str, ...],
    read: Reader,
    limit: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates the first ``limit`` examples of the given batches (later ones are not read)."""
    images, labels = [], []
    remaining = limit
    for name in names:
        if remaining is not None and remaining <= 0:
            break
        batch_images, batch_labels = _load_batch(files, *read(name))
        images.append(batch_images[:remaining])
        labels.append(batch_labels[:remaining])
        if remaining is not None:
            remaining -= len(images[-1])
    # The transpose to NHWC leaves strided views; the result is copied into C order once.
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _not_found_message(name: str, data_dir: str | None, searched: list[str]) -> str:
    """Lists the places searched and the ways to obtain the dataset."""
    files = CIFAR_FILES[name]
    ways = [
        f"download {files.tarball} from {DOWNLOAD_PAGE} and pass it, or the directory holding it "
        f"(or the extracted {files.folder}/), with --data_dir (load_dataset(data_dir=...)) or "
        f"set ${DATA_DIR_ENV}",
        tfds_prepare_hint(name),
        f'use the "synthetic" dataset with synthetic_like="{name}" for random data of the same '
        "shape",
    ]
    return not_found_message(name, searched, ways, search_settings(data_dir))


def _to_dataset(name: str, arrays: Splits, source: str) -> ArrayDataset:
    """The :class:`ArrayDataset` of the splits, after checking the CIFAR image shape."""
    for split, (images, _) in arrays.items():
        if images.shape[1:] != IMAGE_SHAPE:
            raise DatasetFileError(
                f"{source}: {name} {split} images should be {IMAGE_SHAPE}, got {images.shape[1:]}."
            )
    return from_uint8_splits(
        name, arrays, num_classes=CIFAR_FILES[name].num_classes, source=source
    )


def load_cifar(
    name: str,
    *,
    data_dir: str | None = None,
    num_train: int | None = None,
    num_test: int | None = None,
) -> ArrayDataset:
    """Loads CIFAR-10 or CIFAR-100 from the python distribution or from a prepared tfds copy.

    Unpickles the batch files it finds; see the security note in the module docstring.

    Args:
      name: ``"cifar10"`` or ``"cifar100"`` (a key of :data:`CIFAR_FILES`).
      data_dir: the tarball, its directory, the extracted folder or its directory, searched first;
        also the tfds data directory. See the module docstring.
      num_train: keep only the first this many training examples; None keeps all 50000.
      num_test: keep only the first this many test examples; None keeps all 10000.

    Returns:
      The dataset with 32x32x3 float32 images in [0, 1] and int32 labels (CIFAR-100: the 100
      fine labels).

    Raises:
      DatasetNotFoundError: if no copy is found; the message lists where it was searched.
      DatasetFileError: if a copy found is unreadable, incomplete or not in the expected
        format; the message names the file.
    """
    if name not in CIFAR_FILES:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected one of {sorted(CIFAR_FILES)}.")
    files = CIFAR_FILES[name]
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    env_dir = os.environ.get(DATA_DIR_ENV)
    searched: list[str] = []
    for root, origin in ((data_dir, "data_dir"), (env_dir, f"${DATA_DIR_ENV}")):
        if not root:
            continue
        found = _find_copy(files, Path(root).expanduser(), origin, searched)
        if found is None:
            continue
        kind, path = found
        read = (_tarball_reader if kind == "tarball" else _folder_reader)(files, path)
        arrays = {
            "train": _read_split(files, files.train_files, read, num_train),
            "test": _read_split(files, files.test_files, read, num_test),
        }
        return _to_dataset(name, arrays, source=str(path))
    try:
        arrays = read_tfds_arrays(name, data_dir=data_dir, num_train=num_train, num_test=num_test)
    except DatasetNotFoundError as err:
        searched.append(str(err))
        raise DatasetNotFoundError(_not_found_message(name, data_dir, searched)) from err
    return _to_dataset(name, arrays, source=f"tfds:{name}")
