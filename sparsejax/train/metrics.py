"""Metric sinks: a JSON-lines file per run and TensorBoard event files (tensorboardX)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

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
    scalar (nested keys joined with "/") to TensorBoard."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / METRICS_FILE
        self._file = self.path.open("a")
        # Imported here, not with this module: tensorboardX imports torch when it is installed
        # (about 0.5 GB), and input worker processes import this module but write no metrics.
        from tensorboardX import SummaryWriter

        self._tensorboard = SummaryWriter(str(Path(workdir) / TENSORBOARD_DIR))

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
        self._file.close()
        self._tensorboard.close()


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


RUN_DIR_HINT = "a run directory written by `python -m experiments.mnist ... --workdir=DIR`"


def read_records(path: str | Path) -> list[dict]:
    """The JSON records of a metrics file, one per non-blank line.

    Raises FileNotFoundError when the file is missing and ValueError when it holds no records or
    a line is not a JSON object (naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected {RUN_DIR_HINT}")
    records = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                records.append(_parse_line(path, number, line))
    if not records:
        raise ValueError(f"{path} holds no metric records")
    return records


def _parse_line(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
    if not isinstance(record, dict):
        raise ValueError(f"{path}, line {number}: expected a JSON object, got {line.strip()!r}")
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
