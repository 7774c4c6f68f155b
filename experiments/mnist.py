"""Train a gated LeNet on (Fashion-)MNIST.

    python -m experiments.mnist --method=l0_arm --model=lenet5 --dataset=fashion_mnist \
        --epochs=10 --workdir=runs/lenet5_arm

Flags set the common fields; every other hyperparameter is a ``--config.NAME=VALUE`` override of
``experiments/configs/mnist.py``. Rerunning the same command with the same ``--workdir`` resumes.
SIGTERM or Ctrl-C saves a checkpoint and exits with status 75 (EX_TEMPFAIL: run it again).
Multi-host: ``--distributed`` calls ``jax.distributed.initialize`` (arguments detected on TPU
pods and SLURM, or given with ``--coordinator_address``, ``--num_processes``, ``--process_id``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sparsejax.data import DATASETS, DatasetNotFoundError
from sparsejax.methods import METHODS
from sparsejax.models import MODELS
from sparsejax.train import NonFiniteLossError, Preempted, train_and_evaluate
from sparsejax.train.checkpoint import CheckpointError

EXIT_FAILED = 1
EXIT_PREEMPTED = 75

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(Path(__file__).parent / "configs" / "mnist.py"),
    "Configuration file; its fields are overridable as --config.NAME=VALUE.",
)
_METHOD = flags.DEFINE_enum("method", None, sorted(METHODS), "Sparsification method.")
_MODEL = flags.DEFINE_enum("model", None, sorted(MODELS), "Model.")
_DATASET = flags.DEFINE_enum("dataset", None, list(DATASETS), "Dataset.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Training epochs.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Minibatch size.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps_per_epoch", None, "Cap on steps per epoch.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", None, "Random seed.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory with the dataset's files.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default runs/DATASET_MODEL_METHOD); resumes if it holds a run."
)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")

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
    if _DISTRIBUTED.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    config = _CONFIG.value
    for field, flag in _FLAG_FIELDS.items():
        if flag.value is not None:
            setattr(config, field, flag.value)
    workdir = _WORKDIR.value or f"runs/{config.dataset}_{config.model}_{config.method}"
    try:
        summary = train_and_evaluate(config, workdir)
    except Preempted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except (DatasetNotFoundError, CheckpointError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
