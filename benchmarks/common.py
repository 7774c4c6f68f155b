"""Pieces shared by the benchmarks: timing one method's jitted training step."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.data.synthetic import SYNTHETIC_LIKE
from sparsejax.methods import RunInfo, create_method
from sparsejax.models import build_model
from sparsejax.train.sharding import batch_sharded, create_mesh, replicate
from sparsejax.train.state import init_state
from sparsejax.train.step import make_train_step

IMAGENET_MODELS = ("resnet50", "mobilenet_v2")
MNIST_MODELS = ("mlp", "lenet5")


def dataset_like(model_name: str) -> str:
    """The dataset whose shapes ``model_name`` is usually trained on."""
    if model_name in MNIST_MODELS:
        return "fashion_mnist"
    return "imagenet2012" if model_name in IMAGENET_MODELS else "cifar10"


def make_steps(
    name: str, model_name: str, batch_size: int, steps: int, like: str
) -> Callable[[], None]:
    """A function that runs ``steps`` training steps of method ``name`` (compiled, on random
    batches already on the devices, sharded over them, shaped like dataset ``like``) and waits
    for the last."""
    config = get_config()
    config.method, config.model = name, model_name
    spec = SYNTHETIC_LIKE[like]
    num_train = 60000
    method = create_method(name, config, RunInfo(num_train=num_train, steps_per_epoch=100))
    model = build_model(
        model_name, rngs=nnx.Rngs(0), gate_factory=method.make_gates,
        input_shape=spec.image_shape, num_classes=spec.num_classes,
    )
    method_state = method.init(model)
    tx = method.optimizer()
    mesh = create_mesh()
    graphdef, state = init_state(model, method_state, tx, jax.random.key(0))
    state = replicate(state, mesh)
    train_step = make_train_step(graphdef, method, tx, mesh)
    images = jax.random.uniform(jax.random.key(1), (steps, batch_size, *spec.image_shape))
    labels = jnp.arange(steps * batch_size, dtype=jnp.int32).reshape(steps, batch_size)
    labels = labels % spec.num_classes
    sharding = batch_sharded(mesh)
    batches = [jax.device_put((images[index], labels[index]), sharding) for index in range(steps)]
    state, metrics = train_step(state, *batches[0])
    jax.block_until_ready(metrics)

    def run() -> None:
        nonlocal state
        for batch in batches:
            state, metrics = train_step(state, *batch)
        jax.block_until_ready(metrics)

    return run


def seconds_per_step(run: Callable[[], None], steps: int) -> float:
    """Wall-clock seconds per step of one call of ``run`` (which runs ``steps`` steps)."""
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) / steps


def time_method(
    name: str, model_name: str, batch_size: int, steps: int, repeats: int, like: str
) -> float:
    """Median seconds per training step of ``name``."""
    run = make_steps(name, model_name, batch_size, steps, like)
    return statistics.median(seconds_per_step(run, steps) for _ in range(repeats))
