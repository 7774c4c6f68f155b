"""Pruning to a budget: config errors, the multipliers' direction and the proportional term,
Dep-L0's budget gradient, the ratio finder's count, transformer FLOPs and targets, short
Fashion-MNIST runs landing near the target, and exact resume mid-warm-up."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.errors import ConfigError
from sparsejax.gates.base import GateParam
from sparsejax.methods import RunInfo, create_method
from sparsejax.methods.budget import (
    STATE_KEY,
    TOLERANCE,
    Target,
    ascend,
    lagrangian,
    ramped_target,
    requested_target,
    size_fraction,
)
from sparsejax.methods.budget_ratio import kept_fraction, layers_ratio
from sparsejax.methods.dep_l0 import budget_logits, generator_of
from sparsejax.plots import BUDGET_FIGURE, plot_run
from sparsejax.structure.accounting import count_network
from sparsejax.structure.traced_model import build_zoo_model
from sparsejax.train import Preempted, train_and_evaluate
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.config import resolve_config
from sparsejax.train.metrics import read_metrics
from tests.methods.test_greg import latest_checkpoint
from tests.models.test_transformer import LM as TINY_LM
from tests.models.test_transformer import VIT as TINY_VIT
from tests.train.test_loop import FASHION_MNIST, config_for
from tests.train.test_method_state import assert_resumed_like_whole

GATED = ("l0_hc", "l0_arm", "l0_ar", "dep_l0", "dep_l0_arm", "l1", "bounded_lp")
RATIO = ("gmp", "stochastic", "greg1", "greg2")
SHORT_GREG = {"pretrain_epochs": 1, "greg_interval": 1, "greg_delta": 0.5,
              "greg_stabilise_steps": 2, "greg_delta_pick": 0.2, "greg_ceiling_pick": 0.3,
              "epochs": None, "fine_tune_epochs": 2}
"""GReg's schedule compressed so that it prunes within a short run (as in the resume tests)."""
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST.exists(), reason="needs apt-get install dataset-fashion-mnist"
)


def method_for(name, model="mlp", granularity="unit", **overrides):
    config = get_config(name)
    config.update(model=model, **overrides)
    _, config = resolve_config(config)
    method = create_method(name, config, RunInfo(num_train=1000, steps_per_epoch=10, epochs=4))
    built = build_zoo_model(
        model, rngs=nnx.Rngs(params=0), gate_factory=method.make_gates, granularity=granularity,
        **method.model_options(),
    )
    return method, built


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"target_flops": 0.5, "target_params": 0.5}, "alternatives"),
        ({"target_flops": 1.0}, r"in \(0, 1\)"),
        ({"target_params": 0.0}, r"in \(0, 1\)"),
        ({"target_flops": 0.5, "lambdas": (0.1,)}, "drop --config.lambdas"),
        ({"target_flops": 0.5, "target_measure": "mean"}, "target_measure"),
    ],
)
def test_a_bad_budget_is_one_config_error(overrides, message):
    config = get_config("l0_hc")
    config.update(**overrides)
    with pytest.raises(ConfigError, match=message) as error:
        resolve_config(config)
    assert "\n" not in str(error.value)


def test_a_method_without_a_budget_refuses_the_field():
    config = get_config("dense")
    config.target_flops = 0.5
    with pytest.raises(ConfigError, match="'target_flops' is not a field of method 'dense'"):
        resolve_config(config)


