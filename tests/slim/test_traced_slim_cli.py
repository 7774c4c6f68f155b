"""``python -m sparsejax.slim`` on a ``--model=MODULE:FACTORY`` run: the trained model slimmed
from its trace into a function that loads without the model's class (sparsejax.slim.traced)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparsejax
from experiments.configs import mnist
from sparsejax.slim import __main__ as cli
from sparsejax.slim.runs import restore_model, run_config
from sparsejax.slim.store import SLIM_FUNCTION_FILE, SLIM_REPORT_FILE
from sparsejax.slim.traced import check_images
from sparsejax.train import train_and_evaluate
from sparsejax.train.loop import SUMMARY_FILE, load_data
from tests.slim.test_slim_cli import eval_logits, restore_changed
from tests.structure.test_traced_model import PixelMLP, ViT

THIS_MODULE = Path(__file__).stem


class TinyCNN(nnx.Module):
    """conv 3x3/2 (BatchNorm) -> conv 3x3/2 -> flatten -> dense -> logits."""

    def __init__(self, *, rngs: nnx.Rngs, num_classes: int):
        self.conv1 = nnx.Conv(1, 12, (3, 3), strides=2, rngs=rngs)
        self.bn = nnx.BatchNorm(12, rngs=rngs)
        self.conv2 = nnx.Conv(12, 10, (3, 3), strides=2, rngs=rngs)
        self.fc1 = nnx.Linear(7 * 7 * 10, 20, rngs=rngs)
        self.fc2 = nnx.Linear(20, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.bn(self.conv1(x)))
        h = jax.nn.relu(self.conv2(h))
        return self.fc2(jax.nn.relu(self.fc1(h.reshape(h.shape[0], -1))))


def tiny_cnn(*, rngs: nnx.Rngs, num_classes: int) -> TinyCNN:
    return TinyCNN(rngs=rngs, num_classes=num_classes)


def vit(*, rngs: nnx.Rngs, num_classes: int) -> ViT:
    return ViT(rngs=rngs, num_classes=num_classes)


def pixel_mlp(*, rngs: nnx.Rngs, num_classes: int) -> PixelMLP:
    return PixelMLP(rngs=rngs, num_classes=num_classes)


class FlatViT(nnx.Module):
    """16 patches -> dense embedding -> attention of 4 heads of 4 on flat (16, 16) projections
    (head-major) -> a GELU MLP, residual both -> mean over tokens -> logits; gated by head and
    by MLP unit, as its own placements say."""

    gate_placements = (
        sparsejax.GatePlacement("heads", "q", "output", heads=4),
        sparsejax.GatePlacement("heads", "v", "output", heads=4),
        sparsejax.GatePlacement("mlp", "up", "output", whole_unit=True),
    )

    def __init__(self, *, rngs: nnx.Rngs, num_classes: int):
        self.embed = nnx.Linear(49, 16, rngs=rngs)
        self.q, self.k, self.v, self.o = (nnx.Linear(16, 16, rngs=rngs) for _ in range(4))
        self.up, self.down = nnx.Linear(16, 24, rngs=rngs), nnx.Linear(24, 16, rngs=rngs)
        self.head = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b = x.shape[0]
        h = self.embed(x.reshape(b, 4, 7, 4, 7).transpose(0, 1, 3, 2, 4).reshape(b, 16, 49))
        q, k, v = (layer(h).reshape(b, 16, 4, 4) for layer in (self.q, self.k, self.v))
        weights = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / 2.0)
        h = h + self.o(jnp.einsum("bhts,bshd->bthd", weights, v).reshape(b, 16, 16))
        h = h + self.down(jax.nn.gelu(self.up(h)))
        return self.head(h.mean(axis=1))


def flat_vit(*, rngs: nnx.Rngs, num_classes: int) -> FlatViT:
    return FlatViT(rngs=rngs, num_classes=num_classes)


def train_tiny_cnn(
    workdir: Path, factory: str = "tiny_cnn", method: str = "l0_hc", **overrides
) -> Path:
    """Two L0-HC steps (or ``method``'s) of the tiny CNN (or another ``factory`` of this
    module), given as MODULE:FACTORY, on synthetic MNIST-shaped data."""
    config = mnist.get_config()
    config.update({
        "method": method, "model": f"{THIS_MODULE}:{factory}", "dataset": "synthetic",
        "num_train": 64, "num_test": 48, "batch_size": 32, "eval_batch_size": 48, "epochs": 1,
        "steps_per_epoch": 2, "log_every": 1, "input_threads": 1, **overrides,
    })
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(Path(__file__).parent))
        train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_cnn(tmp_path_factory.mktemp("traced_run"))


def set_gates(model) -> None:
    """log_alpha uniform in [-3, 3] (test gates of 0, in (0, 1) and 1), every third unit
    closed: the trained gates of two steps are all open."""
    rng = np.random.default_rng(0)
    for gate in model.gates.values():
        log_alpha = rng.uniform(-3.0, 3.0, gate.log_alpha.shape)
        log_alpha[::3] = -10.0
        gate.log_alpha[...] = jnp.asarray(log_alpha, jnp.float32)


@pytest.fixture
def gates_set(monkeypatch):
    restore_changed(monkeypatch, set_gates)


def gated_run(run_dir):
    """The run's model with :func:`set_gates`, and its first test images."""
    config = run_config(run_dir)
    data = load_data(config)
    model, _, _ = restore_model(run_dir, config, data)
    set_gates(model)
    return model, check_images(data)


