"""The GReg results table: GReg-1 and GReg-2 on LeNet-300-100 and LeNet-5-Caffe, Fashion-MNIST.

    python -m benchmarks.greg_table --models=mlp,lenet5 --ratios=0.5,0.8 \
        --workdir=runs/greg_table

Per model, one ``dense`` run (``pretrain_epochs`` epochs; None: GReg's default for the model)
gives the pretrained network that every GReg run of that model starts from
(``config.pretrained``). Each GReg run (filter/neuron granularity, every prunable layer at
``ratio``, the model's schedule defaults) regularises, stabilises and prunes at GReg's
``lr_prune``, then fine-tunes for ``fine_tune_epochs`` on a fresh optimizer at ``lr_ft``. All runs are resumable under ``workdir``. Test errors reported:

- pretrained: the dense run's network (where every GReg run starts);
- before pruning: the run's network after the last update before the prune step p, i.e. after
  p updates (``greg/prune_step`` is the 0-based index of the update whose end prunes);
- after pruning: the network after update p, whose end zeroes the pruned groups: the first
  pruned network, before any fine-tuning update;
- fine-tuned: at the end of the run, and the best epoch-end error after pruning.

Before and after pruning fall inside an epoch; they are replayed exactly from the run's last
checkpoint before p (:func:`sparsejax.train.replay.replay`; the runs keep every epoch's
checkpoint). How close to zero the pruned groups were: the largest |w| of their kernel slices
right before pruning, next to the mean |w| of the kept ones. Widths, kernel weights and FLOPs
are GReg's counter (:func:`~sparsejax.methods.greg.report.traced_pruned_size`: Conv/Linear weights,
FLOPs = 2 x multiply-adds).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
from absl import app, flags, logging

from experiments.configs.mnist import get_config
from sparsejax.methods import RunInfo
from sparsejax.methods.greg import FIELDS, GReg, greg_progress
from sparsejax.models.base import GatedModel
from sparsejax.train import train_and_evaluate
from sparsejax.train.config import resolve_config
from sparsejax.train.metrics import METRICS_FILE
from sparsejax.train.replay import replay

_MODELS = flags.DEFINE_list("models", ["mlp", "lenet5"], "Models.")
_METHODS = flags.DEFINE_list("methods", ["greg1", "greg2"], "GReg variants.")
_RATIOS = flags.DEFINE_list("ratios", ["0.5", "0.8"], "Pruning ratios (stage_pr) of every layer.")
_FINE_TUNE_EPOCHS = flags.DEFINE_integer(
    "fine_tune_epochs", None, "Fine-tuning epochs of every GReg run; None: GReg's default."
)
_PRETRAIN_EPOCHS = flags.DEFINE_integer(
    "pretrain_epochs", None, "Epochs of the dense pretraining; None: GReg's default per model."
)
_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "Dataset.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/greg_table", "Parent directory of runs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every run.")

AROUND_PRUNING_FILE = "around_pruning.json"
"""Per GReg run: test errors right before and right after its prune step (replayed once)."""


def dense_config(model: str, epochs: int, **overrides) -> ml_collections.ConfigDict:
    """The pretraining run of ``model``."""
    config = get_config("dense")
    config.update(model=model, epochs=epochs, **overrides)
    return config


KEEP_CHECKPOINTS = 1000
"""Every epoch's checkpoint of a GReg run is kept: the replay of the prune step starts from the
one before it."""


def greg_config(
    model: str, method: str, ratio: float, pretrained: Path, fine_tune_epochs: int | None,
    **overrides,
) -> ml_collections.ConfigDict:
    """A GReg run from the network of the run in ``pretrained`` (``fine_tune_epochs`` None:
    GReg's default for the model)."""
    config = get_config(method)
    config.update(
        model=model, stage_pr=ratio, pretrained=str(pretrained.absolute()),
        pretrain_epochs=0, fine_tune_epochs=fine_tune_epochs, keep_checkpoints=KEEP_CHECKPOINTS,
        **overrides,
    )
    return config


def around_pruning(config: ml_collections.ConfigDict, workdir: Path, prune_step: int) -> dict:
    """Test errors of the run's network after ``prune_step`` updates (before pruning) and after
    ``prune_step + 1`` (the pruned network), replayed once and cached in the workdir."""
    cache = workdir / AROUND_PRUNING_FILE
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached["prune_step"] == prune_step and "pruned_max" in cached:
            return cached
    before, after = replay(config, workdir, [prune_step, prune_step + 1])
    method_cls, resolved = resolve_config(config)
    method: GReg = method_cls(resolved, RunInfo(num_train=1))
    names = [layer.name for layer in method.pruned_layers(before.model)]
    kept = method.kept_channels(after.model, after.method_state)
    result = {
        "prune_step": prune_step,
        "before_err": before.err,
        "after_err": after.err,
        "before_phase": greg_progress(before.method_state, names)["phase"],
        "after_widths": {name: len(channels) for name, channels in kept.items()},
        **group_magnitudes(before.model, before.method_state, names),
    }
    cache.write_text(json.dumps(result, indent=2) + "\n")
    return result


def group_magnitudes(model: GatedModel, state: dict, names: list[str]) -> dict[str, float]:
    """``pruned_max``: the largest |w| in the kernel slices of the groups GReg prunes (over
    every pruned layer ``names``); ``kept_mean``: the mean |w| of the kept groups' slices."""
    pruned, kept = [], []
    for name, layer in zip(names, state["layers"]):
        magnitude = np.abs(np.asarray(model.layer_module(name).kernel[...]))
        selected = np.asarray(layer["selected"])
        pruned.append(magnitude[..., selected].ravel())
        kept.append(magnitude[..., ~selected].ravel())
    return {
        "pruned_max": float(np.max(np.concatenate(pruned))),
        "kept_mean": float(np.mean(np.concatenate(kept))),
    }


def epoch_records(workdir: Path) -> list[dict]:
    """The end-of-epoch records of the run in ``workdir`` (the last one of each step: a
    resumed epoch is written again)."""
    records = [json.loads(line) for line in (workdir / METRICS_FILE).read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "eval/err" in r}
    return [by_step[step] for step in sorted(by_step)]


def greg_row(summary: dict, config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """One table row: the errors around pruning and after fine-tuning, sizes and seconds."""
    records = epoch_records(workdir)
    row = {
        "model": config.model, "method": config.method, "ratio": config.stage_pr,
        "phase": summary["greg/phase"], "prune_step": summary["greg/prune_step"],
        "last_err": summary["test_error"],
        "seconds": sum(r["epoch_seconds"] for r in records),
        "epochs": "+".join(str(phase["epochs"]) for phase in summary["phases"]),
        **{key: summary[f"greg/{key}"] for key in ("widths", "weights", "dense_weights",
                                                  "flops", "dense_flops", "speedup")},
    }
    if row["prune_step"] is None:
        return row
    row.update(around_pruning(config, workdir, row["prune_step"]))
    if row["after_widths"] != row["widths"] or row["before_phase"] != "stabilise":
        raise RuntimeError(
            f"the replay of {workdir} does not match the run: widths {row['after_widths']} "
            f"(run: {row['widths']}), phase before pruning {row['before_phase']}"
        )
    row["best_err"] = min(r["eval/err"] for r in records if r["step"] > row["prune_step"])
    return row


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    parent = Path(_WORKDIR.value)
    rows, pretrained_rows = [], []
    for model in _MODELS.value:
        pretrain_epochs = _PRETRAIN_EPOCHS.value or FIELDS["pretrain_epochs"].default_for(model)
        common = {"dataset": _DATASET.value, "seed": _SEED.value}
        dense_workdir = parent / f"{model}_dense"
        dense = train_and_evaluate(dense_config(model, pretrain_epochs, **common), dense_workdir)
        pretrained_rows.append((model, pretrain_epochs, dense))
        print(f"{model} pretrained: {dense['test_error']:.2f}% after {pretrain_epochs} epochs",
              flush=True)
        for method in _METHODS.value:
            for ratio in map(float, _RATIOS.value):
                config = greg_config(
                    model, method, ratio, dense_workdir, _FINE_TUNE_EPOCHS.value, **common
                )
                workdir = parent / f"{model}_{method}_pr{ratio:g}"
                summary = train_and_evaluate(config, workdir)
                row = greg_row(summary, config, workdir)
                row["pretrained_err"] = dense["test_error"]
                rows.append(row)
                print(_row(row), flush=True)
    fine_tuning = _FINE_TUNE_EPOCHS.value or "GReg's default"
    print(f"\n{_DATASET.value}, seed {_SEED.value}; GReg runs from the pretrained network, "
          f"fine-tuning epochs: {fine_tuning}\n")
    for model, epochs, dense in pretrained_rows:
        print(f"- {model} pretrained (dense, {epochs} epochs, {_seconds(dense):.0f} s): "
              f"{dense['test_error']:.2f}% error, architecture {dense['architecture']}")
    print("\n| model | method | ratio | pretrained err % | before pruning err % "
          "| after pruning err % | fine-tuned err % (last / best) | pruned max abs w / kept mean "
          "| kept widths "
          "| weights (pruned / dense) | MFLOPs (pruned / dense) | speedup | prune step | epochs (reg. + tuning) | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_row(row))


def _seconds(summary: dict) -> float:
    """Training seconds of a run (median epoch x epochs)."""
    return summary["seconds_per_epoch"] * summary["epochs"]


def _row(r: dict) -> str:
    if r["prune_step"] is None:
        return (f"| {r['model']} | {r['method']} | {r['ratio']:g} | {r['pretrained_err']:.2f} "
                f"| not pruned: the run ended in phase {r['phase']} "
                f"| | {r['last_err']:.2f} | | | | | | | {r['epochs']} | {r['seconds']:.0f} |")
    widths = "-".join(str(width) for width in r["widths"].values())
    return (
        f"| {r['model']} | {r['method']} | {r['ratio']:g} | {r['pretrained_err']:.2f} "
        f"| {r['before_err']:.2f} | {r['after_err']:.2f} "
        f"| {r['last_err']:.2f} / {r['best_err']:.2f} "
        f"| {r['pruned_max']:.1e} / {r['kept_mean']:.1e} | {widths} "
        f"| {int(r['weights']):,} / {int(r['dense_weights']):,} "
        f"| {r['flops'] / 1e6:.3f} / {r['dense_flops'] / 1e6:.3f} | {r['speedup']:.2f}x "
        f"| {r['prune_step']} | {r['epochs']} | {r['seconds']:.0f} |"
    )


if __name__ == "__main__":
    app.run(main)
