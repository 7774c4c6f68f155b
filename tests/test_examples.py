"""The examples a user copies work from outside the repository."""

import importlib.util
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.errors import ConfigError
from sparsejax.methods.base import RunInfo
from sparsejax.methods.l0_hc import L0HardConcrete
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure.accounting import count_network
from sparsejax.structure.traced_model import TracedModel, build_traced_model
from sparsejax.train import train_and_evaluate
from tests.commands import run_module

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, pythonpath, cwd):
    return run_module("experiments.mnist", *args, cwd=cwd, pythonpath=pythonpath)


def test_the_custom_method_runs_through_the_cli_from_a_copy_outside_the_repository(tmp_path):
    own = tmp_path / "my_methods"
    own.mkdir()
    shutil.copy(ROOT / "examples" / "custom_method.py", own / "my_pruning.py")
    result = run_cli(
        "--method=my_pruning:CustomMethod", "--model=mlp", "--dataset=synthetic", "--epochs=2",
        "--steps_per_epoch=4", "--config.num_train=256", "--config.num_test=64",
        "--config.sparsity=0.75", f"--workdir={tmp_path / 'run'}",
        pythonpath=f"{own}:{ROOT}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert summary["method"] == "my_pruning:CustomMethod"
    for layer in ("fc1", "fc2", "fc3"):
        assert summary[f"custom/sparsity/{layer}"] == pytest.approx(0.75, abs=0.01)
    assert summary["pruning_rate"] > 70.0
    assert (config["sparsity"], config["prune_epoch"]) == (0.75, 1.0)  # resolved, written out
    unknown = run_cli("--method=my_pruning:Nothing", f"--workdir={tmp_path / 'x'}",
                      pythonpath=f"{own}:{ROOT}", cwd=tmp_path)
    lines = [line for line in unknown.stderr.splitlines() if line.strip()]
    assert unknown.returncode == 1 and len(lines) == 1
    assert "has no Method subclass 'Nothing'" in lines[0]


def test_train_and_evaluate_takes_a_method_by_module_and_class(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    config = get_config("custom_method:CustomMethod")
    config.update(model="mlp", dataset="synthetic", epochs=2, steps_per_epoch=3, num_train=192,
                  num_test=64, eval_batch_size=64, batch_size=64, sparsity=0.5)
    summary = train_and_evaluate(config, tmp_path / "run")
    assert summary["custom/sparsity/fc1"] == pytest.approx(0.5, abs=0.01)
    config.method = "nowhere_module:CustomMethod"
    with pytest.raises(ConfigError, match="cannot import module 'nowhere_module'"):
        train_and_evaluate(config, tmp_path / "other")
    assert not (tmp_path / "other").exists()


BAD_FACTORIES = '''
from flax import nnx


class Features(nnx.Module):
    def __init__(self, *, rngs, num_classes):
        self.conv = nnx.Conv(1, 32, (3, 3), rngs=rngs)

    def __call__(self, x):
        return self.conv(x).mean(axis=(1, 2))


def features(*, rngs, num_classes):
    return Features(rngs=rngs, num_classes=num_classes)

'''


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(),
                    reason="needs apt-get install dataset-fashion-mnist")
def test_a_plain_nnx_model_runs_and_resumes_through_the_cli_from_outside_the_repository(tmp_path):
    own = tmp_path / "my_models"
    own.mkdir()
    shutil.copy(ROOT / "examples" / "traced_model.py", own / "my_cnn.py")
    (own / "bad_models.py").write_text(BAD_FACTORIES)
    common = ("--method=l0_hc", "--dataset=fashion_mnist", "--steps_per_epoch=2",
              "--batch_size=64", "--config.num_train=256", "--config.num_test=128",
              f"--workdir={tmp_path / 'run'}")
    first = run_cli("--model=my_cnn:small_cnn", "--epochs=1", *common,
                    pythonpath=f"{own}:{ROOT}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli("--model=my_cnn:small_cnn", "--epochs=2", *common,
                      pythonpath=f"{own}:{ROOT}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "at step 2" in resumed.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == summary["model"] == "my_cnn:small_cnn"
    assert summary["epochs"] == 2
    assert summary["gate_slots"] == ["stem", "conv", "wide", "narrow", "fc1"]
    assert summary["dense_units"] == [16, 32, 16, 8, 64]
    # conv stem, conv + shortcut (a stream), two branches, fc1 over 7 x 7 x 24, fc2
    assert summary["dense_params"] == (9 * 16 + 16) + (9 * 16 * 32 + 32) + (16 * 32 + 32) + (
        9 * 32 * 16 + 16) + (32 * 8 + 8) + (49 * 24 * 64 + 64) + (64 * 10 + 10)
    # a factory that does not give logits: one error line (the other bad specs' messages are
    # checked in-process in tests/structure/test_traced_model.py)
    failed = run_cli("--model=bad_models:features", "--epochs=1", *common[:-1],
                     f"--workdir={tmp_path / 'failed'}", pythonpath=f"{own}:{ROOT}", cwd=tmp_path)
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert failed.returncode == 1 and len(lines) == 1, failed.stderr[-2000:]
    assert lines[0].startswith("error: ") and "to an output of shape (1, 32), not logits of " \
        "shape (batch, 10)" in lines[0], lines[0]
    assert not (tmp_path / "failed").exists()


def test_the_example_transformer_is_gated_by_heads_head_dimensions_and_mlp_units():
    spec = importlib.util.spec_from_file_location("traced_model", ROOT / "examples/traced_model.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    net = example.small_vit(rngs=nnx.Rngs(params=0), num_classes=10)
    model = TracedModel(net, rngs=nnx.Rngs(params=0), input_shape=(28, 28, 1), num_classes=10)
    blocks = [{f"blocks.{i}.attention.query.axis1": 4, f"blocks.{i}.attention.query.axis2": 16,
               f"blocks.{i}.attention.value": 16, f"blocks.{i}.up": 128} for i in range(2)]
    assert {s.name: s.shape[0] for s in model.gate_slots} == {**blocks[0], **blocks[1]}
    # the stream, whose units the LayerNorms' statistics read, keeps its width
    stream = [g for g in model.structure.groups if g.stream]
    assert [(g.size, g.prunable, g.removable) for g in stream] == [(64, True, False)]
    dense = count_network(model.layers, {}, model.activation_products)
    block_params = 4 * (64 * 64 + 64) + (64 * 128 + 128) + (128 * 64 + 64)
    assert float(dense["params"]) == (49 * 64 + 64) + 2 * block_params + (64 * 10 + 10)
    attention = 2 * 64 * 16 * 16  # Q K^T and A V over 16 tokens, 4 heads of 16
    block_flops = 16 * (4 * 64 * 64 + 2 * 64 * 128) + attention
    assert float(dense["flops"]) == 16 * 49 * 64 + 2 * block_flops + 64 * 10


def test_the_example_mlp_places_the_l0_gates_and_slims_away_its_closed_pixels(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    method = L0HardConcrete(get_config().lock(), RunInfo(100))
    model = build_traced_model("traced_model:pixel_mlp", rngs=nnx.Rngs(params=0),
                               num_classes=10, input_shape=(28, 28, 1),
                               gate_factory=method.make_gates)
    assert [(s.name, s.shape) for s in model.gate_slots] == [
        ("pixels", (784,)), ("hidden1", (300,)), ("hidden2", (100,))]
    pixels = model.gates["pixels"].log_alpha
    pixels.set_value(jnp.where(jnp.arange(784) < 100, -10.0, 10.0))
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, 28, 28, 1)))
    slim = slim_traced_model(model, x)
    assert slim.params["fc1.kernel"].shape == (684, 300)
    assert slim.report.rows == {"fc1.kernel": [684, 784]}
    assert slim.report.max_logit_difference < 1e-5
