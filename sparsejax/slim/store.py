"""Saving a slim network: a model gated from its trace (every zoo model, ``MODULE:FACTORY``)
slims into a pure function with its parameters
(:class:`~sparsejax.structure.slim_trace.SlimFunction`), whose directory holds
``slim_function.npz`` (:func:`save_slim_function`), which :func:`sparsejax.load_slim_function`
loads without the model's class, and ``slim_report.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsejax.errors import UserError
from sparsejax.structure.slim_trace import SlimFunction, SlimReport

SLIM_REPORT_FILE = "slim_report.json"
SLIM_FUNCTION_FILE = "slim_function.npz"


class SlimOutputExistsError(UserError, FileExistsError):
    """The output directory of a slim network holds one already."""


def write_report(directory: Path, report: SlimReport) -> None:
    """Write ``report`` to ``directory/slim_report.json``."""
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


def save_slim_function(directory: str | Path, slim: SlimFunction) -> Path:
    """Write the slim function and its parameters (:meth:`SlimFunction.save`) and its report
    under ``directory``; return the path of the ``.npz`` file."""
    directory = _output_directory(directory, SLIM_FUNCTION_FILE)
    path = directory / SLIM_FUNCTION_FILE
    slim.save(str(path))
    write_report(directory, slim.report)
    return path
