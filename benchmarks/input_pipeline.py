"""Examples per second of the input pipeline alone, next to what a model's training step consumes.

    python -m benchmarks.input_pipeline --model=resnet56 --batch_size=128

The pipeline reads CIFAR-shaped synthetic data held in memory through the CIFAR augmentation
(pad-4 random crop, flip, per-channel normalisation) into global device arrays, exactly as a
training run does, over ``--threads`` reader threads (or ``--workers`` processes). The dense
training step of ``--model`` is timed in the same run; the ratio is pipeline over model.
"""

from __future__ import annotations

import statistics
import time

import jax
from absl import app, flags

from benchmarks.common import time_method
from sparsejax.data import load_dataset
from sparsejax.data.sources import ArraySource
from sparsejax.train.input import DEFAULT_THREADS, Input
from sparsejax.train.sharding import create_mesh

_MODEL = flags.DEFINE_string("model", "resnet56", "Model whose dense step is timed.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 100, "Batches per timed repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
_THREADS = flags.DEFINE_integer("threads", DEFAULT_THREADS, "Reader threads.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Reader processes (0: threads only).")
LIKE = "cifar10"


def pipeline_seconds_per_batch() -> float:
    """Median seconds per global batch delivered by the pipeline."""
    data = load_dataset("synthetic", synthetic_like=LIKE, num_train=10_000, num_test=100)
    source = ArraySource(data, augment="crop_flip", normalize_channels=True)
    steps = data.num_train // _BATCH.value
    inputs = Input(
        source, create_mesh(), batch_size=_BATCH.value, eval_batch_size=100,
        steps_per_epoch=steps, threads=_THREADS.value, workers=_WORKERS.value,
    )
    times = []
    for repeat in range(_REPEATS.value + 1):
        started = time.perf_counter()
        start = repeat * _STEPS.value
        for images, _ in inputs.train_batches(start, start + _STEPS.value):
            jax.block_until_ready(images)
        if repeat:  # the first repeat warms the reader up
            times.append((time.perf_counter() - started) / _STEPS.value)
    return statistics.median(times)


def main(argv: list[str]) -> None:
    del argv
    pipeline = pipeline_seconds_per_batch()
    model = time_method("dense", _MODEL.value, _BATCH.value, 10, _REPEATS.value, LIKE)
    print(f"batch={_BATCH.value} threads={_THREADS.value} workers={_WORKERS.value} "
          f"backend={jax.default_backend()} cpus={jax.local_device_count()}")
    print("| what | examples / s |")
    print("|---|---|")
    print(f"| input pipeline | {_BATCH.value / pipeline:.0f} |")
    print(f"| {_MODEL.value} dense training step | {_BATCH.value / model:.0f} |")
    print(f"| pipeline / model | {model / pipeline:.1f}x |")


if __name__ == "__main__":
    app.run(main)
