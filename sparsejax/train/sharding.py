"""Data parallelism, optionally with sharded parameters (FSDP), with ``jax.jit`` over a
two-axis device mesh ``(data, fsdp)``.

A batch is sharded over both axes (``P(("data", "fsdp"))``: every device holds its own examples).
With ``fsdp`` = 1 (the default) the ``fsdp`` axis has size 1 and everything in the train state is
replicated (``P()``): plain data parallelism, where XLA inserts the gradient all-reduce. With
``fsdp`` = n > 1 each parameter, optimizer-state and parameter-average leaf is split n ways along
one axis (:func:`leaf_sharding`) over the ``fsdp`` axis, and XLA gathers a layer's weights where
the step uses them and reduce-scatters its gradient; method state, BatchNorm statistics, the step
and the key stay replicated. BatchNorm statistics are global-batch statistics either way. The
same code runs on one CPU, several GPUs or a multi-host TPU pod: every process builds its part of
a global batch from its own examples with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sparsejax.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MIN_SHARDED_SIZE = 4096
"""Leaves of fewer elements stay replicated under FSDP: splitting them saves little memory and
adds a collective per leaf (biases, gate parameters, scalars)."""


def create_mesh(fsdp: int = 1) -> Mesh:
    """A mesh of every device (of every process): ``(devices / fsdp, fsdp)`` along the
    ``(data, fsdp)`` axes.

    Raises:
      ConfigError: unless ``fsdp`` is a positive divisor of the device count.
    """
    devices = jax.device_count()
    if not isinstance(fsdp, int) or fsdp < 1 or devices % fsdp:
        divisors = [d for d in range(1, devices + 1) if devices % d == 0]
        raise ConfigError(
            f"fsdp={fsdp} does not divide the {devices} devices: the fsdp size must be one of "
            f"{divisors} (1: parameters replicated)"
        )
    return jax.make_mesh(
        (devices // fsdp, fsdp), (DATA_AXIS, FSDP_AXIS), axis_types=(AxisType.Auto,) * 2
    )


def fsdp_size(mesh: Mesh) -> int:
    """The number of devices a sharded parameter is split over (1: none is)."""
    return dict(mesh.shape).get(FSDP_AXIS, 1)


def leaf_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """The sharding of a parameter-shaped leaf: split over the ``fsdp`` axis along its largest
    axis whose length the fsdp size divides (the first such axis on a tie), or replicated when
    the fsdp size is 1, the leaf has fewer than :data:`MIN_SHARDED_SIZE` elements or no axis
    divides."""
    size = fsdp_size(mesh)
    divisible = [axis for axis, length in enumerate(shape) if length % size == 0]
    if size == 1 or math.prod(shape) < MIN_SHARDED_SIZE or not divisible:
        return replicated(mesh)
    axis = max(divisible, key=lambda a: (shape[a], -a))
    spec = [None] * len(shape)
    spec[axis] = FSDP_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """The shardings of a train state (a pytree like ``state``): parameters, optimizer state and
    parameter average by :func:`leaf_sharding`, everything else replicated."""
    by_shape = lambda tree: jax.tree.map(lambda a: leaf_sharding(np.shape(a), mesh), tree)  # noqa: E731
    shardings = jax.tree.map(lambda _: replicated(mesh), state)
    return shardings.replace(
        params=by_shape(state.params),
        opt_state=by_shape(state.opt_state),
        ema_params=by_shape(state.ema_params),
    )


def place_state(state: Any, mesh: Mesh) -> Any:
    """``state`` (identical on every process) placed on the mesh with :func:`state_shardings`;
    with an fsdp size of 1 the same as :func:`replicate`."""
    if fsdp_size(mesh) == 1:
        return replicate(state, mesh)
    return jax.tree.map(_place, state, state_shardings(state, mesh))


def place_like_params(tree: Any, mesh: Mesh) -> Any:
    """A pytree of parameter-shaped leaves (parameters, optimizer state) placed on the mesh with
    :func:`leaf_sharding`; with an fsdp size of 1 the same as :func:`replicate`."""
    if fsdp_size(mesh) == 1:
        return replicate(tree, mesh)
    return jax.tree.map(lambda a: _place(a, leaf_sharding(np.shape(a), mesh)), tree)


def _place(a: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return jax.device_put(a, sharding)  # already global: reshard
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """A batch's examples split over every device: over all the mesh's axes."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def block_sharded(mesh: Mesh) -> NamedSharding:
    """Several batches stacked along a first axis: each batch's examples split over every
    device, as :func:`batch_sharded` splits one."""
    return NamedSharding(mesh, PartitionSpec(None, tuple(mesh.axis_names)))


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


def global_block(mesh: Mesh, batches: Sequence[tuple[np.ndarray, ...]]) -> tuple[jax.Array, ...]:
    """Several global batches as one array per field, stacked along a new first axis and
    sharded over ``data`` along the second (the examples), from this process's parts of each
    batch, in order."""
    sharding = block_sharded(mesh)
    return tuple(
        jax.make_array_from_process_local_data(sharding, np.stack(field))
        for field in zip(*batches, strict=True)
    )


def local_copy(tree: Any) -> Any:
    """Single-device copies of the arrays of ``tree``, readable on every process (a global array
    spanning other processes' devices cannot be fetched as a whole). A replicated array is its
    first local replica; a sharded one is gathered (on many processes a collective: every
    process must call this with the same tree)."""
    return jax.tree.map(_local, tree)


def _local(a: Any) -> Any:
    if not isinstance(a, jax.Array) or a.is_fully_replicated:
        return a.addressable_data(0) if isinstance(a, jax.Array) else a
    device = jax.local_devices()[0]
    if a.is_fully_addressable:
        return jax.device_put(a, device)
    return jax.device_put(multihost_utils.process_allgather(a, tiled=True), device)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree of arrays (identical on every process) replicated on every device of the
    mesh, including the devices of other processes."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree
    )
