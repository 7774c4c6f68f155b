"""Figures from a training run's ``metrics.jsonl`` (and ``summary.json`` / ``config.json``).

    python -m sparsejax.plots RUN_DIR [--out OUT_DIR] [--debug]

writes PNGs of the error, loss, sparsity and per-layer active-unit curves of a run directory
written by ``python -m experiments.mnist ... --workdir=DIR``. Figures whose data is absent from
the metrics file are skipped. A missing or damaged metrics file is reported as one ``error:``
line (exit status 1); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: never open windows

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from sparsejax.errors import DEBUG_ENVIRONMENT_VARIABLE, REPORTABLE, report_error
from sparsejax.train.metrics import (
    METRICS_FILE,
    MetricsFileError,
    flatten_record,
    read_records,
)

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
PLOTS_DIR = "plots"
DPI = 120
PANEL_SIZE = (6.0, 4.0)
"""Width and height, in inches, of one panel."""

EVAL_PREFIXES = ("eval/", "sparsity/")
"""Keys that mark a record as a once-per-epoch evaluation record."""
ACTIVE_UNITS_PREFIX = "sparsity/active_units/"
TITLE_KEYS = ("method", "model", "dataset")
"""Run-description fields joined into every figure's title."""

ERROR_FIGURE = "error.png"
LOSS_FIGURE = "loss.png"
SPARSITY_FIGURE = "sparsity.png"
LEARNING_RATE_FIGURE = "learning_rate.png"
ACTIVE_UNITS_FIGURE = "active_units.png"
KEPT_UNITS_FIGURE = "kept_units.png"
BUDGET_FIGURE = "budget.png"



@dataclass(frozen=True)
class Series:
    """One metric over a run, ordered by step; ``epoch`` is NaN where a record had none."""

    step: np.ndarray
    epoch: np.ndarray
    value: np.ndarray


@dataclass(frozen=True)
class Panel:
    """One axes of a line figure: the metrics (key, legend label) drawn on it."""

    title: str
    ylabel: str
    lines: tuple[tuple[str, str], ...]
    yscale: str = "linear"


@dataclass(frozen=True)
class LineFigure:
    """A figure of line panels sharing one x axis ("epoch" or "step")."""

    filename: str
    title: str
    x: str
    panels: tuple[Panel, ...]


LINE_FIGURES = (
    LineFigure(
        ERROR_FIGURE,
        "Error",
        "epoch",
        (Panel("Error", "error (%)", (("train/err", "train"), ("eval/err", "eval"))),),
    ),
    LineFigure(
        LOSS_FIGURE,
        "Loss",
        "epoch",
        (
            Panel(
                "Loss",
                "loss",
                (
                    ("train/loss", "train loss"),
                    ("train/data_loss", "train data loss"),
                    ("eval/loss", "eval loss"),
                ),
            ),
            Panel("Sparsity penalty", "penalty", (("train/penalty", "train penalty"),)),
        ),
    ),
    LineFigure(
        SPARSITY_FIGURE,
        "Sparsity",
        "step",
        (
            Panel(
                "Parameters",
                "parameters",
                (("sparsity/expected_l0", "expected L0"), ("sparsity/params", "params")),
            ),
            Panel(
                "FLOPs",
                "FLOPs",
                (("sparsity/expected_flops", "expected FLOPs"), ("sparsity/flops", "FLOPs")),
            ),
        ),
    ),
    LineFigure(
        LEARNING_RATE_FIGURE,
        "Learning rate",
        "epoch",
        (
            Panel(
                "Learning rate per parameter group",
                "learning rate",
                (("lr/net", "network"), ("lr/gates", "gates"), ("lr/all", "all parameters")),
                yscale="log",
            ),
        ),
    ),
    LineFigure(
        BUDGET_FIGURE,
        "Budget",
        "step",
        (
            Panel(
                "Size vs target",
                "fraction of the dense network",
                (("train/budget/size", "size s"), ("train/budget/target", "target t")),
            ),
            Panel(
                "Multipliers",
                "value",
                (("train/budget/lambda1", "lambda_1"), ("train/budget/lambda2", "lambda_2")),
            ),
        ),
    ),
)


