"""The command line shared by the experiment entry points (``experiments.mnist``, ``.cifar``,
``.imagenet``): flags for the common fields, ``--config.NAME=VALUE`` for every other one, resume
from ``--workdir``, exit status 75 after a preemption (rerun to resume) and 1 with a one-line
``error:`` message for missing data, a damaged checkpoint or a diverged loss.

Multi-host: ``--distributed`` calls ``jax.distributed.initialize`` (arguments detected on TPU
pods and SLURM, or given with ``--coordinator_address``, ``--num_processes``, ``--process_id``).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from sparsejax.data import DatasetNotFoundError
from sparsejax.data.sources import SOURCES
from sparsejax.methods import METHODS
from sparsejax.models import MODELS
from sparsejax.train import NonFiniteLossError, Preempted, train_and_evaluate
from sparsejax.train.checkpoint import CheckpointError

EXIT_FAILED = 1
EXIT_PREEMPTED = 75

CONFIGS = Path(__file__).parent / "configs"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Configuration file; its fields are overridable as --config.NAME=VALUE."
)
_METHOD = flags.DEFINE_enum("method", None, sorted(METHODS), "Sparsification method.")
_MODEL = flags.DEFINE_enum("model", None, sorted(MODELS), "Model.")
_DATASET = flags.DEFINE_enum("dataset", None, list(SOURCES), "Dataset.")
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


def run(default_config: str, resolve: Callable[[ConfigDict], None] | None = None) -> None:
    """Parse the flags (``--config`` defaulting to ``configs/<default_config>.py``) and train.

    ``resolve`` fills the config fields still None after the flags with the paper's values for
    the chosen method, model and dataset.
    """
    flags.FLAGS.set_default("config", str(CONFIGS / f"{default_config}.py"))
    app.run(functools.partial(_main, resolve=resolve))


def _main(argv: list[str], resolve: Callable[[ConfigDict], None] | None) -> None:
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
    if resolve is not None:
        resolve(config)
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