def test_the_slim_function_of_a_model_run_gives_the_gated_logits_on_test_data(
    run_dir, gates_set, tmp_path, capsys
):
    output = tmp_path / "slim"
    assert cli.main([str(run_dir), "--output", str(output)]) == 0
    assert "| params |" in capsys.readouterr().out
    report = json.loads((output / SLIM_REPORT_FILE).read_text())
    slim = sparsejax.load_slim_function(str(output / SLIM_FUNCTION_FILE))

    model, images = gated_run(run_dir)
    assert images.shape == (48, 28, 28, 1)
    expected = np.asarray(eval_logits(model, images))
    difference = float(np.max(np.abs(np.asarray(slim(images)) - expected)))
    assert difference <= 1e-5
    assert report["max_logit_difference"] == pytest.approx(difference, abs=1e-6)

    open_units = {
        group: np.asarray(model.gates[name].test_gate()) > 0 for group, name in model.group_slots
    }
    assert {int(g): w for g, w in report["widths"].items()} == {
        g.index: int(open_units[g.index].sum()) if g.index in open_units else g.size
        for g in model.structure.groups
    }
    kept = model.structure.count({g: m.astype(np.float64) for g, m in open_units.items()})
    assert (report["params_after"], report["flops_after"]) == (kept.params, kept.flops)
    assert report["params_after"] < report["params_before"] == model.structure.count().params
    assert report["round_to"] == 1
    (conv1,) = [g.index for g in model.structure.groups if ("conv1.kernel", 3) in g.producers]
    assert slim.params["conv1.kernel"].shape == (3, 3, 1, int(open_units[conv1].sum()))
    assert slim.params["bn.mean"].shape == (int(open_units[conv1].sum()),)


def test_round_to_keeps_multiples_of_eight_with_the_same_logits(run_dir, gates_set, tmp_path):
    output = tmp_path / "slim"
    assert cli.main([str(run_dir), "--output", str(output), "--round_to", "8"]) == 0
    report = json.loads((output / SLIM_REPORT_FILE).read_text())
    assert report["round_to"] == 8
    for group in report["groups"]:
        assert group["width"] % 8 == 0 or group["width"] == group["size"]
        assert group["width"] >= group["open"]
    assert any(g["width"] > g["open"] for g in report["groups"])
    slim = sparsejax.load_slim_function(str(output / SLIM_FUNCTION_FILE))
    model, images = gated_run(run_dir)
    np.testing.assert_allclose(slim(images), eval_logits(model, images), atol=1e-5, rtol=1e-5)
    assert report["max_logit_difference"] <= 1e-5


def slimmed_with_gates_set(tmp_path, monkeypatch, factory: str):
    """A run of ``factory`` slimmed by the command with :func:`set_gates`, checked to give the
    gated logits: the gated model, the slim function, its report and the open gates."""
    run_dir = train_tiny_cnn(tmp_path / "run", factory)
    restore_changed(monkeypatch, set_gates)
    output = tmp_path / "slim"
    assert cli.main([str(run_dir), "--output", str(output)]) == 0
    report = json.loads((output / SLIM_REPORT_FILE).read_text())
    slim = sparsejax.load_slim_function(str(output / SLIM_FUNCTION_FILE))
    model, images = gated_run(run_dir)
    np.testing.assert_allclose(slim(images), eval_logits(model, images), atol=1e-5, rtol=1e-5)
    assert report["max_logit_difference"] <= 1e-5
    gates = {name: np.asarray(model.gates[name].test_gate()) > 0 for name in model.gates}
    return model, slim, report, gates