def test_a_target_replaces_the_penalty_and_turns_the_average_off():
    _, config = resolve_config(_config("l0_hc", model="mlp", target_flops=0.4))
    assert config.lambdas == 0.0 and config.ema_decay == 0.0
    assert config.target_warmup_epochs == pytest.approx(0.5 * config.epochs)
    _, plain = resolve_config(_config("l0_hc", model="mlp"))
    assert plain.lambdas != 0.0 and plain.ema_decay == 0.999
    for name, field in (("dep_l0", "lamba"), ("l1", "gate_lambda"), ("bounded_lp", "gate_lambda")):
        _, config = resolve_config(_config(name, target_params=0.4))
        assert config[field] == 0.0, name
    # the proportional gain: the stochastic gates' default, none for the deterministic ones
    for name, gain in (("l0_hc", 30.0), ("l0_ar", 30.0), ("dep_l0_arm", 30.0), ("l1", 0.0),
                       ("bounded_lp", 0.0)):
        assert resolve_config(_config(name, target_flops=0.4))[1].target_kp == gain, name
    assert resolve_config(_config("l1", target_flops=0.4, target_kp=5.0))[1].target_kp == 5.0
    # L0 gates on Adam learn at 1e-2 or more under a target unless told otherwise; Dep-L0's
    # generator and the deterministic gates keep theirs
    for name, plain_rate, target_rate in (("l0_hc", 1e-3, 1e-2), ("l0_arm", 1e-3, 1e-2),
                                          ("l0_ar", 1e-3, 1e-2), ("dep_l0", 1e-3, 1e-3),
                                          ("l1", 1e-3, 1e-3)):
        assert resolve_config(_config(name))[1].gate_learning_rate == plain_rate, name
        targeted = resolve_config(_config(name, target_flops=0.4))[1]
        assert targeted.gate_learning_rate == target_rate, name
    given = _config("l0_hc", target_flops=0.4, gate_learning_rate=3e-3)
    assert resolve_config(given)[1].gate_learning_rate == 3e-3
    faster = _config("l0_hc", target_flops=0.4, learning_rate=0.05)
    assert resolve_config(faster)[1].gate_learning_rate == 0.05
    on_sgd = _config("l0_hc", target_flops=0.4, optimizer="momentum", learning_rate=0.1)
    assert resolve_config(on_sgd)[1].gate_learning_rate == 0.1


def _config(name, **overrides):
    config = get_config(name)
    config.update(**overrides)
    return config


def test_requested_target_reads_the_one_given():
    assert requested_target(_config("l0_hc")) is None
    assert requested_target(_config("l0_hc", target_params=0.25)) == Target("params", 0.25)


def test_the_multipliers_rise_while_too_large_and_fall_while_too_small():
    state = {"lambda1": jnp.zeros(()), "lambda2": jnp.zeros(()), "target": jnp.asarray(0.5)}
    larger = ascend(state, jnp.asarray(0.7), 2.0)
    assert float(larger["lambda1"]) == pytest.approx(0.4)  # 2 * (0.7 - 0.5)
    assert float(larger["lambda2"]) == pytest.approx(0.08)  # 2 * 0.2^2
    smaller = ascend(state, jnp.asarray(0.3), 2.0)
    assert float(smaller["lambda1"]) < 0 < float(smaller["lambda2"])
    # the ascent direction is the Lagrangian's gradient in the multipliers
    gradient = jax.grad(lambda m: lagrangian(jnp.asarray(0.7), {**state, **m}))(
        {"lambda1": jnp.zeros(()), "lambda2": jnp.zeros(())}
    )
    assert float(gradient["lambda1"]) > 0 and float(gradient["lambda2"]) > 0


def test_the_target_ramps_from_the_initial_size_to_its_value():
    values = [float(ramped_target(0.3, step, 10.0)) for step in (0, 5, 10, 20)]
    assert values == pytest.approx([1.0, 0.65, 0.3, 0.3])
    values = [float(ramped_target(0.3, step, 10.0, start=0.5)) for step in (0, 5, 10, 20)]
    assert values == pytest.approx([0.5, 0.4, 0.3, 0.3])
    assert float(ramped_target(0.3, 0, 0.0)) == pytest.approx(0.3)
    # a network that starts with gates closed at test time (L0-AR's pi = 0.5 at threshold 0.5)
    method, model = method_for("l0_ar", target_flops=0.3)
    budget = method.init(model)[STATE_KEY]
    assert float(budget["target"]) == float(budget["start"]) == float(budget["size"]) < 1.0


def test_the_proportional_term_adds_to_the_multiplier():
    state = {"lambda1": jnp.asarray(0.3), "lambda2": jnp.asarray(0.5), "target": jnp.asarray(0.5)}
    value, slope = jax.value_and_grad(lambda s: lagrangian(s, state, 10.0))(jnp.asarray(0.7))
    assert float(value) == pytest.approx((0.3 + 10.0 * 0.2) * 0.2 + 0.5 * 0.2**2)
    # d/ds: lambda_1 + k_p (s - t) (the proportional term is a multiplier, not differentiated)
    # + 2 lambda_2 (s - t)
    assert float(slope) == pytest.approx(0.3 + 10.0 * 0.2 + 2 * 0.5 * 0.2)
    assert float(lagrangian(jnp.asarray(0.7), state)) == pytest.approx(0.3 * 0.2 + 0.5 * 0.04)


