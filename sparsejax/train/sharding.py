"""Data parallelism with ``jax.jit`` over a one-axis device mesh.

Parameters, optimizer state and everything else in the train state are replicated
(``P()``); a batch is sharded over the ``data`` axis (``P("data")``). XLA inserts the gradient
all-reduce, and BatchNorm statistics are global-batch statistics. The same code runs on one CPU,
several GPUs or a multi-host TPU pod: every process builds its part of a global batch from its
own examples with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sparsejax.errors import ConfigError

DATA_AXIS = "data"


def create_mesh() -> Mesh:
    """A mesh of every device (of every process) along the ``data`` axis."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> int:
    """The per-process share of a global batch; an error unless it splits evenly over devices."""
    devices = mesh.devices.size
    if batch_size % devices:
        raise ConfigError(
            f"{what}={batch_size} is not divisible by the {devices} devices "
            f"({jax.process_count()} processes): the batch size must be a multiple of the "
            f"device count; use a multiple of {devices}"
        )
    return batch_size // jax.process_count()


def process_slice(global_size: int) -> slice:
    """This process's contiguous part of a global batch of ``global_size`` examples."""
    local = global_size // jax.process_count()
    start = jax.process_index() * local
    return slice(start, start + local)


def global_batch(mesh: Mesh, *local_arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Global arrays sharded over ``data`` from this process's parts."""
    sharding = batch_sharded(mesh)
    return tuple(jax.make_array_from_process_local_data(sharding, a) for a in local_arrays)


def local_copy(tree: Any) -> Any:
    """Single-device copies of the replicated arrays of ``tree``, readable on every process
    (a global array spanning other processes' devices cannot be fetched as a whole)."""
    return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree of arrays (identical on every process) replicated on every device of the
    mesh, including the devices of other processes."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree
    )
