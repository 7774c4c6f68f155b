"""The cost of sealing checkpoints with a content digest, on a ResNet-50-sized train state.

    python -m benchmarks.checkpoint_digest

1. The checkpoint of a ``--method`` ResNet-50 train state (parameters, gates, BatchNorm
   statistics, optimizer state, drawn at random): bytes, the Orbax save, the SHA-256 digest written after it and
   the verification before a restore; medians over ``--repeats``.
2. Whether hashing stalls training: the median time of a jitted training step (``--step_model``,
   batch ``--step_batch``) alone and while the digest of that checkpoint is being written in a
   background thread, as the training loop does after every save.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx

from benchmarks.common import dataset_like
from experiments.configs.mnist import get_config
from sparsejax.data.synthetic import SYNTHETIC_LIKE
from sparsejax.methods import RunInfo, create_method
from sparsejax.structure.traced_model import build_zoo_model
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.digest import verify_digest, write_digest
from sparsejax.train.sharding import create_mesh, replicate
from sparsejax.train.state import init_state
from sparsejax.train.step import make_train_step

_METHOD = flags.DEFINE_string("method", "l0_hc", "Method whose train state is saved.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
_STEP_MODEL = flags.DEFINE_string("step_model", "lenet5", "Model of the training step timed.")
_STEP_BATCH = flags.DEFINE_integer("step_batch", 100, "Batch of the training step timed.")
_STEPS = flags.DEFINE_integer("steps", 20, "Steps per timed repeat.")


def train_state(model_name: str):
    """graphdef, method, optimizer and replicated initial train state of ``model_name``."""
    config = get_config()
    config.method, config.model = _METHOD.value, model_name
    spec = SYNTHETIC_LIKE[dataset_like(model_name)]
    method = create_method(_METHOD.value, config, RunInfo(num_train=60000, steps_per_epoch=100))
    model = build_zoo_model(
        model_name, rngs=nnx.Rngs(0), gate_factory=method.make_gates,
        input_shape=spec.image_shape, num_classes=spec.num_classes,
    )
    method_state = method.init(model)
    tx = method.optimizer()
    graphdef, state = init_state(model, method_state, tx, jax.random.key(0))
    return graphdef, method, tx, replicate(state, create_mesh()), spec


def checkpoint_costs(workdir: Path) -> dict:
    """Bytes, save, digest and verification seconds (medians) of the ResNet-50 state, its
    floating-point leaves drawn at random as in a trained state (zeros would compress)."""
    _, _, _, state, _ = train_state("resnet50")
    state = jax.tree.map(
        lambda leaf: jax.random.normal(jax.random.key(leaf.size), leaf.shape, leaf.dtype)
        if jnp.issubdtype(leaf.dtype, jnp.floating)
        else leaf,
        state,
    )
    checkpointer = Checkpointer(workdir, max_to_keep=1)
    save, digest, verify = [], [], []
    for step in range(1, _REPEATS.value + 1):
        started = time.perf_counter()
        checkpointer.save(step, state, {"epoch": step})
        save.append(time.perf_counter() - started)
        started = time.perf_counter()
        checkpointer.wait_for_digest()
        digest.append(time.perf_counter() - started)
        started = time.perf_counter()
        assert verify_digest(checkpointer.step_directory(step)) is None
        verify.append(time.perf_counter() - started)
    directory = checkpointer.step_directory(_REPEATS.value)
    checkpointer.close()
    return {
        "directory": directory,
        "bytes": sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()),
        "save": statistics.median(save),
        "digest": statistics.median(digest),
        "verify": statistics.median(verify),
    }


def step_times(directory: Path) -> tuple[float, float]:
    """Median seconds of a training step alone and while ``directory`` is being hashed."""
    graphdef, method, tx, state, spec = train_state(_STEP_MODEL.value)
    step = make_train_step(graphdef, method, tx, create_mesh())
    images = jax.random.uniform(jax.random.key(1), (_STEP_BATCH.value, *spec.image_shape))
    labels = jnp.arange(_STEP_BATCH.value, dtype=jnp.int32) % spec.num_classes
    state, metrics = step(state, images, labels)
    jax.block_until_ready(metrics)

    def timed_steps(count: int) -> list[float]:
        nonlocal state
        times = []
        for _ in range(count):
            started = time.perf_counter()
            state, metrics = step(state, images, labels)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - started)
        return times

    alone = [t for _ in range(_REPEATS.value) for t in timed_steps(_STEPS.value)]
    hashing = threading.Event()

    def hash_repeatedly() -> None:
        while not hashing.is_set():
            write_digest(directory)

    hasher = threading.Thread(target=hash_repeatedly)
    hasher.start()
    try:
        during = [t for _ in range(_REPEATS.value) for t in timed_steps(_STEPS.value)]
    finally:
        hashing.set()
        hasher.join()
    return statistics.median(alone), statistics.median(during)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.ERROR)
    with tempfile.TemporaryDirectory() as workdir:
        costs = checkpoint_costs(Path(workdir))
        alone, during = step_times(costs["directory"])
    megabytes = costs["bytes"] / 1e6
    print(f"{_METHOD.value} ResNet-50 train state, backend {jax.default_backend()}, "
          f"{jax.device_count()} device(s)")
    print("| checkpoint | MB | save | digest | digest MB/s | verify |")
    print("|---|---|---|---|---|---|")
    print(f"| resnet50 | {megabytes:.0f} | {costs['save']:.2f} s | {costs['digest']:.2f} s "
          f"| {megabytes / costs['digest']:.0f} | {costs['verify']:.2f} s |")
    print()
    print(f"| {_STEP_MODEL.value} step, batch {_STEP_BATCH.value} | ms |")
    print("|---|---|")
    print(f"| alone | {1000 * alone:.1f} |")
    print(f"| while a digest is written | {1000 * during:.1f} ({during / alone:.2f}x) |")


if __name__ == "__main__":
    app.run(main)
