"""Transformers under a budget: ``vit_tiny`` on Fashion-MNIST and ``lm_tiny`` on ``python_docs``.

    nice -n 5 python -m benchmarks.transformer_table --runs=runs/transformer_table

One run per (model, method), in that order, resumable under ``runs/MODEL/METHOD`` (a run with
a ``summary.json`` is read back, not retrained). Every gated method trains to a budget (the
Lagrangian of :mod:`sparsejax.methods.budget`, its lambdas replaced): ``vit_tiny`` to
``--vit_target`` of the dense FLOPs (attention products included), ``lm_tiny`` to ``--lm_target``
of the dense parameters; the target is reached after half the run (``target_warmup_epochs``, the
default), the gates train at Adam 4e-2 (ViT) / 5e-2 (LM)
(:data:`benchmarks.transformer_runs.GATE_LEARNING_RATE`). Seed 0.
``dense`` trains the same updates. By default a ViT run is 300 updates (one epoch capped by
``--vit_steps_per_epoch``) and an LM run 2 epochs (176 updates). The ViT uses the MNIST config
(batch 100, Adam 1e-3, gated L2 5e-4), the LM the LM config (batch 32 x 128 bytes, Adam 1e-3, no
L2) and :func:`experiments.lm.summarize` (test perplexity and bits per byte).

Writes ``transformer_table.json`` (one row per run), ``transformer_table.md`` (a table per
model) and ``transformer_heads.png`` (kept query heads per block, one line per method, one panel
per model) in ``--runs`` (not ``--workdir``: :mod:`experiments.lm`, imported when the runs are
read, defines its command-line flags); ``--report_only`` rebuilds them from the runs present. A
block's kept heads are the query heads that reach its output: head gate, KV group gate (LM) and
``attn`` sublayer gate all open (:func:`benchmarks.transformer_runs.live_heads`, read from the
LM runs' checkpoints, whose summaries count a head of a closed group as open).
"""

from __future__ import annotations

from sparsejax import host

host.configure()

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # before pyplot is imported: never open windows

import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from benchmarks.transformer_runs import (  # noqa: E402
    MODELS,
    heads_per_block,
    run_config,
    run_live_heads,
)
from sparsejax.plots import DPI, PANEL_SIZE  # noqa: E402
from sparsejax.train import train_and_evaluate  # noqa: E402
from sparsejax.train.loop import SUMMARY_FILE  # noqa: E402

_MODELS = flags.DEFINE_list("models", list(MODELS), "Models (vit_tiny, lm_tiny).")
_METHODS = flags.DEFINE_list("methods", ["dense", "l0_hc", "l0_arm", "l0_ar"], "Methods.")
_VIT_EPOCHS = flags.DEFINE_integer("vit_epochs", 1, "Epochs of every vit_tiny run.")
_LM_EPOCHS = flags.DEFINE_integer("lm_epochs", 2, "Epochs of every lm_tiny run.")
_VIT_STEPS = flags.DEFINE_integer(
    "vit_steps_per_epoch", 300, "Cap on the updates of a vit_tiny epoch (None: 600, all data)."
)
_VIT_TARGET = flags.DEFINE_float("vit_target", 0.5, "vit_tiny: FLOPs fraction of the gated runs.")
_LM_TARGET = flags.DEFINE_float("lm_target", 0.5, "lm_tiny: params fraction of the gated runs.")
_RUNS = flags.DEFINE_string("runs", "runs/transformer_table", "Parent directory of runs.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild the outputs from the runs.")


def row_of(model: str, method: str, summary: dict) -> dict:
    row = {
        "model": model,
        "method": method,
        "epochs": summary["epochs"],
        "updates": summary["epochs"] * summary["steps_per_epoch"],
        "batch_size": summary["batch_size"],
        "test_error": summary["test_error"],
        "flops_fraction": summary["flops"] / summary["dense_flops"],
        "params_fraction": summary["params"] / summary["dense_params"],
        "params": summary["params"],
        "heads": heads_per_block(summary),
        "live_heads": heads_per_block(summary),
        "architecture": summary["architecture"],
        "missed_by": summary.get("target_missed_by"),
        "seconds_per_epoch": summary["seconds_per_epoch"],
    }
    for key in ("test_perplexity", "test_bits_per_byte", "unigram_bits_per_byte"):
        if key in summary:
            row[key] = summary[key]
    return row


