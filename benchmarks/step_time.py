"""Training-step time of each method relative to the dense step, same model and batch.

    python -m benchmarks.step_time --model=lenet5 --batch_size=100 --methods=dense,l0_hc,l0_arm,l0_ar
    python -m benchmarks.step_time --model=resnet56 --batch_size=128 --methods=dense,l0_hc,l0_arm

Each method's jitted step is compiled once, then timed over several repeats of ``steps`` steps on
random batches already on the device (dispatch included), shaped like the model's dataset
(MNIST, CIFAR or ImageNet: ``--like``); the table gives the median milliseconds per step, training
examples per second and the ratio of each to ``dense``. The process makes the host settings of
the entry points (:func:`sparsejax.host.configure`) first.
"""

from __future__ import annotations

from sparsejax import host

host.configure()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.common import dataset_like, time_method  # noqa: E402
from sparsejax.data.synthetic import SYNTHETIC_LIKE  # noqa: E402

_MODEL = flags.DEFINE_string("model", "lenet5", "Model name.")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Batch size.")
_METHODS = flags.DEFINE_list("methods", ["dense", "l0_hc", "l0_arm", "l0_ar"], "Methods to time.")
_STEPS = flags.DEFINE_integer("steps", 50, "Steps per timed chunk.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed chunks per method (median reported).")
_LIKE = flags.DEFINE_enum(
    "like", None, list(SYNTHETIC_LIKE), "Dataset shape (default: the model's usual dataset)."
)


def main(argv: list[str]) -> None:
    del argv
    like = _LIKE.value or dataset_like(_MODEL.value)
    results = {
        name: time_method(name, _MODEL.value, _BATCH.value, _STEPS.value, _REPEATS.value, like)
        for name in _METHODS.value
    }
    base = results.get("dense")
    print(f"model={_MODEL.value} like={like} batch={_BATCH.value} "
          f"backend={jax.default_backend()} devices={jax.devices()}")
    print("| method | ms / step | examples / s | throughput vs dense |")
    print("|---|---|---|---|")
    for name, seconds in results.items():
        ratio = f"{base / seconds:.2f}x" if base else "-"
        print(f"| {name} | {1000 * seconds:.2f} | {_BATCH.value / seconds:.0f} | {ratio} |")


if __name__ == "__main__":
    app.run(main)
