import json

import jax
import jax.numpy as jnp
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from experiments.configs import cifar, imagenet, mnist
from experiments.configs.recipes import GREG_SCHEDULES, MODEL_SCHEDULES, resolve
from sparsejax.errors import ConfigError
from sparsejax.methods import RunInfo
from sparsejax.methods.dep_l0 import generator_of
from sparsejax.methods.dep_penalty import dep_l0_penalty
from sparsejax.methods.greg import FIELDS as GREG_FIELDS
from sparsejax.methods.optim import learning_rates
from sparsejax.structure.traced_model import build_zoo_model
from sparsejax.train import train_and_evaluate
from sparsejax.train.config import resolve_config
from tests.commands import run_module


def cifar_config(**overrides):
    config = cifar.get_config()
    config.update(
        method="l0_hc", model="resnet20", dataset="synthetic", num_train=128, num_test=40,
        batch_size=32, eval_batch_size=20, steps_per_epoch=2, log_every=2, input_threads=2,
    )
    config.update(overrides)
    resolve(config)
    return config


def test_recipe_fills_only_the_unset_fields():
    config = cifar.get_config()
    config.update(model="vgg16", method="dep_l0", learning_rate=0.3)
    resolve(config)
    assert config.learning_rate == 0.3  # set by the user
    assert config.lr_factor == 0.2 and tuple(config.lr_milestones) == (60, 120, 180, 240)
    assert config.gate_optimizer == "adam" and config.gate_lr_schedule == "step"
    assert config.epochs == 300 and config.batch_size == 128


def test_wrn_keeps_one_optimizer_and_the_l2_in_the_loss():
    config = cifar.get_config()
    config.update(model="wrn28_10", method="l0_hc")
    resolve(config)
    assert config.optimizer == "nesterov" and config.gate_optimizer is None
    assert config.l2 == 5e-4 and config.weight_decay == 0.0


@pytest.mark.parametrize("method", ["dep_l0", "dep_l0_arm"])
@pytest.mark.parametrize(
    "module, model, weight_decay",
    [(cifar, "resnet56", 5e-4), (cifar, "vgg16", 5e-4), (imagenet, "resnet50", 1e-4)],
)
def test_dep_l0_decays_in_the_optimizer_only(module, model, weight_decay, method):
    """The Dep-L0 recipes' L2 is the optimizer's weight decay; ``l2`` 0, so the gated L2 of
    the loss adds exactly nothing and the penalty is R alone, as before ``l2`` was read."""
    config = module.get_config(method)
    config.model = model
    resolve(config)
    assert config.l2 == 0.0 and config.weight_decay == weight_decay
    resolved_cls, resolved = resolve_config(config)
    small = cifar.get_config(method)
    small.update(model="resnet20", l2=resolved.l2)
    dep = resolved_cls(small, RunInfo(num_train=128, steps_per_epoch=1, epochs=2))
    assert dep.l2 == 0.0
    net = build_zoo_model("resnet20", rngs=nnx.Rngs(0), input_shape=(8, 8, 3),
                          gate_factory=dep.make_gates)
    keep = dep.keep_probabilities(net, generator_of(net)())
    want = dep_l0_penalty(net.layers, net.gate_slots, keep, dep.penalty_lambda)
    assert float(dep.penalty(net, {})) == float(want)


def test_imagenet_recipe_is_resnet50s():
    config = imagenet.get_config()
    resolve(config)
    assert config.model == "resnet50" and config.dataset == "imagenet2012"
    for field, value in MODEL_SCHEDULES["resnet50"].items():
        assert config[field] == value, field


def learning_rate_of_update(tx, update: int) -> float:
    """The network's learning rate of 0-based update ``update`` of ``tx``, read from its state."""
    params = {"net": {"w": jnp.zeros(2)}, "gates": {}}
    grads = jax.tree.map(jnp.ones_like, params)
    state = jax.lax.fori_loop(
        0, update + 1, lambda _, s: tx.update(grads, s, params)[1], tx.init(params)
    )
    return float(learning_rates(state)["net"])


