"""sparsejax's training steps against a plain dense PyTorch step of the same network, on CPU.

    pip install -e '.[bench]'
    python -m benchmarks.torch_compare --models=lenet5,mlp --methods=dense,l0_hc,l0_arm

The PyTorch networks are written here, as in the L0 papers' code: LeNet-5-Caffe (conv 5x5 20 -
max-pool 2 - conv 5x5 50 - max-pool 2 - dense 800-500-10, NCHW) and LeNet-300-100 (dense
784-300-100-10), ReLU, cross-entropy, Adam, batch 100 of random Fashion-MNIST-shaped data,
``torch.set_num_threads(THREADS)``, denormals flushed (XLA flushes them too). sparsejax's steps
are those of ``benchmarks.step_time`` (dispatched as a training run dispatches them: 10 steps per
call for the MLP, one for LeNet-5; ``NAME@steps_per_dispatch=1`` for one step per call), after
:func:`sparsejax.host.configure` as in the entry points. All steps are timed in one process, the
repeats interleaved (one chunk of ``steps`` steps of every step kind per round); the table gives
medians, each step relative to the PyTorch dense step of the same model, and the FLOP/s
achieved as a fraction of the float32 matmul peak measured in the same run (a
``PEAK_SIZE``-square ``jnp.dot``).

FLOP convention: a training step is counted as 3 forward passes (forward, input gradient,
weight gradient), each 2 FLOPs per multiply-accumulate of the dense network
(``sparsejax.structure.accounting.count_network``), i.e. ``6 * MACs * batch``; gates, pooling,
activations and the optimizer are not counted. (The first layer needs no input gradient, so
this slightly overcounts.)

On a machine shared with other work, run it with ``OMP_WAIT_POLICY=PASSIVE``: PyTorch's OpenMP
threads otherwise spin at every barrier, and with more runnable threads than cores its LeNet-5
step took 230-340 ms instead of 34 ms (2 cores, load 5). The header line shows the setting.
"""

from __future__ import annotations

from sparsejax import host

host.configure()

import os  # noqa: E402
import statistics  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import (  # noqa: E402
    PEAK_SIZE,
    make_steps,
    matmul_peak,
    parse_method,
    seconds_per_step,
    step_flops,
)


def define_flags() -> None:
    """The command line's flags; defined only when the module runs, so that importing its
    pieces (as the tests do, next to other benchmarks) defines no flag twice."""
    flags.DEFINE_list("models", ["lenet5", "mlp"], "Models: lenet5, mlp.")
    flags.DEFINE_list(
        "methods",
        ["dense", "l0_hc", "l0_arm"],
        "sparsejax methods, each NAME or NAME@FIELD=VALUE (e.g. dense@conv_chunks=1: the "
        "convolutions on the whole batch; dense@conv_columns=0: XLA's input gradients for the "
        "sliced convolutions).",
    )
    flags.DEFINE_integer("batch_size", 100, "Batch size.")
    flags.DEFINE_integer("steps", 20, "Steps per timed chunk.")
    flags.DEFINE_integer("repeats", 9, "Timed chunks per step kind (median reported).")

THREADS = 2
LEARNING_RATE = 1e-3
IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


def torch_lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, NUM_CLASSES),
    )


def torch_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, NUM_CLASSES),
    )


TORCH_MODELS = {"lenet5": torch_lenet5, "mlp": torch_mlp}


def torch_steps(model_name: str, batch_size: int, steps: int) -> Callable[[], None]:
    """A function that runs ``steps`` dense PyTorch training steps (Adam) of ``model_name``."""
    generator = torch.Generator().manual_seed(0)
    model = TORCH_MODELS[model_name]()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    batches = [
        (torch.rand(batch_size, *IMAGE_SHAPE, generator=generator),
         torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator))
        for _ in range(steps)
    ]

    def run() -> None:
        for images, labels in batches:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images), labels).backward()
            optimizer.step()

    run()
    return run


def main(argv: list[str]) -> None:
    del argv
    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(True)
    batch, steps = flags.FLAGS.batch_size, flags.FLAGS.steps
    runs: dict[tuple[str, str], Callable[[], None]] = {}
    for model_name in flags.FLAGS.models:
        runs[(model_name, "torch dense")] = torch_steps(model_name, batch, steps)
        for spec in flags.FLAGS.methods:
            name, overrides = parse_method(spec)
            runs[(model_name, spec)] = make_steps(
                name, model_name, batch, steps, "fashion_mnist", overrides
            )
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    peaks = []
    for _ in range(flags.FLAGS.repeats):
        peaks.append(matmul_peak())
        for key, run in runs.items():
            times[key].append(seconds_per_step(run, steps))
    peak = statistics.median(peaks)
    print(f"batch={batch} torch={torch.__version__} threads={THREADS} jax={jax.__version__} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} "
          f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s ({PEAK_SIZE}-square jnp.dot)")
    print("| model | step | ms / step | vs PyTorch dense | GFLOP/s | fraction of matmul peak |")
    print("|---|---|---|---|---|---|")
    for model_name in flags.FLAGS.models:
        flops = step_flops(model_name, batch)
        base = statistics.median(times[(model_name, "torch dense")])
        for (name, kind), values in times.items():
            if name != model_name:
                continue
            seconds = statistics.median(values)
            print(f"| {model_name} | {kind} | {1000 * seconds:.2f} | {seconds / base:.2f}x | "
                  f"{flops / seconds / 1e9:.1f} | {flops / seconds / peak:.2f} |")


if __name__ == "__main__":
    define_flags()
    app.run(main)
