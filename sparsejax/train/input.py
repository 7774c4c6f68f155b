"""The input pipeline: a grain dataset of global training batches, indexed by the step.

Batch ``s`` of a run is a pure function of (seed, s): step s lies in epoch ``s // steps_per_epoch``,
whose example order is ``default_rng([seed, epoch]).permutation(num_train)``, and its augmentation
draws from ``default_rng([seed, epoch, index, process])``. The dataset is therefore a grain
``MapDataset`` over step numbers, and the iterator's position *is* the step the checkpoint holds:
a resumed run starts the same dataset at its restored step and reads exactly the batches an
uninterrupted run reads. Reading and augmentation run in ``num_threads`` threads, or in
``workers`` grain worker processes (ImageNet decoding), ahead of the training step. Workers end
with the process that started them, even when it is killed
(:func:`sparsejax.train.worker_lifetime.exit_with_parent`).

Every process reads only its own slice of each global batch (``process_slice``) and the slices
are assembled into one array sharded over the mesh's ``data`` axis.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh

from sparsejax.data.sources import Batch, BatchSource
from sparsejax.errors import ConfigError
from sparsejax.train.sharding import check_batch_size, global_batch, process_slice
from sparsejax.train.worker_lifetime import exit_with_parent

DEFAULT_THREADS = 4
DEFAULT_PREFETCH = 8
"""Batches read ahead of the training step."""


def usable_cpus() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def epoch_order(seed: int, epoch: int, num_train: int, steps: int, batch_size: int) -> np.ndarray:
    """Example indices of every batch of ``epoch``: ``(steps, batch_size)``."""
    order = np.random.default_rng([seed, epoch]).permutation(num_train)
    return order[: steps * batch_size].reshape(steps, batch_size)


class TrainBatchReader:
    """Reads this process's slice of the global batch of a step (a picklable grain map)."""

    def __init__(
        self,
        source: BatchSource,
        *,
        seed: int,
        steps_per_epoch: int,
        batch_size: int,
        local: slice,
        process: int,
    ):
        self.source, self.seed, self.local, self.process = source, seed, local, process
        self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
        self._cached: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        cached = self._cached
        if cached is None or cached[0] != epoch:
            order = epoch_order(
                self.seed, epoch, self.source.num_train, self.steps_per_epoch, self.batch_size
            )
            cached = self._cached = (epoch, order)
        return cached[1]

    def __call__(self, step: int) -> Batch:
        epoch, index = divmod(int(step), self.steps_per_epoch)
        indices = self._order(epoch)[index][self.local]
        rng = np.random.default_rng([self.seed, epoch, index, self.process])
        return self.source.train_batch(indices, rng)


class TestBatchReader:
    """Reads this process's slice of evaluation batch ``i`` (padded by repeating the last test
    example) and its validity mask (a picklable grain map)."""

    def __init__(self, source: BatchSource, *, batch_size: int, local: slice):
        self.source, self.batch_size, self.local = source, batch_size, local

    def __call__(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = self.source.num_test
        index = np.arange(batch * self.batch_size, (batch + 1) * self.batch_size)
        valid = index < count
        index, valid = np.minimum(index, count - 1)[self.local], valid[self.local]
        return (*self.source.test_batch(index), valid)


class Input:
    """Global training batches by step and padded evaluation batches of a :class:`BatchSource`.

    At most one worker process runs per usable CPU core (:func:`usable_cpus`): a worker decodes
    and augments on one core and holds its own copy of the program (some hundreds of MB), so more
    workers than cores cost memory and bring no speed. The batches do not depend on the count.
    """

    def __init__(
        self,
        source: BatchSource,
        mesh: Mesh,
        *,
        batch_size: int,
        eval_batch_size: int,
        steps_per_epoch: int,
        seed: int = 0,
        workers: int = 0,
        threads: int = DEFAULT_THREADS,
        prefetch: int = DEFAULT_PREFETCH,
    ):
        check_batch_size(batch_size, mesh)
        check_batch_size(eval_batch_size, mesh, "eval_batch_size")
        if workers < 0 or threads < 1 or prefetch < 1:
            raise ConfigError(
                f"need workers >= 0, threads >= 1 and prefetch >= 1; got workers={workers}, "
                f"threads={threads}, prefetch={prefetch}"
            )
        self.source, self.mesh, self.seed = source, mesh, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.steps_per_epoch = steps_per_epoch
        self.workers = min(workers, usable_cpus())
        self.threads, self.prefetch = threads, prefetch

    @property
    def num_test(self) -> int:
        return self.source.num_test

    def dataset(self, start_step: int, end_step: int) -> grain.IterDataset:
        """This process's batches of steps ``start_step .. end_step - 1`` (NumPy, in order)."""
        reader = TrainBatchReader(
            self.source,
            seed=self.seed,
            steps_per_epoch=self.steps_per_epoch,
            batch_size=self.batch_size,
            local=process_slice(self.batch_size),
            process=jax.process_index(),
        )
        dataset = grain.MapDataset.range(start_step, end_step).map(reader).to_iter_dataset(
            grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.prefetch)
        )
        if self.workers:
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.workers),
                worker_init_fn=functools.partial(exit_with_parent, os.getpid()),
            )
        return dataset

    def train_batches(self, start_step: int, end_step: int) -> Iterator[tuple[jax.Array, jax.Array]]:
        """Global batches of steps ``start_step .. end_step - 1``, sharded over the mesh."""
        for images, labels in self.dataset(start_step, end_step):
            yield global_batch(self.mesh, images, labels)

    def eval_batches(self) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
        """The test set in batches of ``eval_batch_size``: images, labels and a validity mask
        (the last batch is padded)."""
        reader = TestBatchReader(
            self.source, batch_size=self.eval_batch_size, local=process_slice(self.eval_batch_size)
        )
        batches = -(-self.source.num_test // self.eval_batch_size)
        dataset = grain.MapDataset.range(batches).map(reader).to_iter_dataset(
            grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.prefetch)
        )
        for arrays in dataset:
            yield global_batch(self.mesh, *arrays)
