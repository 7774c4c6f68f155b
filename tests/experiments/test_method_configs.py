"""The configs of the regularisation methods (``l1``, ``bounded_lp``, ``stochastic``): the
recipes they resolve to, the per-model defaults the methods take, the command-line overrides of
their fields, and CLI runs on synthetic data."""

import json
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from experiments.configs import cifar, imagenet, mnist
from experiments.configs.recipes import (
    MNIST_PROXIMAL_GATE_RATE,
    MODEL_SCHEDULES,
    SLIMMING_CIFAR,
    resolve,
    resolve_mnist,
)
from sparsejax.methods import METHODS, RunInfo, create_method
from sparsejax.methods.bounded_lp import BOUNDED_FIELDS, BOUNDED_LAMBDAS, L1_LAMBDAS
from sparsejax.methods.stochastic import DEFAULT_TEMPERATURE, FIELDS
from sparsejax.train.config import SHARED_FIELDS
from tests.commands import run_module

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "experiments" / "configs"
SCHEDULE = ("optimizer", "learning_rate", "lr_schedule", "lr_milestones", "lr_factor",
            "weight_decay", "epochs", "batch_size")

OVERRIDES = {
    "gate_lambda": ("(1e-4,2e-4)", (1e-4, 2e-4)), "sigma": ("0.3", 0.3), "p": ("2", 2.0),
    "filter_lambda": ("1e-5", 1e-5), "filter_sigma": ("2.5", 2.5),
    "gate_threshold": ("1e-3", 1e-3), "l1": ("3e-5", 3e-5), "l2": ("0", 0.0),
    "final_sparsity": ("0.8", 0.8), "initial_sparsity": ("0.1", 0.1),
    "prune_start_epoch": ("1", 1.0), "prune_end_epoch": ("7.5", 7.5),
    "prune_temperature": ("0.4", 0.4), "allow_regrowth": ("true", True),
}
"""``--config.NAME=TEXT`` and the value it must give."""
OVERRIDE_METHODS = {
    "bounded_lp": ("gate_lambda", "sigma", "p", "filter_lambda", "filter_sigma", "gate_threshold"),
    "stochastic": ("l1", "final_sparsity", "initial_sparsity", "prune_start_epoch",
                   "prune_end_epoch", "prune_temperature", "allow_regrowth"),
}
"""The method each overridden field belongs to (``l2`` is shared)."""


def resolved(module, method, **fields):
    config = module.get_config(method)
    config.update(fields)
    (resolve_mnist if module is mnist else resolve)(config)
    return config


def method_for(config):
    run = RunInfo(50_000, steps_per_epoch=10, epochs=config.epochs)
    return create_method(config.method, config, run)


@pytest.mark.parametrize("module", [mnist, cifar, imagenet], ids=["mnist", "cifar", "imagenet"])
@pytest.mark.parametrize("method", ["l1", "bounded_lp", "stochastic", "gmp"])
def test_a_config_file_holds_the_shared_fields_and_the_methods_unset(module, method):
    config = module.get_config(method)
    assert set(SHARED_FIELDS) <= set(config) and config.method == method
    for field in METHODS[method].fields:
        assert config[field] is None, field
    assert set(config) == set(SHARED_FIELDS) | set(METHODS[method].fields)


@pytest.mark.parametrize("name", ["mnist", "cifar", "imagenet"])
@pytest.mark.parametrize("method", sorted(OVERRIDE_METHODS))
def test_every_method_field_is_overridable_on_the_command_line(name, method):
    fields = (*OVERRIDE_METHODS[method], "l2")
    argv = ["prog", *(f"--config.{field}={OVERRIDES[field][0]}" for field in fields)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", f"{CONFIGS / name}.py:{method}", flag_values=values, sys_argv=argv
    )
    values(argv)
    config = values.config
    for field in fields:
        assert config[field] == OVERRIDES[field][1], field


@pytest.mark.parametrize("method", ["bounded_lp", "l1"])
@pytest.mark.parametrize("model", ["resnet164", "densenet40", "mobilenet_v2_cifar"])
def test_cifar100_gate_methods_take_the_network_slimming_schedule(method, model):
    config = resolved(cifar, method, model=model, dataset="cifar100")
    for field in SCHEDULE:
        assert config[field] == SLIMMING_CIFAR[field], field
    assert (config.epochs, config.batch_size, tuple(config.lr_milestones)) == (160, 64, (80, 120))
    assert config.gate_optimizer is None and config.gate_learning_rate is None
    assert config.l2 == 0.0
    table = BOUNDED_LAMBDAS if method == "bounded_lp" else L1_LAMBDAS
    gate_method = method_for(config)
    assert gate_method.config.gate_lambda == table[model]
    if method == "bounded_lp":
        assert gate_method.sigma == 0.5
        assert gate_method.p == 1.0


