"""Metric sinks: a JSON-lines file per run and TensorBoard event files (tensorboardX)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tensorboardX import SummaryWriter

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
        self._tensorboard = SummaryWriter(str(Path(workdir) / TENSORBOARD_DIR))

    def write(self, step: int, record: Mapping[str, object]) -> None:
        record = {"step": int(step), **_plain(record)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in _flatten(record).items():
            if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(name, value, step)

    def histograms(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
        for name, values in arrays.items():
            self._tensorboard.add_histogram(name, np.asarray(values).ravel(), step)

    def close(self) -> None:
        self._file.close()
        self._tensorboard.close()


def _flatten(record: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records of a run's metrics file."""
    with (Path(workdir) / METRICS_FILE).open() as f:
        return [json.loads(line) for line in f if line.strip()]


class NullWriter:
    """The writer of processes other than process 0: writes nothing."""

    def write(self, step: int, record: Mapping[str, object]) -> None:
        del step, record

    def histograms(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
        del step, arrays

    def close(self) -> None:
        pass
