"""Pruning to a FLOPs budget: every method at every target on Fashion-MNIST, one short protocol.

    nice -n 5 python -m benchmarks.budget_table --models=mlp,lenet5 --targets=0.5,0.3,0.15 \
        --workdir=runs/budget_table

For each model, target and method (in that order, so that an interrupted table has every method
at the first targets) one run with ``--config.target_flops=TARGET``, resumable under
``workdir/MODEL/TARGET/METHOD``; a finished run is read back, not retrained. Then
``budget_table.json`` (one row per run: achieved FLOPs fraction, test error, architecture,
params fraction, miss), ``budget_table.md`` (the table, the lowest error per model and budget in
bold) and ``budget_table.png`` (test error vs achieved FLOPs fraction, one line per method, one
panel per model) in ``workdir``; ``--report_only`` rebuilds them from the runs present, and
``--earlier_rows=JSON`` (a ``budget_table.json``) fills the runs missing from ``workdir`` with
rows measured by an earlier version of the code, marked † in the table.

The protocol (:data:`PROTOCOL`, :func:`run_config`): batch 100, Adam 1e-3 for the weights, the
gates at Adam 1e-2 (Dep-L0's generator at its default, Adam 1e-3: at 1e-2 its scaled tanh
saturates within the first few hundred updates, the gates it turned off get no gradient and the
budget cannot reopen them), the target reached after half the run
(``target_warmup_epochs``, the default) with ``target_lr`` and ``target_kp`` at their defaults;
gmp and stochastic
pruning ramp over the first two thirds; GReg pretrains one epoch and runs a schedule compressed
into a few hundred updates (:data:`SHORT_GREG`). Every method's other settings are its defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: never open windows

import matplotlib.pyplot as plt  # noqa: E402
import ml_collections
from absl import app, flags, logging

from experiments.configs.mnist import get_config
from sparsejax.plots import DPI, PANEL_SIZE
from sparsejax.train import train_and_evaluate
from sparsejax.train.loop import SUMMARY_FILE

METHODS = (
    "l0_hc", "l0_arm", "l0_ar", "dep_l0", "dep_l0_arm", "l1", "bounded_lp",
    "gmp", "stochastic", "greg1", "greg2",
)
RATIO_METHODS = ("gmp", "stochastic", "greg1", "greg2")
PROTOCOL = {"mlp": 3, "lenet5": 2}
"""Epochs per model."""
GATE_LEARNING_RATE = 1e-2
SHORT_GREG = {
    "pretrain_epochs": 1,
    "greg_interval": 1,
    "greg_delta": 1e-2,
    "greg_stabilise_steps": 100,
}
"""GReg's schedule in a short run: one epoch of pretraining, the ceiling tau = 1 after 100
coefficient updates, 100 updates of stabilisation (the defaults for MLP / LeNet-5: 10 / 5
epochs of pretraining, 1000 and 600), so regularisation is one epoch; fine-tuning takes the
protocol's remaining epochs."""

