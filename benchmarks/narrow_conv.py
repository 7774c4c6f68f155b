"""Time of each 3x3 convolution of a slimmed CIFAR ResNet-56 block against the full-width one.

    python -m benchmarks.narrow_conv --batch_size=256

For every stage (32x32 maps with 16 channels, 16x16 with 32, 8x8 with 64) and its pruning ratio
in ``--stage_pr`` (GReg's ResNet-56 setting by default), a block's first convolution goes from
``width -> width`` to ``width -> kept`` and its second from ``width -> width`` to
``kept -> width``. Each convolution is jitted alone and timed (median of ``--repeats``); the table
gives its time relative to the full-width convolution of its stage next to its FLOPs fraction,
and the kernel library XLA chose for it (its CPU backend hands a convolution to YNNPACK only
when one of its channel counts exceeds 16, otherwise to Eigen). Where the time fraction stays
well above the FLOPs fraction, slimming that layer saves FLOPs but little time:
:mod:`benchmarks.slim_inference` measures the effect on the whole network.
"""

from __future__ import annotations

import statistics
import time

import jax
from absl import app, flags

from sparsejax.methods.greg.accounting import greg_pruned_count

_BATCH = flags.DEFINE_integer("batch_size", 256, "Batch size.")
_STAGE_PR = flags.DEFINE_list("stage_pr", ["0.75", "0.75", "0.32"],
                              "Pruning ratio of each stage's first convolutions.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per convolution (median reported).")

STAGES = ((32, 16), (16, 32), (8, 64))
"""(map size, channels) of the three stages of a CIFAR ResNet."""


def convolve(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def library(x: jax.Array, kernel: jax.Array) -> str:
    """The kernel library of XLA's compiled convolution (CPU: YNNPACK or Eigen)."""
    if jax.default_backend() != "cpu":
        return jax.default_backend()
    compiled = jax.jit(convolve).lower(x, kernel).compile().as_text()
    return "YNNPACK" if "ynn" in compiled else "Eigen"


def milliseconds(size: int, c_in: int, c_out: int, batch: int, repeats: int) -> tuple[float, str]:
    """Median milliseconds of one ``c_in -> c_out`` 3x3 convolution on ``size``-square maps."""
    x = jax.random.normal(jax.random.key(0), (batch, size, size, c_in))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out))
    run = jax.jit(convolve)
    jax.block_until_ready(run(x, kernel))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(run(x, kernel))
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times), library(x, kernel)


def main(argv: list[str]) -> None:
    del argv
    ratios = [float(r) for r in _STAGE_PR.value]
    if len(ratios) != len(STAGES):
        raise app.UsageError(f"--stage_pr needs {len(STAGES)} ratios, got {_STAGE_PR.value}")
    print(f"batch={_BATCH.value} backend={jax.default_backend()} devices={jax.devices()}")
    print("| maps | convolution | ms | library | time / full width | FLOPs / full width |")
    print("|---|---|---|---|---|---|")
    for (size, width), ratio in zip(STAGES, ratios):
        kept = width - greg_pruned_count(ratio, width)
        full, full_library = milliseconds(size, width, width, _BATCH.value, _REPEATS.value)
        print(f"| {size}x{size} | {width} -> {width} | {full:.2f} | {full_library} | 1.00 | 1.00 |")
        for c_in, c_out in ((width, kept), (kept, width)):
            ms, used = milliseconds(size, c_in, c_out, _BATCH.value, _REPEATS.value)
            print(f"| {size}x{size} | {c_in} -> {c_out} | {ms:.2f} | {used} | {ms / full:.2f} | "
                  f"{kept / width:.2f} |")


if __name__ == "__main__":
    app.run(main)
