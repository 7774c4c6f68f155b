"""Image-classification datasets held in memory as NumPy arrays: the MNIST family (IDX files),
CIFAR-10/100 (the python distribution, tarball or extracted), prepared tfds data of either, and
synthetic data of the same shapes.

``load_dataset(name)`` returns an :class:`ArrayDataset` with float32 NHWC images in [0, 1] and
int32 labels; :func:`read_idx` reads the IDX files MNIST-family datasets are distributed in.
"""

from sparsejax.data.arrays import ArrayDataset
from sparsejax.data.errors import DatasetNotFoundError
from sparsejax.data.idx import read_idx
from sparsejax.data.load import DATASETS, load_dataset

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetNotFoundError",
    "load_dataset",
    "read_idx",
]
