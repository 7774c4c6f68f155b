"""Minibatches of an in-memory dataset, as global arrays sharded over the mesh.

The order of an epoch is ``permutation(fold_in(key, epoch))`` of the training set, the same on
every process; each process gathers only its own slice of every global batch from host memory.
Training augmentation draws from a NumPy generator seeded by (seed, epoch, batch, process), so the
position in the data is the step number and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from sparsejax.data import ArrayDataset
from sparsejax.data.augment import channel_statistics, crop_flip, normalize
from sparsejax.train.sharding import check_batch_size, global_batch, process_slice

Augmentation = Callable[[np.ndarray, np.random.Generator], np.ndarray]
AUGMENTATIONS: dict[str, Augmentation | None] = {"none": None, "crop_flip": crop_flip}


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
        seed: int = 0,
        augment: str = "none",
        normalize_channels: bool = False,
    ):
        check_batch_size(batch_size, mesh)
        check_batch_size(eval_batch_size, mesh, "eval_batch_size")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {tuple(AUGMENTATIONS)}, got {augment!r}")
        self.data, self.mesh, self.key, self.seed = data, mesh, key, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.steps_per_epoch = steps_per_epoch
        self.augment = AUGMENTATIONS[augment]
        self.statistics = channel_statistics(data.train_images) if normalize_channels else None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global example indices of every batch of ``epoch``: ``(steps_per_epoch, batch_size)``."""
        order = np.asarray(
            jax.random.permutation(jax.random.fold_in(self.key, epoch), self.data.num_train)
        )
        used = self.steps_per_epoch * self.batch_size
        return order[:used].reshape(self.steps_per_epoch, self.batch_size)

    def _prepare(self, images: np.ndarray) -> np.ndarray:
        return images if self.statistics is None else normalize(images, *self.statistics)

    def train_batch(
        self, epoch: int, order: np.ndarray, index: int
    ) -> tuple[jax.Array, jax.Array]:
        """Images (augmented, normalised) and labels of batch ``index`` of an epoch's ``order``."""
        local = order[index][process_slice(self.batch_size)]
        images = self.data.train_images[local]
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, index, jax.process_index()])
            images = self.augment(images, rng)
        return global_batch(self.mesh, self._prepare(images), self.data.train_labels[local])

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
                self.mesh, self._prepare(self.data.test_images[index]),
                self.data.test_labels[index], valid,
            )
