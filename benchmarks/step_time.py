"""Training-step time of each method relative to the dense step, same model and batch.

    python -m benchmarks.step_time --model=lenet5 --batch_size=100 --methods=dense,l0_hc,l0_arm,l0_ar
    python -m benchmarks.step_time --model=resnet56 --batch_size=128 --methods=dense,l0_hc,l0_arm
    python -m benchmarks.step_time --model=lm_tiny --batch_size=32 \
        --methods=dense,l0_hc,l0_hc@target_params=0.5
    PYTHONPATH=examples python -m benchmarks.step_time --model=traced_model:small_cnn \
        --like=fashion_mnist --methods=dense,l0_hc,dep_l0,dep_l0_arm

Each method's jitted step is compiled once, then timed over several repeats of ``steps`` steps on
random batches already on the device (dispatch included, as many steps per call as a training
run makes: ``steps_per_dispatch``, which ``NAME@steps_per_dispatch=1`` sets), shaped like the
model's dataset (MNIST, CIFAR, ImageNet or byte sequences for ``lm_tiny``: ``--like``), the
methods in turn within each repeat so that a shared machine's load touches them alike; the
table gives the median milliseconds per step, training examples per second and the ratio of
each to ``dense``.
A method ``NAME@FIELD=VALUE`` overrides a numeric config field (a budget:
``l0_hc@target_flops=0.5``, whose Lagrangian counts the network every step). The process makes
the host settings of the entry points (:func:`sparsejax.host.configure`) first.

``--peak`` adds each step's FLOP/s (``benchmarks.common.step_flops``: 6 x the dense network's
multiply-accumulates x batch) and its fraction of the matmul peak measured in the same run (a
float32 ``PEAK_SIZE``-square ``jnp.dot`` at JAX's default precision, which on recent NVIDIA
GPUs is TF32): the model FLOPs utilisation against what a matmul reaches on that device.

``--loss_pass`` also times the dense network's training-mode loss alone, without a gradient
(:func:`benchmarks.common.make_loss_passes`), in turn with the steps: the extra network
evaluation that ARM's estimator makes every step. The row ``dense + loss pass`` adds it to the
dense step (what an ``l0_arm`` step costs when none of that pass runs beside the rest of the
step), and a line compares each method with it.
"""

from __future__ import annotations

from sparsejax import host

host.configure()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DENSE_AND_LOSS_PASS,
    FORWARD_FLOPS_PER_MAC,
    LOSS_PASS,
    PEAK_SIZE,
    STEP_FLOPS_PER_MAC,
    dataset_like,
    interleaved_medians,
    make_loss_passes,
    make_steps,
    matmul_peak,
    parse_method,
    step_flops,
)
from sparsejax.data.synthetic import SYNTHETIC_LIKE  # noqa: E402
from sparsejax.data.text import TEXT_DATASETS  # noqa: E402

ROW_FLOPS = {
    LOSS_PASS: FORWARD_FLOPS_PER_MAC / STEP_FLOPS_PER_MAC,
    DENSE_AND_LOSS_PASS: 1 + FORWARD_FLOPS_PER_MAC / STEP_FLOPS_PER_MAC,
}
"""The FLOPs of a row as a fraction of the dense training step's (``step_flops``), where they
differ from it: a method's step is counted as the dense step it trains (model FLOPs)."""

_MODEL = flags.DEFINE_string(
    "model", "lenet5", "Model name, or MODULE:FACTORY for a plain NNX model (traced)."
)
_BATCH = flags.DEFINE_integer("batch_size", 100, "Batch size.")
_METHODS = flags.DEFINE_list(
    "methods", ["dense", "l0_hc", "l0_arm", "l0_ar"],
    "Methods to time; NAME@FIELD=VALUE overrides a config field of that run (conv_chunks=N: "
    "the convolutions on N slices of the batch, 1 for the whole batch; conv_columns=0: XLA's "
    "input gradients for the sliced convolutions instead of columns).",
)
_STEPS = flags.DEFINE_integer("steps", 50, "Steps per timed chunk.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed chunks per method (median reported).")
_PEAK = flags.DEFINE_bool(
    "peak", False, "Also report GFLOP/s and the fraction of the measured matmul peak."
)
_LOSS_PASS = flags.DEFINE_bool(
    "loss_pass", False,
    "Also time the dense training-mode loss without a gradient (ARM's extra evaluation) and "
    "compare each method with a dense step plus that pass.",
)
_LIKE = flags.DEFINE_enum(
    "like", None, [*SYNTHETIC_LIKE, *TEXT_DATASETS],
    "Dataset shape (default: the model's usual dataset).",
)


def main(argv: list[str]) -> None:
    del argv
    like = _LIKE.value or dataset_like(_MODEL.value)
    runs = {}
    for spec in _METHODS.value:
        name, overrides = parse_method(spec)
        runs[spec] = make_steps(name, _MODEL.value, _BATCH.value, _STEPS.value, like, overrides)
    if _LOSS_PASS.value:
        runs[LOSS_PASS] = make_loss_passes(_MODEL.value, _BATCH.value, _STEPS.value, like)
    results = interleaved_medians(runs, _REPEATS.value, _STEPS.value)
    base = results.get("dense")
    floor = None
    if LOSS_PASS in results and base:
        floor = results[DENSE_AND_LOSS_PASS] = base + results[LOSS_PASS]
    flops = step_flops(_MODEL.value, _BATCH.value, like) if _PEAK.value else None
    peak = matmul_peak() if flops else None
    header = f"model={_MODEL.value} like={like} batch={_BATCH.value} " + (
        f"backend={jax.default_backend()} devices={jax.devices()}"
    )
    if peak:
        header += f" matmul peak {peak / 1e9:.1f} GFLOP/s ({PEAK_SIZE}-square jnp.dot)"
    print(header)
    extra = " GFLOP/s | fraction of peak |" if peak else ""
    columns = "| method | ms / step | examples / s | throughput vs dense | step time vs dense |"
    print(columns + extra)
    print("|---|---|---|---|---|" + ("---|---|" if peak else ""))
    for name, seconds in results.items():
        ratio = f"{base / seconds:.2f}x" if base else "-"
        slower = f"{seconds / base:.2f}x" if base else "-"
        done = flops * ROW_FLOPS.get(name, 1.0) if peak else 0.0
        rates = f" {done / seconds / 1e9:.1f} | {done / seconds / peak:.2f} |" if peak else ""
        print(f"| {name} | {1000 * seconds:.2f} | {_BATCH.value / seconds:.0f} | {ratio} "
              f"| {slower} |{rates}")
    if floor:
        print(f"step time vs {DENSE_AND_LOSS_PASS}: " + ", ".join(
            f"{name} {seconds / floor:.2f}x" for name, seconds in results.items()
            if name not in (LOSS_PASS, DENSE_AND_LOSS_PASS)))


if __name__ == "__main__":
    app.run(main)
