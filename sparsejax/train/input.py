"""Minibatches of an in-memory dataset, as global arrays sharded over the mesh.

The order of an epoch is ``permutation(fold_in(key, epoch))`` of the training set, the same on
every process; each process gathers only its own slice of every global batch from host memory, so
the position in the data is the step number and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from sparsejax.data import ArrayDataset
from sparsejax.train.sharding import check_batch_size, global_batch, process_slice


class InMemoryInput:
    """Training batches by (epoch, index) and padded evaluation batches of ``data``."""

    def __init__(
        self,
        data: ArrayDataset,
        mesh: Mesh,
        *,
        batch_size: int,
        eval_batch_size: int,
        steps_per_epoch: int,
        key: jax.Array,
    ):
        check_batch_size(batch_size, mesh)
        check_batch_size(eval_batch_size, mesh, "eval_batch_size")
        self.data, self.mesh, self.key = data, mesh, key
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.steps_per_epoch = steps_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global example indices of every batch of ``epoch``: ``(steps_per_epoch, batch_size)``."""
        order = np.asarray(
            jax.random.permutation(jax.random.fold_in(self.key, epoch), self.data.num_train)
        )
        used = self.steps_per_epoch * self.batch_size
        return order[:used].reshape(self.steps_per_epoch, self.batch_size)

    def train_batch(self, order: np.ndarray, index: int) -> tuple[jax.Array, jax.Array]:
        """Images and labels of batch ``index`` of an epoch's ``order``."""
        local = order[index][process_slice(self.batch_size)]
        return global_batch(self.mesh, self.data.train_images[local], self.data.train_labels[local])

    def eval_batches(self) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
        """The test set in batches of ``eval_batch_size``: images, labels and a validity mask
        (the last batch is padded)."""
        count, size = self.data.num_test, self.eval_batch_size
        for start in range(0, count, size):
            index = np.arange(start, start + size)
            valid = index < count
            local = process_slice(size)
            index, valid = np.minimum(index, count - 1)[local], valid[local]
            yield global_batch(
                self.mesh, self.data.test_images[index], self.data.test_labels[index], valid
            )