@pytest.mark.parametrize("name", GATED)
def test_a_positive_multiplier_pulls_every_gate_towards_pruning(name):
    method, model = method_for(name, target_flops=0.3)
    state = method.init(model)
    assert 0 < float(state[STATE_KEY]["size"]) <= 1  # the test-time size at init
    state = {**state, STATE_KEY: {**state[STATE_KEY], "lambda1": jnp.asarray(1.0)}}
    grads = nnx.grad(
        lambda m: method.budget_penalty(m, state), argnums=nnx.DiffState(0, GateParam)
    )(model)
    tree, grads = grads, jax.tree.leaves(grads)
    assert grads and any(np.any(np.asarray(g) != 0) for g in grads)
    if name in ("l1", "bounded_lp", "l0_hc", "l0_arm", "l0_ar"):
        # a descent step lowers every gate parameter (keep probabilities and scales shrink)
        assert all(np.all(np.asarray(g) >= 0) for g in grads)
    else:  # Dep-L0: a generator bias moves one gate's pre-activation only, and lowers it
        biases = [g for path, g in jax.tree_util.tree_leaves_with_path(tree)
                  if "bias" in jax.tree_util.keystr(path)]
        assert biases and all(np.all(np.asarray(g) >= 0) for g in biases)


@pytest.mark.parametrize("name", ["dep_l0", "dep_l0_arm"])
def test_a_saturated_dep_l0_gate_still_feels_the_budget(name):
    method, model = method_for(name, target_flops=0.3)
    generator = generator_of(model)
    # gate 0 of the chain's last layer closed deep in the tanh's saturation (a = -10 - W h)
    last = generator.layers[-1]
    previous = generator()[generator.chain_order()[-2]]
    last.bias[...] = last.bias[...].at[0].add(-10.0 - float(last(previous)[0]))
    state = method.init(model)
    too_small = {**state, STATE_KEY: {**state[STATE_KEY], "lambda1": jnp.asarray(-1.0)}}
    grads = nnx.grad(
        lambda m: method.budget_penalty(m, too_small), argnums=nnx.DiffState(0, GateParam)
    )(model)
    gradient = nnx.clone(model)
    nnx.update(gradient, grads)
    assert float(generator_of(gradient).layers[-1].bias[...][0]) < 0  # descent reopens it
    np.testing.assert_allclose(  # the values are the generator's (to float rounding)
        np.asarray(budget_logits(generator)[generator.chain_order()[-1]]),
        np.asarray(generator()[generator.chain_order()[-1]]), rtol=1e-5,
    )


def test_the_multipliers_of_a_run_track_the_violation(tmp_path):
    config = config_for(method="l0_hc", epochs=2, target_flops=0.3, target_warmup_epochs=1.0)
    train_and_evaluate(config, tmp_path)
    records = [r for r in read_metrics(tmp_path) if "train/budget/lambda1" in r]
    first = records[0]
    # dense at the start and the target falling: the network is too large, lambda_1 grows
    assert first["train/budget/size"] > first["train/budget/target"]
    assert 0 < first["train/budget/lambda1"] < records[-1]["train/budget/lambda1"]
    assert all(b["train/budget/lambda2"] >= a["train/budget/lambda2"]
               for a, b in zip(records, records[1:]))
    assert BUDGET_FIGURE in {path.name for path in plot_run(tmp_path)}


@pytest.mark.parametrize("model", ["mlp", "lenet5"])
@pytest.mark.parametrize("structure", ["unit", "weight"])
def test_the_ratio_count_is_the_accounting_count(model, structure):
    method, built = method_for("gmp", model=model, granularity=structure)
    layers = built.layers
    pruned = [layer.name for layer in layers[:-1]]
    ratio = 0.4
    ratios = dict.fromkeys(pruned, ratio)
    if structure == "unit":
        values = {}
        for layer in layers:
            for slot, _ in layer.outputs:
                if layer.name in ratios:
                    size = layer.out_units
                    values[slot] = (np.arange(size) < size - round(ratio * size)).astype(float)
    else:
        values = {
            layer.kernel_slot: (np.arange(np.prod(layer.kernel_shape)).reshape(layer.kernel_shape)
                                >= round(ratio * np.prod(layer.kernel_shape))).astype(float)
            for layer in layers if layer.name in ratios
        }
    counted = count_network(layers, values)
    dense = count_network(layers, {})
    for kind in ("flops", "params"):
        expected = float(counted[kind]) / float(dense[kind])
        got = kept_fraction(layers, ratios, structure=structure, kind=kind)
        assert got == pytest.approx(expected, rel=1e-6), kind