def load_series(records: Iterable[Mapping[str, object]]) -> dict[str, Series]:
    """Every numeric metric of ``records`` as a series ordered by step.

    Nested mappings are flattened with "/" (``sparsity/active_units/conv1``); of several records
    of one kind (train or eval) at the same step, the last wins."""
    latest: dict[tuple[str, int], Mapping[str, object]] = {}
    for record in records:
        if "step" in record:
            latest[(_record_kind(record), int(record["step"]))] = record
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for (_, step), record in sorted(latest.items(), key=lambda item: item[0][1]):
        epoch = _number(record.get("epoch"))
        epoch = math.nan if epoch is None else epoch
        for key, value in flatten_record(record).items():
            number = _number(value)
            if key not in ("step", "epoch") and number is not None:
                rows.setdefault(key, []).append((step, epoch, number))
    return {key: _to_series(key_rows) for key, key_rows in rows.items()}


def _to_series(rows: list[tuple[float, float, float]]) -> Series:
    step, epoch, value = np.asarray(rows, dtype=float).T
    return Series(step=step, epoch=epoch, value=value)


def _record_kind(record: Mapping[str, object]) -> str:
    return "eval" if any(key.startswith(EVAL_PREFIXES) for key in record) else "train"


def _number(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def read_run_info(run_dir: str | Path) -> dict:
    """``config.json`` updated with ``summary.json`` (each only where present)."""
    info: dict = {}
    for name in (CONFIG_FILE, SUMMARY_FILE):
        path = Path(run_dir) / name
        if path.is_file():
            info.update(_read_json_object(path))
    return info


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MetricsFileError(f"{path} is damaged (not valid JSON: {error}); fix or delete it")
    if not isinstance(data, dict):
        raise MetricsFileError(f"{path} is damaged (not a JSON object); fix or delete it")
    return data


def build_figures(series: Mapping[str, Series], info: Mapping[str, object]) -> dict[str, Figure]:
    """The figures that ``series`` has data for, by file name; ``info`` is ``read_run_info``."""
    built = [_line_figure(spec, series) for spec in LINE_FIGURES]
    built += [_active_units_figure(series, info), _kept_units_figure(series, info)]
    figures = dict(item for item in built if item is not None)
    run_title = " / ".join(str(info[key]) for key in TITLE_KEYS if info.get(key))
    for figure in figures.values():
        _finish(figure, run_title)
    return figures


def _finish(figure: Figure, run_title: str) -> None:
    if run_title:
        figure.suptitle(f"{figure.get_suptitle()} ({run_title})")
    figure.tight_layout()


def _new_figure(panels: int, title: str) -> tuple[Figure, list[plt.Axes]]:
    figure, axes = plt.subplots(
        1, panels, figsize=(PANEL_SIZE[0] * panels, PANEL_SIZE[1]), squeeze=False
    )
    figure.suptitle(title)
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
    return figure, list(axes[0])


def _line_figure(spec: LineFigure, series: Mapping[str, Series]) -> tuple[str, Figure] | None:
    panels = [p for p in spec.panels if any(key in series for key, _ in p.lines)]
    if not panels:
        return None
    x_name = spec.x
    if x_name == "epoch" and any(
        np.isnan(series[key].epoch).any() for p in panels for key, _ in p.lines if key in series
    ):
        x_name = "step"
    figure, axes = _new_figure(len(panels), spec.title)
    for ax, panel in zip(axes, panels):
        for key, label in panel.lines:
            if key in series:
                data = series[key]
                ax.plot(getattr(data, x_name), data.value, marker=_marker(data), label=label)
        ax.set(title=panel.title, xlabel=x_name, ylabel=panel.ylabel, yscale=panel.yscale)
        ax.legend()
    return spec.filename, figure


def _marker(data: Series) -> str | None:
    """Dots for short (per-epoch) series, so that a single point stays visible."""
    return "o" if len(data.value) <= 50 else None


def _slots(series: Mapping[str, Series], info: Mapping[str, object]) -> list[str]:
    """Gate slots with active-unit data, in ``summary.json``'s order when it gives one."""
    logged = [
        key.removeprefix(ACTIVE_UNITS_PREFIX)
        for key in series
        if key.startswith(ACTIVE_UNITS_PREFIX)
    ]
    ordered = [slot for slot in info.get("gate_slots", []) if slot in logged]
    return ordered + [slot for slot in logged if slot not in ordered]


def _dense_units(info: Mapping[str, object]) -> dict[str, float]:
    return dict(zip(info.get("gate_slots", []), info.get("dense_units", [])))


def _active_units_figure(
    series: Mapping[str, Series], info: Mapping[str, object]
) -> tuple[str, Figure] | None:
    slots = _slots(series, info)
    if not slots:
        return None
    dense = _dense_units(info)
    as_fraction = all(dense.get(slot) for slot in slots)
    figure, (ax,) = _new_figure(1, "Active units")
    for slot in slots:
        data = series[ACTIVE_UNITS_PREFIX + slot]
        values = data.value / dense[slot] if as_fraction else data.value
        ax.plot(data.step, values, marker=_marker(data), label=slot)
    ylabel = "active units / dense units" if as_fraction else "active units"
    ax.set(title="Active units per layer", xlabel="step", ylabel=ylabel)
    ax.legend()
    return ACTIVE_UNITS_FIGURE, figure


def kept_units(
    series: Mapping[str, Series], info: Mapping[str, object]
) -> tuple[list[str], list[float], list[float] | None]:
    """Slots, their final kept units and their dense widths (None when unknown).

    Taken from ``summary.json`` when it lists them, else from the last logged active units."""
    slots, active = info.get("gate_slots"), info.get("active_units")
    if slots and active and len(slots) == len(active):
        dense = info.get("dense_units")
        return (
            list(slots),
            list(active),
            list(dense) if dense and len(dense) == len(slots) else None,
        )
    slots = _slots(series, info)
    return slots, [float(series[ACTIVE_UNITS_PREFIX + s].value[-1]) for s in slots], None


def _kept_units_figure(
    series: Mapping[str, Series], info: Mapping[str, object]
) -> tuple[str, Figure] | None:
    slots, kept, dense = kept_units(series, info)
    if not slots:
        return None
    figure, (ax,) = _new_figure(1, "Kept units")
    positions = np.arange(len(slots))
    width = 0.4 if dense else 0.6
    if dense:
        ax.bar(positions - width / 2, dense, width, label="dense", color="lightgray")
        bars = ax.bar(positions + width / 2, kept, width, label="kept")
    else:
        bars = ax.bar(positions, kept, width, label="kept")
    ax.bar_label(bars, fmt="%g")
    ax.set_xticks(positions, slots)
    ax.set(title="Final kept units per layer", xlabel="layer", ylabel="units")
    ax.legend()
    return KEPT_UNITS_FIGURE, figure


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Writes the figures of the run in ``run_dir`` to ``out_dir`` (default ``run_dir/plots``)
    as PNGs and returns their paths."""
    run_dir = Path(run_dir)
    series = load_series(read_records(run_dir / METRICS_FILE))
    figures = build_figures(series, read_run_info(run_dir))
    out_dir = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, figure in figures.items():
        path = out_dir / name
        figure.savefig(path, dpi=DPI)
        plt.close(figure)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: plots RUN_DIR and prints the written paths."""
    parser = argparse.ArgumentParser(
        prog="python -m sparsejax.plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, help=f"run directory (holds {METRICS_FILE})")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"output directory (default: RUN_DIR/{PLOTS_DIR})"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of an error (also: {DEBUG_ENVIRONMENT_VARIABLE}=1)",
    )
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except REPORTABLE as error:
        return report_error(error, debug=args.debug, output="--out")
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
