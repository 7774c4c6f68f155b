"""Tests for finding and loading CIFAR-10 and CIFAR-100 (python distribution and tfds)."""

from __future__ import annotations

import io
import os
import pickle
import re
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants

from sparsejax.data import (
    DATASETS,
    ArrayDataset,
    DatasetNotFoundError,
    load_dataset,
    mnist,
)
from sparsejax.data.errors import DatasetFileError

NOT_FOUND_SECONDS = 5.0
"""Upper bound on the time to give up on a dataset that is nowhere (no download attempt)."""

# The official layouts, written out here independently of the loader under test.
TARBALLS = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
# Batch file -> (split, number of examples). CIFAR-10's training batches have unequal sizes here
# so that counts can stop part-way through a batch.
BATCHES = {
    "cifar10": {
        "data_batch_1": ("train", 2),
        "data_batch_2": ("train", 3),
        "data_batch_3": ("train", 1),
        "data_batch_4": ("train", 2),
        "data_batch_5": ("train", 2),
        "test_batch": ("test", 3),
    },
    "cifar100": {"train": ("train", 5), "test": ("test", 3)},
}
META_FILES = {"cifar10": "batches.meta", "cifar100": "meta"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}

Written = dict[str, tuple[np.ndarray, np.ndarray]]
"""Per split, the expected uint8 NHWC images and labels."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes any attempt to open a connection fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _images(first: int, count: int, seed: int) -> np.ndarray:
    """NHWC uint8 images whose pixels depend on the example, row, column *and* channel."""
    i, h, w, c = np.meshgrid(
        np.arange(first, first + count), np.arange(32), np.arange(32), np.arange(3), indexing="ij"
    )
    return ((i * 37 + h * 5 + w * 3 + c * 80 + seed * 11) % 256).astype(np.uint8)


def _batches(name: str, seed: int) -> tuple[dict[str, bytes], Written]:
    """The pickled batch files of a tiny copy of ``name`` and the arrays they should load as."""
    contents, images, labels = {}, {"train": [], "test": []}, {"train": [], "test": []}
    first = 0
    for file, (split, count) in BATCHES[name].items():
        nhwc = _images(first, count, seed)
        fine = [(first + k + seed) % NUM_CLASSES[name] for k in range(count)]
        # The distribution stores each image as one row: 1024 red, 1024 green, 1024 blue values.
        batch = {
            b"batch_label": f"{split} batch".encode(),
            b"filenames": [f"image_{first + k}.png".encode() for k in range(count)],
            b"data": nhwc.transpose(0, 3, 1, 2).reshape(count, 3072),
        }
        if name == "cifar10":
            batch[b"labels"] = fine
        else:
            batch[b"fine_labels"] = fine
            batch[b"coarse_labels"] = [label // 5 + 1 for label in fine]  # never the fine label
        contents[file] = pickle.dumps(batch, protocol=2)
        images[split].append(nhwc)
        labels[split].append(np.array(fine))
        first += count
    contents[META_FILES[name]] = pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=2)
    written = {s: (np.concatenate(images[s]), np.concatenate(labels[s])) for s in images}
    return contents, written


def write_tarball(
    directory: Path, name: str, *, seed: int = 0, leave_out: str | None = None
) -> tuple[Path, Written]:
    """Writes ``directory/<official tarball name>`` with members ``<folder>/<file>``."""
    contents, written = _batches(name, seed)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TARBALLS[name]
    with tarfile.open(path, "w:gz") as archive:
        folder = tarfile.TarInfo(FOLDERS[name])
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for file, data in contents.items():
            if file != leave_out:
                member = tarfile.TarInfo(f"{FOLDERS[name]}/{file}")
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
    return path, written


def write_folder(directory: Path, name: str, *, seed: int = 0) -> tuple[Path, Written]:
    """Writes the extracted folder ``directory/<official folder name>/<file>``."""
    contents, written = _batches(name, seed)
    folder = directory / FOLDERS[name]
    folder.mkdir(parents=True)
    for file, data in contents.items():
        (folder / file).write_bytes(data)
    return folder, written


def _assert_loaded(dataset: ArrayDataset, name: str, written: Written) -> None:
    """Checks that ``dataset`` holds exactly the ``written`` pixels and labels."""
    assert dataset.name == name and dataset.num_classes == NUM_CLASSES[name]
    assert dataset.image_shape == (32, 32, 3)
    for images, labels, (raw_images, raw_labels) in (
        (dataset.train_images, dataset.train_labels, written["train"]),
        (dataset.test_images, dataset.test_labels, written["test"]),
    ):
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert images.flags.c_contiguous
        np.testing.assert_array_equal(np.rint(images * 255).astype(np.uint8), raw_images)
        np.testing.assert_allclose(images, raw_images / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(labels, raw_labels)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("layout", ["tarball", "tarball_dir", "folder", "folder_dir"])
def test_python_distribution_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, layout: str
):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    if layout.startswith("tarball"):
        source, written = write_tarball(tmp_path, name, seed=3)
    else:
        source, written = write_folder(tmp_path, name, seed=3)
    data_dir = source if not layout.endswith("_dir") else tmp_path
    dataset = load_dataset(name, data_dir=os.fspath(data_dir))
    assert dataset.source == str(source)
    total = {split: sum(n for s, n in BATCHES[name].values() if s == split) for split in written}
    assert dataset.num_train == total["train"] and dataset.num_test == total["test"]
    _assert_loaded(dataset, name, written)


def test_counts_keep_the_first_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    path, written = write_tarball(tmp_path, "cifar10")
    # 4 training examples: all of data_batch_1 (2) and part of data_batch_2 (3).
    small = load_dataset("cifar10", data_dir=os.fspath(path), num_train=4, num_test=1)
    assert small.num_train == 4 and small.num_test == 1
    _assert_loaded(
        small,
        "cifar10",
        {
            split: (images[:n], labels[:n])
            for (split, (images, labels)), n in zip(written.items(), (4, 1))
        },
    )
    large = load_dataset("cifar10", data_dir=os.fspath(path), num_train=1000, num_test=1000)
    _assert_loaded(large, "cifar10", written)


def test_batches_past_the_count_are_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    folder, written = write_folder(tmp_path, "cifar10")
    bad = folder / "data_batch_3"
    bad.write_bytes(b"not a pickle")
    small = load_dataset("cifar10", data_dir=os.fspath(folder), num_train=5)
    np.testing.assert_array_equal(small.train_labels, written["train"][1][:5])
    with pytest.raises(ValueError, match=re.escape(str(bad)) + " could not be unpickled"):
        load_dataset("cifar10", data_dir=os.fspath(folder))


def test_data_dir_beats_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    env_tarball, from_env = write_tarball(tmp_path / "env", "cifar100", seed=1)
    monkeypatch.setenv(mnist.DATA_DIR_ENV, os.fspath(env_tarball))  # the tarball itself
    dataset = load_dataset("cifar100")
    assert dataset.source == str(env_tarball)
    _assert_loaded(dataset, "cifar100", from_env)

    monkeypatch.setenv(mnist.DATA_DIR_ENV, os.fspath(tmp_path / "env"))  # its directory
    given, from_data_dir = write_folder(tmp_path / "given", "cifar100", seed=2)
    dataset = load_dataset("cifar100", data_dir=os.fspath(tmp_path / "given"))
    assert dataset.source == str(given)
    _assert_loaded(dataset, "cifar100", from_data_dir)
    assert not np.array_equal(from_env["train"][0], from_data_dir["train"][0])


def test_data_dir_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    path, written = write_tarball(tmp_path / "datasets", "cifar10")
    dataset = load_dataset("cifar10", data_dir="~/datasets")
    assert dataset.source == str(path)
    _assert_loaded(dataset, "cifar10", written)


@pytest.mark.parametrize(
    ("name", "member"),
    [("cifar10", "test_batch"), ("cifar10", "data_batch_4"), ("cifar100", "train")],
)
def test_missing_tarball_member_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, member: str
):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    path, _ = write_tarball(tmp_path, name, leave_out=member)
    with pytest.raises(
        ValueError, match=re.escape(f"{path} lacks the member(s) {FOLDERS[name]}/{member}")
    ):
        load_dataset(name, data_dir=os.fspath(tmp_path))


def test_the_other_datasets_tarball_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    path, _ = write_tarball(tmp_path, "cifar10")
    with pytest.raises(ValueError, match=re.escape(f"{path} lacks") + ".*cifar-100-python/train"):
        load_dataset("cifar100", data_dir=os.fspath(path))


def test_corrupt_tarball_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    path, _ = write_tarball(tmp_path, "cifar10")
    path.write_bytes(path.read_bytes()[:200])
    damaged = re.escape(str(path)) + " is damaged or not a CIFAR-10"
    with pytest.raises(DatasetFileError, match=damaged):
        load_dataset("cifar10", data_dir=os.fspath(tmp_path))


def test_missing_folder_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    folder, _ = write_folder(tmp_path, "cifar100")
    (folder / "test").unlink()
    with pytest.raises(ValueError, match="missing " + re.escape(str(folder / "test"))):
        load_dataset("cifar100", data_dir=os.fspath(tmp_path))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({b"data": np.zeros((2, 3071), np.uint8)}, r"uint8 image rows of shape \(N, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.float32)}, r"uint8 image rows of shape \(N, 3072\)"),
        ({b"labels": [1, 2, 3]}, r"one integer b'labels' per image \(2\)"),
        ({b"labels": None}, "one integer b'labels' per image"),
    ],
)
def test_badly_shaped_batch_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict, problem: str
):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    folder, _ = write_folder(tmp_path, "cifar10")
    bad = folder / "data_batch_1"
    batch = pickle.loads(bad.read_bytes(), encoding="bytes") | change
    bad.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*" + problem):
        load_dataset("cifar10", data_dir=os.fspath(folder))


def test_batch_without_labels_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    path, _ = write_tarball(tmp_path, "cifar100")
    # A CIFAR-10 batch has b"labels", not the b"fine_labels" CIFAR-100 needs.
    contents, _ = _batches("cifar10", seed=0)
    with tarfile.open(path, "w:gz") as archive:
        for file, data in (("train", contents["data_batch_1"]), ("test", contents["test_batch"])):
            member = tarfile.TarInfo(f"cifar-100-python/{file}")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    with pytest.raises(
        ValueError, match=re.escape(f"{path} member cifar-100-python/train") + ".*b'fine_labels'"
    ):
        load_dataset("cifar100", data_dir=os.fspath(path))


def _load_missing(name: str, data_dir: str | None) -> str:
    """Loads a dataset that exists nowhere; returns the error message."""
    start = time.monotonic()
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset(name, data_dir=data_dir)
    assert time.monotonic() - start < NOT_FOUND_SECONDS
    return str(caught.value)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_data_lists_places_and_remedies(no_local_copies: Path, name: str):
    message = _load_missing(name, os.fspath(no_local_copies))
    assert f"{no_local_copies} (data_dir): no {TARBALLS[name]}, {FOLDERS[name]}/" in message
    env_dir = os.environ[mnist.DATA_DIR_ENV]
    assert f"{env_dir} (${mnist.DATA_DIR_ENV}): no {TARBALLS[name]}" in message
    assert f"tfds:{name} in {no_local_copies}" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message and "--data_dir" in message
    assert f"tfds build {name} --file_format=array_record" in message
    assert f'synthetic_like="{name}"' in message
    assert not list(no_local_copies.iterdir()), "nothing may be written while searching"


def test_missing_data_reports_a_data_dir_that_does_not_exist(no_local_copies: Path):
    missing = no_local_copies / "nowhere"
    message = _load_missing("cifar10", os.fspath(missing))
    assert message.startswith(f"data_dir {missing} does not exist; pass the directory")
    assert not missing.exists()


def test_missing_data_without_data_dir_searches_tfds_default(
    no_local_copies: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(tfds_constants, "DATA_DIR", os.fspath(no_local_copies))
    monkeypatch.delenv(mnist.DATA_DIR_ENV)
    message = _load_missing("cifar100", None)
    assert f"tfds:cifar100 in {no_local_copies}" in message
    assert f"data_dir and ${mnist.DATA_DIR_ENV} not set" in message


def test_tfds_cifar100_label_is_the_fine_label():
    features = tfds.builder_cls("cifar100")(data_dir="/nonexistent").info.features
    assert features["label"].num_classes == 100
    assert features["coarse_label"].num_classes == 20
    assert features["image"].shape == (32, 32, 3)




@pytest.mark.usefixtures("getitems_by_index")
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_reads_mocked_tfds_data(no_local_copies: Path, name: str):
    with tfds.testing.mock_data(num_examples=9, policy=tfds.testing.MockPolicy.USE_CODE):
        dataset = load_dataset(name, data_dir=os.fspath(no_local_copies))
        capped = load_dataset(name, data_dir=os.fspath(no_local_copies), num_train=4, num_test=2)
    assert dataset.source == f"tfds:{name}"
    assert dataset.num_classes == NUM_CLASSES[name]
    assert dataset.train_images.shape == (9, 32, 32, 3)
    assert dataset.test_images.shape == (9, 32, 32, 3)
    assert dataset.train_images.dtype == np.float32 and dataset.train_labels.dtype == np.int32
    assert 0.0 <= dataset.train_images.min() and dataset.train_images.max() <= 1.0
    assert capped.num_train == 4 and capped.num_test == 2
    np.testing.assert_array_equal(capped.train_images, dataset.train_images[:4])
    np.testing.assert_array_equal(capped.test_labels, dataset.test_labels[:2])


def test_unknown_name_lists_cifar():
    assert {"cifar10", "cifar100"} <= set(DATASETS)
    with pytest.raises(ValueError, match="'cifar-10'.*cifar10, cifar100, fashion_mnist, mnist"):
        load_dataset("cifar-10")


@pytest.mark.parametrize(("like", "num_classes"), [("cifar10", 10), ("cifar100", 100)])
def test_synthetic_like_cifar(like: str, num_classes: int):
    dataset = load_dataset("synthetic", synthetic_like=like, num_train=20, num_test=10)
    assert dataset.source == "synthetic" and dataset.num_classes == num_classes
    assert dataset.train_images.shape == (20, 32, 32, 3)
    assert dataset.test_images.shape == (10, 32, 32, 3)