def test_a_vision_transformer_run_loses_heads_and_keeps_its_logits(tmp_path, monkeypatch):
    model, slim, report, gates = slimmed_with_gates_set(tmp_path, monkeypatch, "vit")
    heads, head_dims = gates["attention.query.axis1"].sum(), gates["attention.query.axis2"].sum()
    assert 0 < heads < 4 and 0 < head_dims < 4
    assert slim.params["attention.query.kernel"].shape == (16, heads, head_dims)
    assert slim.params["attention.out.kernel"].shape == (
        heads, gates["attention.value"].sum(), 16)
    assert slim.params["up.kernel"].shape == (16, gates["up"].sum())
    kept = model.structure.count(
        {g: gates[name].astype(np.float64) for g, name in model.group_slots if name != "embed"})
    assert (report["params_after"], report["flops_after"]) == (kept.params, kept.flops)


def test_a_run_with_placed_heads_slims_its_closed_heads_away(tmp_path, monkeypatch):
    """A model's own head placements on flat projections: one gate per head, and a closed
    head leaves the query, key and value projections and the output projection's rows."""
    model, slim, report, gates = slimmed_with_gates_set(tmp_path, monkeypatch, "flat_vit")
    assert [slot.shape for slot in model.gate_slots] == [(4,), (24,)]
    width = 4 * gates["heads"].sum()
    assert 0 < width < 16
    for name in ("q", "k", "v"):
        assert slim.params[f"{name}.kernel"].shape == (16, width)
    assert slim.params["o.kernel"].shape == (width, 16)
    assert slim.params["up.kernel"].shape == (16, gates["mlp"].sum())
    kept = model.structure.count(model.group_values(
        {name: gates[name].astype(np.float64) for name in gates}))
    assert (report["params_after"], report["flops_after"]) == (kept.params, kept.flops)