@pytest.mark.parametrize(
    "module, model, steps_per_epoch, fine_tuning",
    [
        (cifar, "vgg19", 196, (120, {0: 0.01, 60: 1e-3, 90: 1e-4})),
        (imagenet, "resnet34", 5005, (90, {0: 0.01, 30: 1e-3, 60: 1e-4, 75: 1e-5})),
        (cifar, "resnet56", 391, (120, {0: 0.01, 60: 1e-3, 90: 1e-4})),
    ],
)
@pytest.mark.parametrize("method", ["greg1", "greg2"])
def test_greg_networks_run_the_papers_phases_with_their_own_learning_rates(
    module, model, steps_per_epoch, fine_tuning, method
):
    config = module.get_config(method)
    config.update(model=model)
    resolve(config)
    cls, config = resolve_config(config)
    assert config.epochs is None  # the phases give the run's length
    for field, value in {**MODEL_SCHEDULES[model], **GREG_SCHEDULES.get(model, {})}.items():
        if field != "epochs":
            assert config[field] == value, field
    expected = {
        "vgg19": (10, 10_000, 200), "resnet34": (5, 40_000, 90), "resnet56": (10, 10_000, 200)
    }[model]
    assert (config.greg_interval, config.greg_stabilise_steps, config.pretrain_epochs) == expected

    greg = cls(config, RunInfo(50_000, steps_per_epoch, None))
    pretrain, regularise, fine_tune = greg.phases()
    assert [p.name for p in greg.phases()] == ["pretrain", "regularise", "fine-tune"]
    assert pretrain.epochs == expected[2] and pretrain.method is not greg
    milestones = tuple(config.lr_milestones)
    for epoch in (0, *milestones, expected[2] - 1):
        drops = sum(m <= epoch for m in milestones)
        assert learning_rate_of_update(
            pretrain.optimizer, epoch * steps_per_epoch
        ) == pytest.approx(config.learning_rate * config.lr_factor**drops), epoch
    # the reference regularises at a constant 1e-3 for at most tau / delta = 10^4 coefficient
    # updates (GReg-2: tau_pick / delta_pick = 10^3 uniform ones, then (tau - tau_pick) / delta
    # = 9,900) every K_u iterations, and K_s more (float32 sums may need an update more)
    updates = 10_000 if method == "greg1" else 1_000 + 9_900
    longest = expected[0] * updates + expected[1]
    assert regularise.until is not None
    planned = regularise.epochs * steps_per_epoch
    assert -2 * expected[0] <= planned - longest < steps_per_epoch + 2 * expected[0]
    for update in (0, 12_345):
        assert learning_rate_of_update(regularise.optimizer, update) == pytest.approx(1e-3)
    epochs, rates = fine_tuning
    assert fine_tune.epochs == epochs and fine_tune.method is greg
    for epoch, rate in rates.items():
        for at in (epoch, epoch + 1):
            assert learning_rate_of_update(
                fine_tune.optimizer, at * steps_per_epoch - (at > epoch)
            ) == pytest.approx(rate), epoch
    dense = module.get_config("dense")
    dense.update(model=model)
    resolve(dense)
    assert "stage_pr" not in dense and dense.epochs == MODEL_SCHEDULES[model]["epochs"]


@pytest.mark.parametrize("module, model", [(cifar, "resnet56"), (mnist, "lenet5")])
def test_greg_refuses_an_epoch_count(module, model):
    config = module.get_config("greg1")
    config.update(model=model, epochs=30)
    with pytest.raises(ConfigError, match="fine_tune_epochs"):
        resolve_config(config)


@pytest.mark.parametrize("method", ["dep_l0", "dep_l0_arm"])
def test_dep_l0_on_imagenet_fine_tunes_the_last_ten_epochs(method):
    config = imagenet.get_config(method)
    resolve(config)
    assert config.epochs == 100 and config.fine_tune_epochs == 10
    assert config.gate_lr_factor == 0.2 and config.lr_factor == 0.1
    other = imagenet.get_config("l0_hc")
    resolve(other)
    assert "fine_tune_epochs" not in other and other.gate_lr_factor is None


