"""Saving a slim model and rebuilding it from disk.

A slim transformer's directory holds ``slim_config.json`` (the model name and constructor
arguments, ``architecture``: the slim model's own constructor arguments, its per-block widths,
and the :class:`~sparsejax.slim.result.SlimPlan` of the units it kept), ``slim_report.json`` and
an Orbax checkpoint of the slim model's state (``checkpoint/``). :func:`load_slim` builds the
model from its name and architecture without gates and restores the arrays.

A model gated from its trace (every convolutional zoo model, ``MODULE:FACTORY``) slims into a
pure function with its parameters (:class:`~sparsejax.structure.slim_trace.SlimFunction`): its
directory holds ``slim_function.npz`` (:func:`save_slim_function`), which
:func:`sparsejax.load_slim_function` loads without the model's class, and
``slim_report.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from sparsejax.errors import UserError
from sparsejax.models import build_model
from sparsejax.models.base import GatedModel
from sparsejax.slim.result import SlimReport, SlimResult
from sparsejax.slim.surgery import strip_to_network
from sparsejax.structure.slim_trace import SlimFunction
from sparsejax.structure.slim_trace import SlimReport as TracedSlimReport

SLIM_CONFIG_FILE = "slim_config.json"
SLIM_REPORT_FILE = "slim_report.json"
SLIM_CHECKPOINT_DIR = "checkpoint"
SLIM_FUNCTION_FILE = "slim_function.npz"


class SlimOutputExistsError(UserError, FileExistsError):
    """The output directory of a slim model holds one already."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What :func:`~sparsejax.models.build_model` needs to build the dense, ungated model."""

    model: str
    num_classes: int
    input_shape: tuple[int, ...]
    granularity: str

    def build(self, architecture: dict | None = None) -> GatedModel:
        """The model; ``architecture`` (constructor arguments, e.g. a slim transformer's
        per-block widths) overrides the defaults."""
        options = {"num_classes": self.num_classes, "input_shape": self.input_shape,
                   "granularity": self.granularity, **(architecture or {})}
        return build_model(self.model, rngs=nnx.Rngs(params=0), **options)


def write_report(directory: Path, report: SlimReport | TracedSlimReport) -> None:
    """Write ``report`` (of a zoo model or of a traced one) to ``directory/slim_report.json``."""
    (directory / SLIM_REPORT_FILE).write_text(
        json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n"
    )


def _output_directory(directory: str | Path, written: str) -> Path:
    """``directory`` made, as an absolute path; refused when it holds ``written`` already."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / written).exists():
        raise SlimOutputExistsError(
            f"{directory / written} exists already; pass another output directory or delete it"
        )
    return directory


def save_slim(directory: str | Path, spec: ModelSpec, result: SlimResult) -> Path:
    """Write ``result``'s model, plan and report under ``directory``; return its checkpoint path."""
    directory = _output_directory(directory, SLIM_CHECKPOINT_DIR)
    checkpoint = directory / SLIM_CHECKPOINT_DIR
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(checkpoint, _without_empty(nnx.state(result.model)))
    config = {"spec": dataclasses.asdict(spec), "plan": json.loads(result.plan.to_json()),
              "architecture": result.architecture}
    (directory / SLIM_CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    write_report(directory, result.report)
    return checkpoint


def save_slim_function(directory: str | Path, slim: SlimFunction) -> Path:
    """Write the slim function and its parameters (:meth:`SlimFunction.save`) and its report
    under ``directory``; return the path of the ``.npz`` file."""
    directory = _output_directory(directory, SLIM_FUNCTION_FILE)
    path = directory / SLIM_FUNCTION_FILE
    slim.save(str(path))
    write_report(directory, slim.report)
    return path


def load_slim(directory: str | Path) -> GatedModel:
    """The slim model saved by :func:`save_slim` under ``directory``."""
    directory = Path(directory).absolute()
    config_path = directory / SLIM_CONFIG_FILE
    if (directory / SLIM_FUNCTION_FILE).exists():
        raise FileNotFoundError(
            f"{directory} holds the slim function of a MODULE:FACTORY model; load "
            f"{directory / SLIM_FUNCTION_FILE} with sparsejax.load_slim_function"
        )
    if not config_path.exists():
        raise FileNotFoundError(
            f"{directory} holds no {SLIM_CONFIG_FILE}; it is not the output of "
            "`python -m sparsejax.slim RUN_DIR`"
        )
    config = json.loads(config_path.read_text())
    if "architecture" not in config:
        raise FileNotFoundError(
            f"{config_path} holds no architecture: it was written for a model that is now "
            "slimmed from its trace; slim the run again with `python -m sparsejax.slim RUN_DIR`"
        )
    spec = config["spec"]
    spec = ModelSpec(**{**spec, "input_shape": tuple(spec["input_shape"])})
    model = spec.build(config["architecture"])
    strip_to_network(model)
    state = nnx.state(model)
    abstract = _without_empty(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory / SLIM_CHECKPOINT_DIR, abstract)
    nnx.update(model, jax.tree.map(
        lambda empty, value: empty if value is None else value, state, restored,
        is_leaf=lambda leaf: leaf is None,
    ))
    return model


def _without_empty(state: nnx.State) -> nnx.State:
    """``state`` with its arrays of no entries (a layer slimmed to no units) as None: Orbax
    stores no zero-size array, and the slim model rebuilds them from its plan."""
    return jax.tree.map(lambda leaf: leaf if leaf.size else None, state)