def test_the_uniform_ratio_meets_the_target_and_refuses_the_unreachable():
    _, built = method_for("gmp", model="lenet5")
    names = [layer.name for layer in built.layers[:-1]]
    for fraction in (0.5, 0.3, 0.15):
        ratio = layers_ratio(built.layers, names, Target("flops", fraction), structure="unit")
        achieved = kept_fraction(built.layers, dict.fromkeys(names, ratio), structure="unit",
                                 kind="flops")
        assert abs(achieved - fraction) < 0.02, fraction
    with pytest.raises(ConfigError, match="below what"):
        layers_ratio(built.layers, names[:1], Target("params", 0.05), structure="unit")


def test_gmp_global_scope_refuses_a_target():
    method, built = method_for("gmp", target_flops=0.5, gmp_scope="global")
    with pytest.raises(ConfigError, match="gmp_scope=layer"):
        method.init(built)


def fashion_config(method, **overrides):
    config = config_for(
        method=method, dataset="fashion_mnist", model="mlp", num_train=2000, num_test=200,
        batch_size=25, epochs=4, log_every=20,
    )
    settings = {"gate_learning_rate": 0.02, "target_flops": 0.5, "target_warmup_epochs": 2.0,
                "prune_end_epoch": 2.0, **overrides}
    config.update({k: v for k, v in settings.items() if k in config})
    return config


GATED_TOLERANCE = {"l0_ar": 0.07}
"""How near a gated method lands in the short run below (320 updates of 25 examples, the target
reached after 160, gates at Adam 2e-2), beyond :data:`TOLERANCE`-sized misses: measured (seed
0) l0_hc 0.496, l0_arm 0.522, dep_l0 0.503, dep_l0_arm 0.498, l1 0.516, bounded_lp 0.499, all
within 0.03; l0_ar 0.441: its gates keep closing after the target is reached (BUILD_NOTES.md,
"Pruning to a budget"). Before the proportional term (``target_kp``) and Dep-L0's budget
gradient, l0_hc ended at 0.73 here and the tolerance was 0.25."""


@needs_fashion_mnist
@pytest.mark.parametrize("method", GATED)
def test_a_gated_method_lands_near_its_flops_target(tmp_path, method):
    summary = train_and_evaluate(fashion_config(method), tmp_path)
    assert summary["target"] == 0.5 and summary["target_kind"] == "flops"
    achieved = summary["achieved_fraction"]
    assert achieved == pytest.approx(summary["flops"] / summary["dense_flops"])
    assert abs(achieved - 0.5) < GATED_TOLERANCE.get(method, 0.03)
    if abs(achieved - 0.5) > TOLERANCE:
        assert summary["target_missed_by"] == pytest.approx(achieved - 0.5)
        assert summary["target_miss_reason"]
    else:
        assert "target_missed_by" not in summary
    assert summary["budget/target"] == pytest.approx(0.5)


@needs_fashion_mnist
@pytest.mark.parametrize("method", RATIO)
def test_a_ratio_method_meets_its_target(tmp_path, method):
    overrides = SHORT_GREG if method.startswith("greg") else {"prune_end_epoch": 2.0}
    summary = train_and_evaluate(fashion_config(method, target_flops=0.3, **overrides), tmp_path)
    if method.startswith("greg"):
        assert summary["greg/phase"] == "finetune", summary["greg/phase"]
    assert summary["target"] == 0.3
    # dead units left by pruned weights count as removed, so a run may land a little below
    assert -0.03 < summary["achieved_fraction"] - 0.3 < TOLERANCE


@needs_fashion_mnist
def test_gmp_by_units_meets_its_target_on_a_traced_model(tmp_path):
    """The MLP is traced: gmp prunes its groups' units, each counted with its readers' rows."""
    config = fashion_config("gmp", target_flops=0.3, gmp_structure="unit", prune_end_epoch=2.0)
    summary = train_and_evaluate(config, tmp_path)
    assert summary["target"] == 0.3
    assert -0.03 < summary["achieved_fraction"] - 0.3 < TOLERANCE


@pytest.mark.parametrize("method", ["l0_hc", "l1"])
def test_a_run_preempted_mid_warmup_resumes_exactly(tmp_path, method, monkeypatch):
    # 8 updates an epoch, the target reached after 24: stopped at update 11
    config = config_for(method=method, epochs=3, target_params=0.4, target_warmup_epochs=3.0,
                        gate_learning_rate=0.05)
    whole = train_and_evaluate(config, tmp_path / "whole")
    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "reached_preemption", lambda self, step: step == 11)
        with pytest.raises(Preempted):
            train_and_evaluate(config, tmp_path / "split")
    saved = latest_checkpoint(tmp_path / "split")["method_state"][STATE_KEY]
    assert 0.4 < float(saved["target"]) < 1.0 and float(saved["lambda2"]) > 0  # mid-warm-up
    resumed = train_and_evaluate(config, tmp_path / "split")
    assert_resumed_like_whole(tmp_path, whole, resumed)