_MODELS = flags.DEFINE_list("models", ["mlp", "lenet5"], "Models.")
_TARGETS = flags.DEFINE_list("targets", ["0.5", "0.3", "0.15"], "FLOPs targets.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "Methods.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/budget_table", "Parent directory of runs.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild the table from the runs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every run.")
_EARLIER = flags.DEFINE_string(
    "earlier_rows", None, "budget_table.json of an earlier version: rows for the missing runs."
)


def run_config(method: str, model: str, target: float, seed: int = 0) -> ml_collections.ConfigDict:
    """The protocol's config of one run."""
    epochs = PROTOCOL[model]
    config = get_config(method)
    settings = {
        "model": model,
        "dataset": "fashion_mnist",
        "epochs": epochs,
        "seed": seed,
        "log_every": 100,
        "target_flops": target,
        "gate_learning_rate": None if method.startswith("dep_l0") else GATE_LEARNING_RATE,
        "prune_end_epoch": 2.0 * epochs / 3.0,
        **(SHORT_GREG if method.startswith("greg") else {}),
    }
    if method.startswith("greg"):  # the same epochs: pretraining, regularisation, fine-tuning
        settings.update(epochs=None, fine_tune_epochs=epochs - 2)
    config.update({key: value for key, value in settings.items() if key in config})
    return config


def row_of(model: str, target: float, method: str, summary: dict) -> dict:
    return {
        "model": model,
        "target": target,
        "method": method,
        "achieved_flops": summary["flops"] / summary["dense_flops"],
        "params_fraction": summary["params"] / summary["dense_params"],
        "test_error": summary["test_error"],
        "architecture": summary["architecture"],
        "missed_by": summary.get("target_missed_by"),
        "seconds_per_epoch": summary["seconds_per_epoch"],
    }


def markdown(rows: list[dict]) -> str:
    """One table per model: a row per method, a column pair per target."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        targets = sorted({r["target"] for r in mine}, reverse=True)
        best = {t: min(r["test_error"] for r in mine if r["target"] == t) for t in targets}
        lines += [
            f"**{model}** ({PROTOCOL[model]} epochs): test error % / achieved FLOPs fraction / "
            "architecture",
            "",
            "| method | " + " | ".join(f"target {t}" for t in targets) + " |",
            "|---|" + "---|" * len(targets),
        ]
        for method in dict.fromkeys(r["method"] for r in mine):
            cells = []
            for t in targets:
                found = [r for r in mine if r["method"] == method and r["target"] == t]
                if not found:
                    cells.append("not run")
                    continue
                r = found[0]
                error = f"{r['test_error']:.2f}"
                if r["test_error"] == best[t]:
                    error = f"**{error}**"
                if r.get("earlier"):
                    error += " †"
                cells.append(f"{error} / {r['achieved_flops']:.3f} / {r['architecture']}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Test error vs achieved FLOPs fraction, one line per method (dashed: the ratio methods),
    one panel per model."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(
        1, len(models), figsize=(PANEL_SIZE[0] * len(models), PANEL_SIZE[1]), squeeze=False
    )
    for ax, model in zip(axes[0], models):
        for method in dict.fromkeys(r["method"] for r in rows if r["model"] == model):
            points = sorted(
                (r["achieved_flops"], r["test_error"])
                for r in rows
                if r["model"] == model and r["method"] == method
            )
            style = "--" if method in RATIO_METHODS else "-"  # dashed: a ratio set up front
            ax.plot(*zip(*points), marker="o", linestyle=style, label=method)
        ax.set_title(f"{model}, Fashion-MNIST")
        ax.set_xlabel("achieved FLOPs fraction")
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def main(argv):
    del argv
    workdir = Path(_WORKDIR.value)
    rows = []
    for model in _MODELS.value:
        for target in (float(t) for t in _TARGETS.value):
            for method in _METHODS.value:
                run_dir = workdir / model / str(target) / method
                if not (run_dir / SUMMARY_FILE).exists():
                    if _REPORT_ONLY.value:
                        continue
                    logging.info("training %s", run_dir)
                    train_and_evaluate(run_config(method, model, target, _SEED.value), run_dir)
                summary = json.loads((run_dir / SUMMARY_FILE).read_text())
                rows.append(row_of(model, target, method, summary))
                write_outputs(workdir, rows)
    if _EARLIER.value:
        write_outputs(workdir, with_earlier(rows, json.loads(Path(_EARLIER.value).read_text())))


def with_earlier(rows: list[dict], earlier: list[dict]) -> list[dict]:
    """``rows`` plus the ``earlier`` rows of the models, targets and methods asked for that
    ``rows`` lacks, marked ``earlier``, in the table's order."""
    have = {(r["model"], r["target"], r["method"]) for r in rows}
    wanted = {
        (m, float(t), me) for m in _MODELS.value for t in _TARGETS.value for me in _METHODS.value
    }
    added = [
        {**r, "earlier": True}
        for r in earlier
        if (key := (r["model"], r["target"], r["method"])) in wanted and key not in have
    ]
    order = {key: i for i, key in enumerate(
        (m, float(t), me) for m in _MODELS.value for t in _TARGETS.value for me in _METHODS.value
    )}
    return sorted(rows + added, key=lambda r: order[(r["model"], r["target"], r["method"])])


def write_outputs(workdir: Path, rows: list[dict]) -> None:
    (workdir / "budget_table.json").write_text(json.dumps(rows, indent=2) + "\n")
    (workdir / "budget_table.md").write_text(markdown(rows))
    plot(rows, workdir / "budget_table.png")


if __name__ == "__main__":
    app.run(main)