def test_cifar_run_resumes_to_the_uninterrupted_result(tmp_path):
    straight = train_and_evaluate(cifar_config(epochs=2), tmp_path / "straight")
    train_and_evaluate(cifar_config(epochs=1), tmp_path / "split")
    resumed = train_and_evaluate(cifar_config(epochs=2), tmp_path / "split")
    for key in ("test_error", "expected_l0", "expected_flops", "active_units"):
        assert resumed[key] == straight[key], key
    assert straight["dense_flops"] == pytest.approx(40_551_040)  # ResNet-20 MACs


@pytest.mark.usefixtures("getitems_by_index")
def test_cifar_under_mock_tfds_data(tmp_path):
    (tmp_path / "no_files").mkdir()
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        summary = train_and_evaluate(
            cifar_config(dataset="cifar100", num_train=None, num_test=None, epochs=1,
                         data_dir=str(tmp_path / "no_files")),
            tmp_path / "run",
        )
    assert summary["data_source"] == "tfds:cifar100" and summary["dataset"] == "cifar100"
    assert summary["steps_per_epoch"] == 2 and summary["test_error"] is not None


def test_cifar_cli_on_synthetic_data(tmp_path):
    result = run_module(
        "experiments.cifar", "--method=l0_arm", "--model=resnet20", "--dataset=synthetic",
        "--epochs=1", "--steps_per_epoch=2", "--batch_size=16", f"--workdir={tmp_path}",
        "--config.num_train=64", "--config.num_test=16", "--config.eval_batch_size=16",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    assert summary["model"] == "resnet20" and len(summary["active_units"]) == 10
    for key in ("active_units", "flops", "dense_flops", "params", "dense_params", "pruning_rate"):
        assert key in summary
    assert config["optimizer"] == "momentum" and config["augment"] == "crop_flip"


@pytest.mark.parametrize(
    "module, model, method, batch",
    [
        # VGG-19 is the costliest network of the suite to compile (80 s of a worker); its recipe
        # and pruned sizes are checked in-process in tests/models/test_greg_models.py
        pytest.param("experiments.cifar", "vgg19", "greg2", 8, marks=pytest.mark.slow),
        ("experiments.imagenet", "resnet34", "greg1", 2),
    ],
)
def test_greg_networks_cli_on_synthetic_data(tmp_path, module, model, method, batch):
    """Two steps of GReg's regularisation on each of its networks, recipe filled in."""
    result = run_module(
        module, f"--method={method}", f"--model={model}", "--dataset=synthetic",
        "--steps_per_epoch=2", f"--batch_size={batch}", f"--workdir={tmp_path}",
        f"--config.num_train={2 * batch}", f"--config.num_test={batch}",
        f"--config.eval_batch_size={batch}", "--config.pretrain_epochs=0",
        # one coefficient update past the ceiling, pruning right after it, one epoch of tuning
        "--config.greg_delta=1.0", "--config.greg_ceiling=0.5", "--config.greg_delta_pick=1.0",
        "--config.greg_stabilise_steps=0", "--config.fine_tune_epochs=1",
        "--config.input_workers=0", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    assert summary["model"] == model and summary["greg/phase"] == "finetune"
    assert summary["greg/iteration"] == 4 and summary["epochs"] == 2
    assert [phase["name"] for phase in summary["phases"]] == ["regularise", "fine-tune"]
    stage_pr = GREG_FIELDS["stage_pr"].default_for(model)
    assert config["stage_pr"] == (stage_pr if isinstance(stage_pr, str) else list(stage_pr))
    assert config["greg_interval"] == GREG_FIELDS["greg_interval"].default_for(model)


def test_imagenet_cli_without_data_says_how_to_prepare_it(tmp_path):
    result = run_module(
        "experiments.imagenet", f"--data_dir={tmp_path}", f"--workdir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert "error: imagenet2012 is not prepared" in result.stderr
    assert "tfds build imagenet2012" in result.stderr and "Traceback" not in result.stderr
