"""Arrays in shared memory: pickled by name, attached (not copied) by worker processes."""

import gc
import multiprocessing
import operator
import pickle
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import shared_memory

import numpy as np
import pytest

from sparsejax.data.arrays import ArrayDataset
from sparsejax.data.shared import SharedArrays
from sparsejax.data.sources import ArraySource

MIB = 1 << 20


def spawned_worker() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def test_a_worker_process_attaches_to_the_arrays_instead_of_copying_them():
    images = np.random.default_rng(0).random((64, 32, 32, 4), dtype=np.float32)  # 1 MiB
    shared = SharedArrays({"images": images, "empty": np.zeros((0, 3), np.int32)})
    pickled = pickle.dumps(shared)
    assert len(pickled) < 1000
    np.testing.assert_array_equal(shared.arrays["images"], images)
    assert not shared.arrays["images"].flags.writeable
    with spawned_worker() as worker:
        seen = worker.submit(operator.attrgetter("arrays"), shared).result()
    np.testing.assert_array_equal(seen["images"], images)
    assert seen["empty"].shape == (0, 3)


def test_the_blocks_are_unlinked_when_the_arrays_are_collected():
    shared = SharedArrays({"a": np.arange(10)})
    names = list(shared.__getstate__()["names"].values())
    view = shared.arrays["a"]
    del shared
    gc.collect()
    np.testing.assert_array_equal(view, np.arange(10))  # still mapped while viewed
    for name in names:
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=name)


def test_a_pickled_array_source_holds_names_and_reads_the_same_batches():
    rng = np.random.default_rng(1)
    data = ArrayDataset(
        name="mnist",
        train_images=rng.random((2048, 28, 28, 1), dtype=np.float32),  # 6 MiB
        train_labels=(np.arange(2048) % 10).astype(np.int32),
        test_images=rng.random((16, 28, 28, 1), dtype=np.float32),
        test_labels=(np.arange(16) % 10).astype(np.int32),
        num_classes=10,
        source="memory",
    )
    source = ArraySource(data, augment="crop_flip", normalize_channels=True)
    pickled = pickle.dumps(source)
    assert len(pickled) < MIB // 8
    assert len(pickle.dumps(source)) == len(pickled)  # shared once
    indices = np.array([2047, 5, 5])
    expected = source.train_batch(indices, np.random.default_rng(2))
    np.testing.assert_array_equal(source.data.train_images, data.train_images)
    with spawned_worker() as worker:
        batch = worker.submit(
            ArraySource.train_batch, source, indices, np.random.default_rng(2)
        ).result()
    for got, want in zip(batch, expected, strict=True):
        np.testing.assert_array_equal(got, want)
