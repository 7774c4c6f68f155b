"""Train a gated LeNet on (Fashion-)MNIST.

    python -m experiments.mnist --method=l0_arm --model=lenet5 --dataset=fashion_mnist \
        --epochs=10 --workdir=runs/lenet5_arm

Flags set the common fields; every other hyperparameter is a ``--config.NAME=VALUE`` override of
``experiments/configs/mnist.py``. Rerunning the same command with the same ``--workdir`` resumes.
"""

from __future__ import annotations

import json

from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from sparsejax.data import DATASETS
from sparsejax.methods import METHODS
from sparsejax.models import MODELS
from sparsejax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(Path(__file__).parent / "configs" / "mnist.py"),
    "Configuration file; its fields are overridable as --config.NAME=VALUE.",
)
_METHOD = flags.DEFINE_enum("method", None, sorted(METHODS), "Sparsification method.")
_MODEL = flags.DEFINE_enum("model", None, ["mlp", "lenet5"], "Model.")
_DATASET = flags.DEFINE_enum("dataset", None, list(DATASETS), "Dataset.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Training epochs.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Minibatch size.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps_per_epoch", None, "Cap on steps per epoch.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", None, "Random seed.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory with the dataset's files.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default runs/DATASET_MODEL_METHOD); resumes if it holds a run."
)

_FLAG_FIELDS = {
    "method": _METHOD,
    "model": _MODEL,
    "dataset": _DATASET,
    "epochs": _EPOCHS,
    "batch_size": _BATCH_SIZE,
    "steps_per_epoch": _STEPS,
    "seed": _SEED,
    "data_dir": _DATA_DIR,
}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    for field, flag in _FLAG_FIELDS.items():
        if flag.value is not None:
            setattr(config, field, flag.value)
    if config.model not in MODELS:
        raise app.UsageError(f"unknown model {config.model!r}; valid: {', '.join(sorted(MODELS))}")
    workdir = _WORKDIR.value or f"runs/{config.dataset}_{config.model}_{config.method}"
    summary = train_and_evaluate(config, workdir)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
