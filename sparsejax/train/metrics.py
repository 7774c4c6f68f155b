"""Metric sinks: a JSON-lines file per run and TensorBoard event files (tensorboardX)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sparsejax.errors import UserError, written_under

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(value):
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


class MetricWriter:
    """Appends one JSON record per call to ``workdir/metrics.jsonl`` and mirrors every numeric
    scalar (nested keys joined with "/") to TensorBoard.

    ``resume_step``: the step the run starts from. When the metrics file exists already (a
    resumed run), the records of later steps, written before the run stopped and about to be
    written again, are dropped from it, and TensorBoard is told to hide its events from the steps
    after it (``purge_step``)."""

    def __init__(self, workdir: Path, resume_step: int = 0):
        self.path = Path(workdir) / METRICS_FILE
        resuming = self.path.exists()
        if resuming:
            drop_records_after(self.path, resume_step)
        self._file = self.path.open("a")
        # Imported here, not with this module: tensorboardX imports torch when it is installed
        # (about 0.5 GB), and input worker processes import this module but write no metrics.
        from tensorboardX import SummaryWriter

        self._tensorboard = SummaryWriter(
            str(Path(workdir) / TENSORBOARD_DIR), purge_step=resume_step + 1 if resuming else None
        )

    def write(self, step: int, record: Mapping[str, object]) -> None:
        record = {"step": int(step), **_plain(record)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in flatten_record(record).items():
            if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(name, value, step)

    def histograms(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
        for name, values in arrays.items():
            self._tensorboard.add_histogram(name, np.asarray(values).ravel(), step)

    def close(self) -> None:
        """Flush and close both sinks; an environment error that names no file (a full disk
        fails the last flush) names the run's directory."""
        with written_under(self.path.parent):
            self._file.close()
            self._tensorboard.close()

    def abandon(self) -> None:
        """Close both sinks of a run that is ending on an error, dropping an error in closing
        them: the cause that ended the run (say a full disk, in a checkpoint) fails the last
        flush too, and that second error must not replace the first in the report."""
        with contextlib.suppress(OSError, ValueError):
            self._file.close()
        with contextlib.suppress(OSError, ValueError):
            self._tensorboard.close()


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite the metrics file ``path`` (atomically) without the records of steps after
    ``step`` and without an unfinished last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(kept))
    partial.replace(path)


def flatten_record(record: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """Nested keys joined with "/": ``{"a": {"b": 1}} -> {"a/b": 1}``."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_record(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


class MetricsNotFoundError(UserError, FileNotFoundError):
    """A run directory has no metrics file."""


class MetricsFileError(UserError, ValueError):
    """A metrics file (or a JSON file beside it) is damaged; the message names it."""


RUN_DIR_HINT = "a run directory written by `python -m experiments.mnist ... --workdir=DIR`"


def read_records(path: str | Path) -> list[dict]:
    """The JSON records of a metrics file, one per non-blank line.

    Raises MetricsNotFoundError when the file is missing and MetricsFileError when it is not
    text, holds no records or a line is not a JSON object (naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise MetricsNotFoundError(f"{path} not found: expected {RUN_DIR_HINT}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise MetricsFileError(
            f"{path} is damaged (not UTF-8 text: {error.reason} at byte {error.start}); "
            "delete it, or point at another run directory"
        ) from error
    records = [
        _parse_line(path, number, line)
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]
    if not records:
        raise MetricsFileError(f"{path} holds no metric records")
    return records


def _parse_line(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise MetricsFileError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
    if not isinstance(record, dict):
        raise MetricsFileError(
            f"{path}, line {number}: expected a JSON object, got {line.strip()!r}"
        )
    return record


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records of a run's metrics file."""
    return read_records(Path(workdir) / METRICS_FILE)


class NullWriter:
    """The writer of processes other than process 0: writes nothing."""

    def write(self, step: int, record: Mapping[str, object]) -> None:
        del step, record

    def histograms(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
        del step, arrays

    def close(self) -> None:
        pass
