import json
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import mnist
from sparsejax.models.base import GatedModel
from sparsejax.slim import __main__ as cli
from sparsejax.slim.__main__ import main
from sparsejax.slim.runs import NotARunError, restore_model, restore_run
from sparsejax.slim.store import SLIM_FUNCTION_FILE, SLIM_REPORT_FILE
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure.slim_trace import load_slim_function
from sparsejax.structure.traced_model import build_zoo_model
from sparsejax.train import train_and_evaluate
from tests.commands import run_module
from tests.gated import randomize_batch_norms, scale_gates


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A two-step LeNet-5 L0-HC run on synthetic MNIST-shaped data."""
    workdir = tmp_path_factory.mktemp("run")
    config = mnist.get_config()
    config.update(
        method="l0_hc", model="lenet5", dataset="synthetic", num_train=64, num_test=32,
        batch_size=32, eval_batch_size=32, epochs=1, steps_per_epoch=2, log_every=1,
        input_threads=1,
    )
    train_and_evaluate(config, workdir)
    return workdir


@nnx.jit
def eval_logits(model, x):
    return model(x, train=False)


def restore_changed(monkeypatch, change: Callable[[GatedModel], None]) -> None:
    """Make the slimming CLI restore a run's model with ``change`` applied to it."""

    def restore(workdir, config, data):
        model, spec, step = restore_model(workdir, config, data)
        change(model)
        return model, spec, step

    monkeypatch.setattr(cli, "restore_model", restore)


def close_half_the_conv2_gates(model):
    gate = model.gates["conv2"]
    gate.log_alpha[...] = gate.log_alpha[...].at[::2].set(-20.0)


def test_slim_cli_slims_a_lenet5_run_from_its_trace_to_the_gated_logits(run_dir, capsys):
    """LeNet-5 is a plain module gated from its trace: its run is slimmed into a slim function
    with the gated model's logits on the run's test images, which its report holds."""
    output = run_dir / "slim"
    assert main([str(run_dir), "--output", str(output)]) == 0
    table = capsys.readouterr().out
    assert "| params |" in table and "max logit difference to the gated model" in table
    report = json.loads((output / SLIM_REPORT_FILE).read_text())
    gated, _, _ = restore_run(run_dir)
    slim = load_slim_function(str(output / SLIM_FUNCTION_FILE))
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, 28, 28, 1)))
    np.testing.assert_allclose(slim(x), eval_logits(gated, x), atol=1e-4, rtol=1e-4)
    assert report["max_logit_difference"] <= 1e-5
    assert report["params_before"] == 431_080 >= report["params_after"]


def test_round_to_rounds_the_widths_of_a_zoo_run(run_dir, tmp_path, monkeypatch):
    restore_changed(monkeypatch, close_half_the_conv2_gates)
    output = tmp_path / "slim"
    assert main([str(run_dir), "--output", str(output), "--round_to", "8"]) == 0
    report = json.loads((output / SLIM_REPORT_FILE).read_text())
    assert report["round_to"] == 8
    (conv2,) = [g for g in report["groups"] if g["producers"] == ["conv2.kernel:3"]]
    assert (conv2["open"], conv2["width"]) == (25, 32)  # 25 open of 50, rounded up to 32
    for group in report["groups"]:
        assert group["width"] % 8 == 0 or group["width"] == group["size"]
    gated, _, _ = restore_run(run_dir)
    close_half_the_conv2_gates(gated)
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, 28, 28, 1)))
    slim = load_slim_function(str(output / SLIM_FUNCTION_FILE))
    np.testing.assert_allclose(slim(x), eval_logits(gated, x), atol=1e-4, rtol=1e-4)


def test_a_traced_slim_network_with_a_layer_of_no_units_round_trips_through_disk(tmp_path):
    """Every gate of a ResNet-20 block's conv1 closed: conv1 keeps no units and conv2 no input
    rows, so neither is stored; the slim network saved and loaded without the model's class
    has the gated model's logits."""
    gated = build_zoo_model("resnet20", rngs=nnx.Rngs(params=0), gate_factory=scale_gates)
    randomize_batch_norms(gated, np.random.default_rng(1))
    gated.gates["block2.conv1"].value[...] = jnp.zeros(16)
    x = np.asarray(jax.random.normal(jax.random.key(1), (4, 32, 32, 3)))
    slim = slim_traced_model(gated, x)
    assert not {"blocks.1.conv1.kernel", "blocks.1.conv2.kernel"} & set(slim.params)
    slim.save(str(tmp_path / "slim.npz"))
    restored = load_slim_function(str(tmp_path / "slim.npz"))
    np.testing.assert_allclose(restored(x), eval_logits(gated, x), atol=1e-4, rtol=1e-4)


def test_slim_cli_says_when_a_directory_is_not_a_run(tmp_path):
    result = run_module("sparsejax.slim", str(tmp_path), cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    assert "is not a run directory" in result.stderr and "Traceback" not in result.stderr


def test_a_run_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main([str(tmp_path)]) == 1
    assert "has no checkpoint" in capsys.readouterr().err


def test_slim_cli_reports_a_damaged_checkpoint_in_one_line(run_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    for path in damaged.glob("checkpoints/*/state/**/*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[:10])
    result = run_module("sparsejax.slim", str(damaged), cwd=tmp_path, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: no usable checkpoint")
    assert str(damaged / "checkpoints") in lines[0]


def test_slim_cli_shows_the_traceback_with_debug(tmp_path):
    with pytest.raises(NotARunError):
        main([str(tmp_path), "--debug"])
