"""The command line shared by the experiment entry points (``experiments.mnist``, ``.cifar``,
``.imagenet``): flags for the common fields, ``--config.NAME=VALUE`` for every other one, resume
from ``--workdir``, exit status 75 after a preemption (rerun to resume) and 1 with a one-line
``error:`` message for every mistake that is the user's or the environment's to fix (see
:mod:`sparsejax.errors`): a bad flag or config field, missing or damaged data, a damaged
checkpoint or ``config.json``, a diverged loss, a full or read-only disk. ``--debug`` (or
``SPARSEJAX_DEBUG=1``) shows the traceback instead.

Multi-host: ``--distributed`` calls ``jax.distributed.initialize`` (arguments detected on TPU
pods and SLURM, or given with ``--coordinator_address``, ``--num_processes``, ``--process_id``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from sparsejax.data.sources import SOURCES
from sparsejax.errors import (
    EXIT_FAILED,
    ConfigError,
    DuplicateTracebackFilter,
    debugging,
    reported_errors,
)
from sparsejax.methods import METHODS, method_class
from sparsejax.models import MODELS
from sparsejax.structure.traced_model import check_model_name
from sparsejax.train import Preempted, train_and_evaluate

EXIT_PREEMPTED = 75

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "experiments" / "configs"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Configuration file; its fields are overridable as --config.NAME=VALUE."
)
_METHOD = flags.DEFINE_string(
    "method",
    None,
    f"Sparsification method: one of {', '.join(sorted(METHODS))}, or MODULE:CLASS for a method "
    "class of an importable module.",
)
_MODEL = flags.DEFINE_string(
    "model",
    None,
    f"Model: one of {', '.join(sorted(MODELS))}, or MODULE:FACTORY for a factory "
    "FACTORY(*, rngs, num_classes) of a plain NNX model (NHWC images -> logits; for "
    "experiments.lm, (batch, T) int32 token ids -> (batch, T, vocabulary) logits) in an "
    "importable module, gated and counted from its traced structure.",
)
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
_DEBUG = flags.DEFINE_bool(
    "debug", False, "Show the traceback of an error (also: environment SPARSEJAX_DEBUG=1)."
)

DEBUG_ARGUMENTS = ("--debug", "-debug", "--debug=true", "--debug=1")
"""How ``--debug`` may be written; looked for in the raw arguments when the flags themselves
cannot be parsed."""

_CONFIG_OVERRIDE = re.compile(r"^--?config\.([^=]+)")
_CONFIG_FILE = re.compile(r"^--?config=([^:]+)")
_METHOD_FLAG = re.compile(r"^--?method=(.+)")

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


Summarize = Callable[[ConfigDict, Path, dict], dict]
"""Adds an experiment's own fields to a finished run's summary (and its ``summary.json``)."""


def run(
    default_config: str,
    resolve: Callable[[ConfigDict], None] | None = None,
    summarize: Summarize | None = None,
) -> None:
    """Parse the flags (``--config`` defaulting to ``configs/<default_config>.py``) and train.

    ``resolve`` fills the config fields still None after the flags with the paper's values for
    the chosen method, model and dataset; ``summarize`` (on process 0) extends the summary.
    """
    app.run(
        functools.partial(_main, resolve=resolve, summarize=summarize),
        flags_parser=functools.partial(_parse_flags, CONFIGS / f"{default_config}.py"),
    )


def _parse_flags(default_config: Path, argv: list[str]) -> list[str]:
    """absl's flag parsing with ``--config`` defaulting to ``default_config``. A bad flag, an
    unknown config field, a value of the wrong type or a stray argument is reported as a
    :class:`ConfigError`, before any data or model is built."""
    program = f"python -m experiments.{Path(argv[0]).stem}"
    with reported_errors(debug=any(arg in DEBUG_ARGUMENTS for arg in argv), output="--workdir"):
        config_file = _config_file(argv, default_config)
        if not config_file.is_file():
            raise ConfigError(f"--config={config_file}: no such file; give a config file")
        method = _method_of(argv)
        if method is not None:
            method_class(method)
        try:
            flags.FLAGS.set_default("config", _with_method(str(default_config), method))
            rest = flags.FLAGS(_config_for_method(argv, method))
        except flags.Error as error:
            raise ConfigError(f"{error}; {program} --helpfull lists the flags") from error
        except ValueError as error:  # ml_collections: an override it cannot apply
            raise ConfigError(str(error)) from error
        except AttributeError as error:  # ml_collections' report of an unknown field
            missing, suggestion = _missing_field(error)
            override = _override_naming(missing, argv)
            if override is None:
                raise
            hint = f" ({suggestion[0].lower()}{suggestion[1:]})" if suggestion else ""
            raise ConfigError(
                f"--config.{override}: {_field_owner(missing, method, config_file, hint)}"
            ) from error
        if flags.FLAGS.model is not None:
            check_model_name(flags.FLAGS.model)
        if len(rest) > 1:
            raise ConfigError(
                f"unexpected arguments {' '.join(rest[1:])!r}; write flags as --NAME=VALUE "
                f"({program} --helpfull lists them)"
            )
    return rest


def _field_owner(field: str, method: str | None, config_file: Path, hint: str) -> str:
    """Why ``field`` is not in the config of ``method`` (``hint``: a spelling suggestion, or
    empty): it belongs to other methods, or to none; and where the valid fields are."""
    owners = sorted(name for name, cls in METHODS.items() if field in cls.fields)
    name = method or "the config's"
    if owners:
        return (
            f"{field!r} is not a field of method {name!r} (it belongs to {', '.join(owners)}); "
            "leave it out or choose that method"
        )
    return (
        f"{_shown(config_file)} and method {name!r} have no field {field!r}{hint}; the valid "
        f"fields are those set in {_shown(config_file)} and the method's (Method.fields of its "
        "class)"
    )


def _missing_field(error: AttributeError) -> tuple[str, str]:
    """The field name in ml_collections' report of a missing field, and its "Did you mean"
    suggestion (empty when it has none)."""
    cause = error.args[0] if error.args else ""
    text = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
    name, _, suggestion = str(text).partition("\n")
    return name.strip("'\""), suggestion.strip()


def _override_naming(missing: str, argv: list[str]) -> str | None:
    """The ``--config.PATH`` override of ``argv`` with ``missing`` in its path, if any."""
    for arg in argv:
        match = _CONFIG_OVERRIDE.match(arg)
        if match and missing in match.group(1).split("."):
            return match.group(1)
    return None


def _method_of(argv: list[str]) -> str | None:
    """The value of the command line's last ``--method`` flag, if any."""
    methods = [match.group(1) for arg in argv if (match := _METHOD_FLAG.match(arg))]
    return methods[-1] if methods else None


