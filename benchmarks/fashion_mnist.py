"""The Fashion-MNIST results table: every method on LeNet-300-100 and LeNet-5-Caffe.

    python -m benchmarks.fashion_mnist --epochs=10 --workdir=runs/table

Runs (or resumes) one training run per (model, method) with the MNIST config (Adam 1e-3, batch
100, the papers' lambdas; ``gmp`` with its defaults: 90% of every kernel pruned by magnitude on
the cubic ramp over the first two thirds of the run) and prints a markdown table of test error,
architecture, pruning rate, FLOPs of the pruned network and seconds per epoch.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags, logging

from experiments.configs.mnist import get_config
from sparsejax.train import train_and_evaluate

_EPOCHS = flags.DEFINE_integer("epochs", 10, "Epochs per run (the same for every run).")
_MODELS = flags.DEFINE_list("models", ["mlp", "lenet5"], "Models.")
_METHODS = flags.DEFINE_list(
    "methods",
    ["dense", "l0_hc", "l0_arm", "l0_ar", "gmp"],
    "Methods; METHOD:DEPENDENCY picks the Dep-L0 generator's direction (dep_l0:backward).",
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/fashion_mnist_table", "Parent directory of runs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every run.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    rows = []
    for model in _MODELS.value:
        for spec in _METHODS.value:
            method, _, dependency = spec.partition(":")
            config = get_config()
            config.update(model=model, method=method, epochs=_EPOCHS.value, seed=_SEED.value)
            if dependency:
                config.dependency = dependency
            run_name = f"{model}_{method}" + (f"_{dependency}" if dependency else "")
            summary = train_and_evaluate(config, Path(_WORKDIR.value) / run_name)
            summary["method"] = spec
            rows.append(summary)
            print(_row(summary), flush=True)
    print(f"\nFashion-MNIST, {_EPOCHS.value} epochs, seed {_SEED.value}\n")
    print("| model | method | test err % | best err % | architecture | pruning rate % "
          "| MFLOPs (pruned / dense) | s / epoch |")
    print("|---|---|---|---|---|---|---|---|")
    for summary in rows:
        print(_row(summary))


def _row(s: dict) -> str:
    return (
        f"| {s['model']} | {s['method']} | {s['test_error']:.2f} | {s['best_test_error']:.2f} "
        f"| {s['architecture']} | {s['pruning_rate']:.1f} "
        f"| {s['flops'] / 1e6:.3f} / {s['dense_flops'] / 1e6:.3f} | {s['seconds_per_epoch']:.1f} |"
    )


if __name__ == "__main__":
    app.run(main)
