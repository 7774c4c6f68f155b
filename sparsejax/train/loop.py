"""The training loop: data on device, jitted chunks of steps, per-epoch evaluation, gate
reports, metrics, checkpoints and a final ``summary.json``.

A run is a function of its config: restarted with the same working directory it resumes from
the last completed epoch and ends exactly where an uninterrupted run ends (the minibatch order of
an epoch is a pure function of the seed and the epoch number, a step's gate noise of the seed and
the step number).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sparsejax.data import ArrayDataset, load_dataset
from sparsejax.methods import create_method
from sparsejax.models import build_model
from sparsejax.slim.report import GateReport, gate_report
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.metrics import MetricWriter
from sparsejax.train.progress import Progress
from sparsejax.train.state import init_state, merge_model
from sparsejax.train.step import make_evaluate, make_train_step

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
RESUMABLE_CHANGES = ("epochs", "data_dir")
"""Config fields that may differ when a run is resumed."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def _check_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    path = workdir / CONFIG_FILE
    current = json.loads(config.to_json_best_effort())
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(
            key
            for key in set(saved) | set(current)
            if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)
        )
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise ValueError(
                f"{workdir} holds a run with a different configuration ({details}); "
                "use another --workdir, or the same flags to resume it"
            )
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")


def _load_data(config: ml_collections.ConfigDict) -> ArrayDataset:
    return load_dataset(
        config.dataset,
        data_dir=config.get("data_dir"),
        seed=config.seed,
        num_train=config.get("num_train"),
        num_test=config.get("num_test"),
    )


def _report_record(report: GateReport) -> dict:
    return {
        "sparsity/active_units": report.active_units,
        "sparsity/expected_l0": report.expected_l0,
        "sparsity/expected_flops": report.expected_flops,
        "sparsity/params": report.params,
        "sparsity/flops": report.flops,
        "sparsity/pruning_rate": report.pruning_rate,
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train ``config.model`` with ``config.method`` on ``config.dataset``; return the summary
    (also written to ``workdir/summary.json``)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = _load_data(config)
    method = create_method(config.method, config, num_train=data.num_train)
    model = build_model(
        config.model,
        rngs=nnx.Rngs(params=config.seed),
        num_classes=data.num_classes,
        input_shape=data.image_shape,
        gate_factory=method.make_gate,
        granularity=config.granularity,
    )
    method.prepare_model(model)
    _check_config(workdir, config)

    batch_size = config.batch_size
    if batch_size > data.num_train:
        raise ValueError(f"batch_size {batch_size} exceeds the {data.num_train} training examples")
    steps_per_epoch = data.num_train // batch_size
    if config.get("steps_per_epoch"):
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)

    tx = method.optimizer()
    root_key = jax.random.key(config.seed)
    graphdef, state = init_state(model, tx, jax.random.fold_in(root_key, 0))
    data_key = jax.random.fold_in(root_key, 1)
    train_step = make_train_step(graphdef, method, tx)
    evaluate = make_evaluate(graphdef, config.eval_batch_size)
    train_x, train_y = jnp.asarray(data.train_images), jnp.asarray(data.train_labels)
    test_x, test_y = jnp.asarray(data.test_images), jnp.asarray(data.test_labels)

    checkpointer = Checkpointer(workdir)
    progress_record = {"epoch": 0, "test_errors": [], "epoch_seconds": []}
    restored = checkpointer.restore(state)
    if restored is not None:
        state, progress_record = restored
    start_epoch = progress_record["epoch"]

    writer = MetricWriter(workdir)
    progress = Progress(config.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch)
    if start_epoch:
        progress.message(f"resuming {workdir} after epoch {start_epoch}")
    try:
        for epoch in range(start_epoch, config.epochs):
            order = jax.random.permutation(jax.random.fold_in(data_key, epoch), data.num_train)
            batches = order[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
            started = time.perf_counter()
            for first in range(0, steps_per_epoch, config.log_every):
                chunk_started = time.perf_counter()
                chunk = []
                for index in range(first, min(first + config.log_every, steps_per_epoch)):
                    state, step_metrics = train_step(state, batches[index], train_x, train_y)
                    chunk.append(step_metrics)
                metrics = {k: np.array([m[k] for m in jax.device_get(chunk)]) for k in chunk[0]}
                means = {k: float(np.mean(v)) for k, v in metrics.items()}
                steps = len(chunk)
                elapsed = time.perf_counter() - chunk_started
                if not np.all(np.isfinite(metrics["loss"])):
                    raise NonFiniteLossError(
                        f"the training loss became {means['loss']} within steps "
                        f"{int(state.step) - steps + 1}-{int(state.step)} (epoch {epoch + 1}); "
                        f"the last good checkpoint is in {checkpointer.directory}"
                    )
                writer.write(
                    int(state.step),
                    {
                        "epoch": epoch + (first + steps) / steps_per_epoch,
                        **{f"train/{k}": v for k, v in means.items()},
                        "train/steps_per_second": steps / elapsed,
                        "train/examples_per_second": steps * batch_size / elapsed,
                    },
                )
                progress.update(steps, f"loss {means['loss']:.4f} err {100 * means['err']:.2f}%")
            epoch_seconds = time.perf_counter() - started

            evaluation = jax.device_get(evaluate(state, test_x, test_y))
            report = gate_report(merge_model(graphdef, state.params, state.model_state))
            test_error = float(evaluation["err"])
            progress_record = {
                "epoch": epoch + 1,
                "test_errors": [*progress_record["test_errors"], test_error],
                "epoch_seconds": [*progress_record["epoch_seconds"], epoch_seconds],
            }
            writer.write(
                int(state.step),
                {
                    "epoch": epoch + 1,
                    "eval/err": test_error,
                    "eval/loss": float(evaluation["loss"]),
                    "epoch_seconds": epoch_seconds,
                    **_report_record(report),
                },
            )
            writer.histograms(
                int(state.step), {f"gates/{k}": v for k, v in report.test_gates.items()}
            )
            progress.message(
                f"epoch {epoch + 1}/{config.epochs}: test error {test_error:.2f}%, "
                f"architecture {report.architecture}, pruning rate {report.pruning_rate:.1f}%"
            )
            checkpointer.save(epoch + 1, state, progress_record)
    finally:
        progress.close()
        writer.close()
        checkpointer.close()

    report = gate_report(merge_model(graphdef, state.params, state.model_state))
    summary = _summary(config, data, report, progress_record, steps_per_epoch)
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _summary(config, data: ArrayDataset, report: GateReport, progress: dict, steps: int) -> dict:
    errors = progress["test_errors"]
    return {
        "method": config.method,
        "model": config.model,
        "dataset": data.name,
        "data_source": data.source,
        "epochs": config.epochs,
        "steps_per_epoch": steps,
        "batch_size": config.batch_size,
        "test_error": errors[-1] if errors else None,
        "best_test_error": min(errors) if errors else None,
        "active_units": list(report.active_units.values()),
        "architecture": report.architecture,
        "gate_slots": list(report.active_units),
        "dense_units": list(report.slot_sizes.values()),
        "pruning_rate": report.pruning_rate,
        "expected_l0": report.expected_l0,
        "expected_flops": report.expected_flops,
        "flops": report.flops,
        "dense_flops": report.dense_flops,
        "params": report.params,
        "dense_params": report.dense_params,
        "seconds_per_epoch": statistics.median(progress["epoch_seconds"])
        if progress["epoch_seconds"]
        else None,
        "num_devices": jax.device_count(),
    }