def _with_method(config_file: str, method: str | None) -> str:
    """``FILE:METHOD``, the config file with the method as its argument (config files define
    ``get_config(method=None)``), unless the file already has an argument."""
    if method is None or ":" in config_file:
        return config_file
    return f"{config_file}:{method}"


def _config_for_method(argv: list[str], method: str | None) -> list[str]:
    """``argv`` with a ``--config=FILE`` given the method as its argument."""
    return [
        f"--config={_with_method(match.group(1), method)}"
        if (match := re.match(r"^--?config=(.+)", arg))
        else arg
        for arg in argv
    ]


def _config_file(argv: list[str], default_config: Path) -> Path:
    """The config file of the command line: ``--config=FILE`` as given, else the default."""
    for arg in argv:
        match = _CONFIG_FILE.match(arg)
        if match:
            return Path(match.group(1))
    return default_config


def _shown(path: Path) -> Path:
    """``path`` relative to the repository when it lies inside it, for messages."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _main(
    argv: list[str],
    resolve: Callable[[ConfigDict], None] | None,
    summarize: Summarize | None = None,
) -> None:
    del argv  # _parse_flags refused positional arguments
    try:
        with reported_errors(debug=_DEBUG.value, output="--workdir"):
            _train(resolve, summarize)
    except SystemExit as stopped:
        if stopped.code == EXIT_FAILED and not debugging(_DEBUG.value):
            _silence_stderr()
        raise


def _silence_stderr() -> None:
    """Send what is left of the process's stderr to /dev/null. After a reported error the
    ``error:`` line is the run's last word; library threads that outlive a failed run (Orbax's,
    after a full disk) would otherwise print tracebacks while the interpreter shuts down."""
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def _train(
    resolve: Callable[[ConfigDict], None] | None, summarize: Summarize | None = None
) -> None:
    """Apply the flags to the config, train and print the summary."""
    logging.set_verbosity(logging.WARNING)
    if not debugging(_DEBUG.value):
        logging.get_absl_handler().addFilter(DuplicateTracebackFilter())
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
    method = config.method.replace(":", "_")  # MODULE:CLASS
    model = config.model.replace(":", "_")  # MODULE:FACTORY
    workdir = _WORKDIR.value or f"runs/{config.dataset}_{model}_{method}"
    try:
        summary = train_and_evaluate(config, workdir)
    except Preempted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    if jax.process_index() == 0:
        if summarize is not None:
            summary = summarize(config, Path(workdir), summary)
        print(json.dumps(summary, indent=2))

