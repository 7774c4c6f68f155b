"""Training-step time of each method relative to the dense step, same model and batch.

    python -m benchmarks.step_time --model=lenet5 --batch_size=100 --methods=dense,l0_hc,l0_arm,l0_ar

Each method's jitted step is compiled once, then timed over several repeats of ``steps`` steps on
random MNIST-shaped batches already on the device (dispatch included); the table gives the median
milliseconds per step and the ratio to ``dense``.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.methods import create_method
from sparsejax.models import build_model
from sparsejax.train.sharding import create_mesh, replicate
from sparsejax.train.state import init_state
from sparsejax.train.step import make_train_step

_MODEL = flags.DEFINE_string("model", "lenet5", "Model name.")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Batch size.")
_METHODS = flags.DEFINE_list("methods", ["dense", "l0_hc", "l0_arm", "l0_ar"], "Methods to time.")
_STEPS = flags.DEFINE_integer("steps", 50, "Steps per timed chunk.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed chunks per method (median reported).")


def time_method(name: str, model_name: str, batch_size: int, steps: int, repeats: int) -> float:
    """Median seconds per training step of ``name``."""
    config = get_config()
    config.method, config.model = name, model_name
    num_train = 60000
    method = create_method(name, config, num_train=num_train)
    model = build_model(model_name, rngs=nnx.Rngs(0), gate_factory=method.make_gate)
    method.prepare_model(model)
    tx = method.optimizer(steps_per_epoch=100, epochs=1)
    mesh = create_mesh()
    graphdef, state = init_state(model, tx, jax.random.key(0))
    state = replicate(state, mesh)
    train_step = make_train_step(graphdef, method, tx, mesh)
    images = jax.random.uniform(jax.random.key(1), (steps, batch_size, 28, 28, 1))
    labels = jnp.arange(steps * batch_size, dtype=jnp.int32).reshape(steps, batch_size) % 10
    state, metrics = train_step(state, images[0], labels[0])
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for index in range(steps):
            state, metrics = train_step(state, images[index], labels[index])
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - started) / steps)
    return statistics.median(times)


def main(argv: list[str]) -> None:
    del argv
    results = {
        name: time_method(name, _MODEL.value, _BATCH.value, _STEPS.value, _REPEATS.value)
        for name in _METHODS.value
    }
    base = results.get("dense")
    print(f"model={_MODEL.value} batch={_BATCH.value} backend={jax.default_backend()} "
          f"devices={jax.devices()}")
    print("| method | ms / step | vs dense |")
    print("|---|---|---|")
    for name, seconds in results.items():
        ratio = f"{seconds / base:.2f}x" if base else "-"
        print(f"| {name} | {1000 * seconds:.2f} | {ratio} |")


if __name__ == "__main__":
    app.run(main)