def _transformer(kind, method):
    """lm_tiny or vit_tiny at the tiny sizes of tests/models/test_transformer.py."""
    name, sizes = ("lm_tiny", TINY_LM) if kind == "lm" else ("vit_tiny", TINY_VIT)
    return build_zoo_model(name, rngs=nnx.Rngs(params=0), gate_factory=method.make_gates, **sizes)


@pytest.mark.parametrize("kind", ["lm", "vit"])
def test_closing_every_head_of_a_block_removes_its_attention_products(kind):
    method, _ = method_for("l0_hc", target_flops=0.5)
    model = _transformer(kind, method)
    sizes = TINY_LM if kind == "lm" else TINY_VIT
    tokens = sizes["input_shape"][0] if kind == "lm" else 1 + (8 // sizes["patch_size"]) ** 2
    attention = 2 * sizes["heads"] * sizes["head_dim"] * tokens**2  # Q K^T and A V, one block
    heads = "blocks.1.heads"
    (slot,) = [slot for slot in model.gate_slots if slot.name == heads]
    closed = {heads: jnp.zeros(slot.shape)}
    dense = float(count_network(model.layers, {}, model.activation_products)["flops"])
    projections = float(count_network(model.layers, {})["flops"])
    assert dense - projections == pytest.approx(sizes["depth"] * attention)
    removed = dense * (1.0 - float(size_fraction(model, closed, "flops")))
    removed_projections = projections - float(count_network(model.layers, closed)["flops"])
    assert removed_projections > 0
    assert removed == pytest.approx(removed_projections + attention, rel=1e-5)


@pytest.mark.parametrize("kind", ["lm", "vit"])
def test_a_target_steers_a_transformers_gates(kind):
    # the budget's Lagrangian alone, Adam 0.1 on the gates, 10 updates an epoch: the target
    # falls from 1 to 0.5 over the first 20 of 50 updates. The gates start spread over +-2
    # around their initial log_alpha (left equal, they would all cross the test threshold at
    # the same update, as no data term tells them apart)
    method, _ = method_for("l0_hc", target_flops=0.5, target_warmup_epochs=2.0, target_kp=10.0)
    model = _transformer(kind, method)
    params = nnx.state(model, GateParam)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(
        lambda p: p + jax.random.uniform(next(keys), p.shape, minval=-2.0, maxval=2.0), params
    ))
    state = method.init(model)
    assert float(state[STATE_KEY]["size"]) == pytest.approx(1.0)
    optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=GateParam)

    @nnx.jit
    def update(model, optimizer, state, step):
        state = method.before_update(model, state, step)
        grads = nnx.grad(
            lambda m: method.budget_penalty(m, state), argnums=nnx.DiffState(0, GateParam)
        )(model)
        optimizer.update(model, grads)
        return method.after_update(model, state, step, jax.random.key(0))

    budgets = []
    for step in range(50):
        state = update(model, optimizer, state, jnp.asarray(step))
        budgets.append({k: float(v) for k, v in state[STATE_KEY].items()})
    sizes = [b["size"] for b in budgets]
    multipliers = [b["lambda1"] for b in budgets]
    assert budgets[20]["target"] == pytest.approx(0.5)
    assert 0 < multipliers[10] < multipliers[20]  # too large: lambda_1 grows
    assert min(sizes) < 0.75  # ... and closes gates
    below = [i for i, b in enumerate(budgets) if b["size"] < b["target"]]
    assert below and multipliers[-1] < multipliers[below[0]]  # too small: lambda_1 falls
    assert method.report(model, state)["budget/size"] == pytest.approx(sizes[-1])


@needs_fashion_mnist
def test_a_vit_run_reports_its_target(tmp_path):
    config = config_for(method="l0_hc", model="vit_tiny", dataset="fashion_mnist", epochs=1,
                        num_train=30, num_test=20, batch_size=10, target_flops=0.5,
                        gate_learning_rate=0.1)
    summary = train_and_evaluate(config, tmp_path)
    assert summary["target"] == 0.5 and summary["target_kind"] == "flops"
    assert summary["achieved_fraction"] == pytest.approx(summary["flops"] / summary["dense_flops"])
    assert summary["budget/lambda1"] > 0  # dense at the start, the target falling
