import json

import jax.numpy as jnp
import numpy as np

from benchmarks.greg_table import (
    AROUND_PRUNING_FILE,
    dense_config,
    greg_config,
    greg_row,
)
from sparsejax.train import train_and_evaluate
from sparsejax.train.loop import load_data
from sparsejax.train.replay import replay

TINY = {
    "dataset": "synthetic", "num_train": 512, "num_test": 128, "batch_size": 64,
    "eval_batch_size": 128, "log_every": 4,
}
SCHEDULE = {"greg_interval": 1, "greg_delta": 0.5, "greg_stabilise_steps": 3}
"""lambda passes tau = 1 at iteration 2; pruned after update 2 + 3 = 5, inside the first epoch."""


def test_errors_around_pruning_are_those_of_the_runs_networks(tmp_path):
    train_and_evaluate(dense_config("mlp", 1, **TINY), tmp_path / "dense")
    config = greg_config("mlp", "greg1", 0.5, tmp_path / "dense", 1, **TINY, **SCHEDULE)
    summary = train_and_evaluate(config, tmp_path / "greg1")
    row = greg_row(summary, config, tmp_path / "greg1")
    assert row["prune_step"] == 5 and row["phase"] == "finetune" and row["epochs"] == "1+1"
    assert row["widths"] == row["after_widths"] == {"fc1": 150, "fc2": 50}
    assert row["best_err"] <= row["last_err"] == summary["test_error"]

    before, after = replay(config, tmp_path / "greg1", [5, 6])
    assert (before.err, after.err) == (row["before_err"], row["after_err"])
    images, labels = load_data(config).test_batch(np.arange(128))
    for snapshot in (before, after):  # the error is that of the snapshot's network
        wrong = jnp.argmax(snapshot.model(images, train=False), -1) != labels
        assert np.isclose(100.0 * float(jnp.mean(wrong)), snapshot.err)
    largest = 0.0
    for i, name in enumerate(("fc1", "fc2")):
        pruned = np.asarray(after.method_state["layers"][i]["selected"])
        assert pruned.sum() == {"fc1": 150, "fc2": 50}[name]
        layer = after.model.layer_module(name)
        assert np.all(np.asarray(layer.kernel[...])[:, pruned] == 0.0)
        assert np.all(np.asarray(layer.bias[...])[pruned] == 0.0)
        unpruned = np.abs(np.asarray(before.model.layer_module(name).kernel[...])[:, pruned])
        largest = max(largest, float(unpruned.max()))
    assert row["pruned_max"] == largest > 0.0
    cached = json.loads((tmp_path / "greg1" / AROUND_PRUNING_FILE).read_text())
    assert cached["after_err"] == row["after_err"]