@pytest.mark.parametrize("value", ["0", "-8", "eight"])
def test_a_bad_round_to_is_one_line(value, run_dir, tmp_path, capsys):
    assert cli.main([str(run_dir), "--output", str(tmp_path / "slim"), "--round_to", value]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: --round_to must be a positive integer (the multiple slim widths "
                     f"are rounded up to, e.g. 8), got {value!r}"]
    assert not (tmp_path / "slim").exists()


def test_a_model_run_without_checkpoint_or_module_or_with_a_slim_output_says_so(
    run_dir, tmp_path, capsys
):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "config.json", bare / "config.json")
    assert cli.main([str(bare)]) == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: the run in") and "has no checkpoint" in message
    assert "train it for at least one epoch first" in message

    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    config = json.loads((moved / "config.json").read_text())
    config["model"] = "no_such_module:tiny_cnn"
    (moved / "config.json").write_text(json.dumps(config))
    assert cli.main([str(moved)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot import module 'no_such_module'" in lines[0]
    assert "put that directory on PYTHONPATH" in lines[0]

    output = tmp_path / "slim"
    output.mkdir()
    (output / SLIM_FUNCTION_FILE).write_bytes(b"")
    assert cli.main([str(run_dir), "--output", str(output)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {output / SLIM_FUNCTION_FILE} exists")


def test_a_run_whose_gates_all_closed_slims_to_the_bias_of_the_logits(
    run_dir, tmp_path, monkeypatch
):
    def close_all(model):
        for gate in model.gates.values():
            gate.log_alpha[...] = jnp.full(gate.log_alpha.shape, -10.0)

    restore_changed(monkeypatch, close_all)
    output = tmp_path / "slim"
    assert cli.main([str(run_dir), "--output", str(output), "--round_to", "4"]) == 0
    report = json.loads((output / SLIM_REPORT_FILE).read_text())
    assert report["flops_after"] == 0 and report["flops_ratio"] == float("inf")
    slim = sparsejax.load_slim_function(str(output / SLIM_FUNCTION_FILE))
    model, images = gated_run(run_dir)
    bias = np.asarray(model.net.fc2.bias[...])
    np.testing.assert_allclose(slim(images), np.broadcast_to(bias, (len(images), bias.size)))
    assert report["params_after"] == bias.size


def test_units_whose_weight_gates_all_closed_on_every_reading_row_go(
    tmp_path, monkeypatch, capsys
):
    run = train_tiny_cnn(tmp_path / "run", granularity="weight")

    def close_rows(model):
        conv2 = model.gates["conv2"].log_alpha  # rows of conv1's (BatchNorm) channels 0, 3, 6, 9
        conv2[...] = conv2[...].at[:, :, ::3, :].set(-10.0)
        fc1 = model.gates["fc1"].log_alpha  # rows of conv2's channel 1 (channel fastest)
        fc1[...] = fc1[...].at[1::10, :].set(-10.0)
        fc1[...] = fc1[...].at[2:40:10, :].set(-10.0)  # some of channel 2's rows only: it stays

    restore_changed(monkeypatch, close_rows)
    output = tmp_path / "slim"
    assert cli.main([str(run), "--output", str(output)]) == 0
    assert "widths per traced group (kept/size): 8/12-9/10-20/20-10/10" in capsys.readouterr().out
    slim = sparsejax.load_slim_function(str(output / SLIM_FUNCTION_FILE))
    assert slim.params["conv2.kernel"].shape == (3, 3, 8, 9)
    assert slim.params["fc1.kernel"].shape == (7 * 7 * 9, 20)

    config = run_config(run)
    data = load_data(config)
    model, _, _ = restore_model(run, config, data)
    close_rows(model)
    images = check_images(data)
    np.testing.assert_allclose(slim(images), eval_logits(model, images), atol=1e-5, rtol=0)


GREG_FILTERS = {
    "greg_granularity": "filter", "pretrain_epochs": 0, "stage_pr": "conv1:0.5,fc1:0.25",
    "greg_stabilise_steps": 1, "greg_delta": 1.0, "fine_tune_epochs": 1, "lr_ft": "0:0.001",
    "epochs": None,
}


GMP_UNITS = {
    "gmp_structure": "unit", "final_sparsity": 0.5, "prune_every": 1, "prune_end_epoch": 1.0,
}


@pytest.mark.parametrize(
    "method, overrides, widths",
    [
        ("greg1", GREG_FILTERS, {"conv1": 6, "conv2": 10, "fc1": 15}),
        ("gmp", GMP_UNITS, {"conv1": 6, "conv2": 5, "fc1": 10}),
    ],
)
def test_a_run_pruning_units_by_zeroing_slims_to_the_units_it_pruned(
    method, overrides, widths, tmp_path
):
    """GReg-1 at filter granularity (conv1 behind its BatchNorm and fc1, as stage_pr names
    them) and gmp by units (every slot) prune the traced groups; slimming removes exactly those
    units and keeps the run's logits."""
    run = train_tiny_cnn(tmp_path / "run", method=method, **overrides)
    summary = json.loads((run / SUMMARY_FILE).read_text())
    output = tmp_path / "slim"
    assert cli.main([str(run), "--output", str(output)]) == 0
    slim = sparsejax.load_slim_function(str(output / SLIM_FUNCTION_FILE))
    assert slim.params["conv1.kernel"].shape == (3, 3, 1, widths["conv1"])
    assert slim.params["bn.scale"].shape == (widths["conv1"],)
    assert slim.params["conv2.kernel"].shape == (3, 3, widths["conv1"], widths["conv2"])
    assert slim.params["fc1.kernel"].shape == (7 * 7 * widths["conv2"], widths["fc1"])
    config = run_config(run)
    data = load_data(config)
    model, _, _ = restore_model(run, config, data)
    images = check_images(data)
    np.testing.assert_allclose(slim(images), eval_logits(model, images), atol=1e-5, rtol=0)
    report = json.loads((output / SLIM_REPORT_FILE).read_text())
    assert report["params_after"] == pytest.approx(summary["params"])


def close_the_first_100_pixels(model) -> None:
    pixels = model.gates["pixels"].log_alpha
    pixels[...] = jnp.where(jnp.arange(784) < 100, -10.0, 10.0)


def test_a_run_with_placed_pixel_gates_slims_its_closed_pixels_away(
    tmp_path, monkeypatch, capsys
):
    """The model's own placements (pixels an input selection of fc1): the command takes the
    closed pixels' rows out, says so, and records them in the report."""
    run = train_tiny_cnn(tmp_path / "run", factory="pixel_mlp")
    restore_changed(monkeypatch, close_the_first_100_pixels)
    output = tmp_path / "slim"
    assert cli.main([str(run), "--output", str(output)]) == 0
    assert "rows of fc1.kernel kept: 684/784" in capsys.readouterr().out
    slim = sparsejax.load_slim_function(str(output / SLIM_FUNCTION_FILE))
    assert slim.params["fc1.kernel"].shape == (684, 30)
    assert slim.report.rows == {"fc1.kernel": [684, 784]}
    assert slim.report.max_logit_difference < 1e-5
