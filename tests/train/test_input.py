import subprocess
import sys

import numpy as np
import pytest

from sparsejax.data import ArrayDataset, load_dataset
from sparsejax.data.sources import ArraySource
from sparsejax.train.input import Input, usable_cpus
from sparsejax.train.sharding import create_mesh
from tests.commands import command_env

BATCH, STEPS = 16, 4


@pytest.fixture(scope="module")
def source():
    data = load_dataset("synthetic", synthetic_like="cifar10", num_train=70, num_test=37)
    return ArraySource(data, augment="crop_flip", normalize_channels=True)


def make_input(source, **kwargs):
    return Input(
        source, create_mesh(), batch_size=BATCH, eval_batch_size=10, steps_per_epoch=STEPS,
        seed=3, **kwargs,
    )


def as_numpy(batches):
    return [tuple(np.asarray(a) for a in batch) for batch in batches]


def test_batches_are_a_function_of_the_step(source):
    inputs = make_input(source)
    whole = as_numpy(inputs.train_batches(0, 3 * STEPS))
    resumed = as_numpy(inputs.train_batches(5, 3 * STEPS))
    assert len(whole) == 3 * STEPS and len(resumed) == 3 * STEPS - 5
    for (a_images, a_labels), (b_images, b_labels) in zip(whole[5:], resumed):
        np.testing.assert_array_equal(a_images, b_images)
        np.testing.assert_array_equal(a_labels, b_labels)
    assert whole[0][0].shape == (BATCH, 32, 32, 3) and whole[0][0].dtype == np.float32


def test_an_epoch_draws_distinct_examples_and_epochs_differ(source):
    batches = as_numpy(make_input(ArraySource(source.data)).train_batches(0, 2 * STEPS))
    images, labels = [b[0] for b in batches], [b[1] for b in batches]
    epoch0 = np.concatenate(images[:STEPS]).reshape(STEPS * BATCH, -1)
    assert len({row.tobytes() for row in epoch0}) == STEPS * BATCH  # no example twice
    assert not np.array_equal(np.concatenate(labels[:STEPS]), np.concatenate(labels[STEPS:]))
    train = np.asarray(source.data.train_images).reshape(source.num_train, -1)
    known = {row.tobytes() for row in train}
    assert all(row.tobytes() in known for row in epoch0)


def test_worker_processes_read_the_same_batches(source):
    threads = as_numpy(make_input(source).train_batches(2, 6))
    workers = as_numpy(make_input(source, workers=2).train_batches(2, 6))
    for (a, b), (c, d) in zip(threads, workers, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


def test_worker_processes_read_arrays_held_in_memory():
    rng = np.random.default_rng(4)
    data = ArrayDataset(
        name="cifar10",
        train_images=rng.random((70, 32, 32, 3), dtype=np.float32),
        train_labels=rng.integers(0, 10, 70).astype(np.int32),
        test_images=rng.random((5, 32, 32, 3), dtype=np.float32),
        test_labels=rng.integers(0, 10, 5).astype(np.int32),
        num_classes=10,
        source="memory",
    )
    threads = as_numpy(make_input(ArraySource(data, "crop_flip")).train_batches(0, 4))
    workers = as_numpy(make_input(ArraySource(data, "crop_flip"), workers=2).train_batches(0, 4))
    for (a, b), (c, d) in zip(threads, workers, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


def test_no_more_workers_than_cpu_cores(source):
    assert make_input(source, workers=1000).workers == usable_cpus()
    assert make_input(source, workers=1).workers == 1


def test_eval_batches_cover_the_test_set_once(source):
    batches = as_numpy(make_input(ArraySource(source.data)).eval_batches())
    assert len(batches) == 4  # 37 examples in batches of 10
    images = np.concatenate([b[0] for b in batches])
    valid = np.concatenate([b[2] for b in batches])
    assert valid.sum() == source.num_test and not valid[-3:].any()
    np.testing.assert_array_equal(images[valid], source.data.test_images)


def test_bad_settings_are_refused(source):
    with pytest.raises(ValueError, match="workers >= 0"):
        make_input(source, workers=-1)


def test_worker_processes_import_no_tensorboard():
    """A worker imports the run's main module and the readers, not tensorboardX (and torch)."""
    check = (
        "import sys, experiments.imagenet, sparsejax.train.input; "
        "print(sorted({'tensorboardX', 'torch'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
        env=command_env(),
    )
    assert result.stdout.strip() == "[]", result.stderr