def test_the_prox_step_of_the_gate_methods_is_the_networks_learning_rate():
    config = resolved(cifar, "bounded_lp", model="resnet164", dataset="cifar100")
    gate_method = method_for(config)
    for epoch, rate in [(0, 0.1), (79, 0.1), (80, 0.01), (120, 0.001)]:
        assert float(gate_method.gate_rate(epoch * 10)) == pytest.approx(rate), epoch


@pytest.mark.parametrize("method", ["bounded_lp", "l1"])
@pytest.mark.parametrize("model", ["resnet50", "mobilenet_v2"])
def test_imagenet_gate_methods_take_the_models_schedule(method, model):
    config = resolved(imagenet, method, model=model)
    for field, value in MODEL_SCHEDULES[model].items():
        assert config[field] == value, field
    assert config.dataset == "imagenet2012" and config.gate_optimizer is None
    table = BOUNDED_LAMBDAS if method == "bounded_lp" else L1_LAMBDAS
    assert method_for(config).config.gate_lambda == table[model]


def test_stochastic_vgg16_on_cifar10_takes_the_dep_l0_schedule_and_its_defaults():
    config = resolved(cifar, "stochastic", model="vgg16", dataset="cifar10")
    for field, value in MODEL_SCHEDULES["vgg16"].items():
        assert config[field] == value, field
    assert config.weight_decay == 5e-4 and config.l2 == 0.0
    assert config.gate_optimizer is None
    pruning = method_for(config)
    assert pruning.l1 == FIELDS["l1"].default_for("vgg16") and pruning.l2 == 0.0
    assert pruning.temperature == DEFAULT_TEMPERATURE
    assert pruning.config.final_sparsity == FIELDS["final_sparsity"].default_for("vgg16")
    assert 0 < pruning.config.prune_end_epoch < config.epochs


def test_stochastic_mlp_on_mnist_takes_adam_and_the_mlp_defaults():
    config = resolved(mnist, "stochastic", model="mlp")
    assert (config.optimizer, config.learning_rate) == ("adam", 1e-3)
    assert (config.lr_schedule, config.batch_size, config.weight_decay) == ("constant", 100, 0.0)
    assert config.gate_learning_rate is None
    pruning = method_for(config)
    assert pruning.l1 == FIELDS["l1"].default_for("mlp") and pruning.l2 == config.l2
    assert pruning.config.prune_end_epoch == FIELDS["prune_end_epoch"].default_for("mlp")
    assert pruning.config.prune_end_epoch < config.epochs


@pytest.mark.parametrize("method", ["l1", "bounded_lp"])
def test_proximal_gates_on_mnist_take_the_recipes_gate_rate_unless_set(method):
    config = resolved(mnist, method, model="lenet5")
    assert config.gate_learning_rate == MNIST_PROXIMAL_GATE_RATE
    assert config.learning_rate == 1e-3 and config.gate_optimizer is None
    gate_method = method_for(config)
    assert float(gate_method.gate_rate(0)) == pytest.approx(MNIST_PROXIMAL_GATE_RATE)
    assert resolved(mnist, method, gate_learning_rate=0.5).gate_learning_rate == 0.5
    assert resolved(mnist, "l0_hc").gate_learning_rate is None


@pytest.mark.parametrize(
    "method,model,like",
    [
        ("bounded_lp", "resnet20", "cifar100"),
        pytest.param("bounded_lp", "resnet164", "cifar100", marks=pytest.mark.slow),
        pytest.param("stochastic", "vgg16", "cifar10", marks=pytest.mark.slow),
    ],
)
def test_cifar_cli_runs_the_regularisation_methods(tmp_path, method, model, like):
    per_slot = (
        ["--config.final_sparsity=0.5", "--config.prune_end_epoch=1"] if method == "stochastic"
        else []
    )
    result = run_module(
        "experiments.cifar", f"--method={method}", f"--model={model}", "--dataset=synthetic",
        "--epochs=1", "--steps_per_epoch=2", "--batch_size=8", f"--workdir={tmp_path}",
        "--config.num_train=16", "--config.num_test=8", "--config.eval_batch_size=8",
        f"--config.synthetic_like={like}", *per_slot, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    assert (summary["method"], summary["model"], summary["steps_per_epoch"]) == (method, model, 2)
    assert summary["test_error"] is not None
    for key in ("active_units", "params", "dense_params", "flops", "dense_flops", "pruning_rate"):
        assert key in summary, key
    assert config["optimizer"] == "momentum" and config["lr_schedule"] == "step"
    if method == "stochastic":
        assert config["weight_decay"] == 5e-4 and config["epochs"] == 1
        assert 0 < summary["nodes/total_sparsity"] and summary["nodes/removed_percent"] >= 0
        assert summary["nodes/kept_weights"] <= summary["dense_params"]
    else:
        assert summary["active_units"] == summary["dense_units"]  # two steps prune nothing
        assert config["gate_lambda"] == BOUNDED_FIELDS["gate_lambda"].default_for(model)
        if model == "resnet164":
            assert config["lr_milestones"] == [80, 120] and config["batch_size"] == 8