def protocol(row: dict) -> str:
    return f"{row['epochs']} epochs, {row['updates']} updates of batch {row['batch_size']}"


def markdown(rows: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        if model == "lm_tiny":
            lines += [
                f"**lm_tiny on python_docs** ({protocol(mine[0])}; unigram "
                f"{mine[0]['unigram_bits_per_byte']:.3f} bits/byte)",
                "",
                "| method | test perplexity / byte | bits / byte | byte error % | kept params "
                "(fraction) | FLOPs fraction | heads per block | s / epoch |",
                "|---|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r['method']} | {r['test_perplexity']:.2f} | {r['test_bits_per_byte']:.3f} "
                f"| {r['test_error']:.1f} | {r['params']:,.0f} ({r['params_fraction']:.3f}) "
                f"| {r['flops_fraction']:.3f} | {r['live_heads']} | {r['seconds_per_epoch']:.0f} |"
                for r in mine
            ]
        else:
            lines += [
                f"**vit_tiny on Fashion-MNIST** ({protocol(mine[0])})",
                "",
                "| method | test error % | kept FLOPs fraction | params fraction "
                "| heads per block | s / epoch |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r['method']} | {r['test_error']:.2f} | {r['flops_fraction']:.3f} "
                f"| {r['params_fraction']:.3f} | {r['live_heads']} | {r['seconds_per_epoch']:.0f} |"
                for r in mine
            ]
        lines.append("")
    return "\n".join(lines)


def plot_heads(rows: list[dict], path: Path) -> None:
    """Kept query heads per block, one line per method, one panel per model."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(
        1, len(models), figsize=(PANEL_SIZE[0] * len(models), PANEL_SIZE[1]), squeeze=False
    )
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for offset, r in enumerate(mine):
            blocks = range(len(r["live_heads"]))
            shift = 0.06 * (offset - (len(mine) - 1) / 2)  # overlapping lines stay visible
            ax.plot([b + shift for b in blocks], r["live_heads"], marker="o", label=r["method"])
        ax.set_title(f"{model}: kept heads per block")
        ax.set_xlabel("block")
        ax.set_ylabel("kept query heads")
        ax.set_xticks(range(len(mine[0]["live_heads"])))
        ax.set_ylim(bottom=-0.2)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def write_outputs(workdir: Path, rows: list[dict]) -> None:
    (workdir / "transformer_table.json").write_text(json.dumps(rows, indent=2) + "\n")
    (workdir / "transformer_table.md").write_text(markdown(rows))
    plot_heads(rows, workdir / "transformer_heads.png")


def lm_summary(config: ml_collections.ConfigDict, run_dir: Path, summary: dict) -> dict:
    """The LM fields of :func:`experiments.lm.summarize`, imported here: importing the module
    defines the command lines' flags, which other benchmarks define too."""
    from experiments import lm

    return lm.summarize(config, run_dir, summary)


def main(argv: list[str]) -> None:
    del argv
    workdir = Path(_RUNS.value)
    epochs = {"vit_tiny": _VIT_EPOCHS.value, "lm_tiny": _LM_EPOCHS.value}
    targets = {"vit_tiny": _VIT_TARGET.value, "lm_tiny": _LM_TARGET.value}
    steps = {"vit_tiny": _VIT_STEPS.value, "lm_tiny": None}
    rows = []
    for model in _MODELS.value:
        for method in _METHODS.value:
            run_dir = workdir / model / method
            config = run_config(method, model, epochs[model], targets[model],
                                steps_per_epoch=steps[model])
            if not (run_dir / SUMMARY_FILE).exists():
                if _REPORT_ONLY.value:
                    continue
                logging.info("training %s", run_dir)
                train_and_evaluate(config, run_dir)
            summary = json.loads((run_dir / SUMMARY_FILE).read_text())
            if model == "lm_tiny" and "test_perplexity" not in summary:
                summary = lm_summary(config, run_dir, summary)
            row = row_of(model, method, summary)
            if method != "dense" and any(s.endswith(".kv_groups") for s in summary["gate_slots"]):
                row["live_heads"] = run_live_heads(run_dir, len(row["heads"])) or row["heads"]
            rows.append(row)
            write_outputs(workdir, rows)


if __name__ == "__main__":
    app.run(main)
