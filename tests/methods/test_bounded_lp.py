import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.estimators.bounded_lp import bounded_norm, prox_bounded_l1
from sparsejax.gates.scale import ScaleGate
from sparsejax.methods import METHODS, RunInfo, create_method, cross_entropy
from sparsejax.methods.bounded_lp import BOUNDED_LAMBDAS, L1_LAMBDAS
from sparsejax.structure import gate_report
from sparsejax.structure.traced_model import build_zoo_model
from sparsejax.train import train_and_evaluate
from sparsejax.train.state import merge_model, split_model
from sparsejax.train.step import apply_after_update
from tests.methods.test_methods import method_config


def setup(name, model="lenet5", **overrides):
    method = create_method(name, method_config(name, model, **overrides), RunInfo(1000))
    net = build_zoo_model(model, rngs=nnx.Rngs(0), gate_factory=method.make_gates)
    method.init(net)
    return method, net


def tiny(name, run=RunInfo(num_train=256), **overrides):
    """A 4-3-2 MLP whose labels depend on inputs 0 and 1 only, trained by plain SGD."""
    config = method_config(name, "mlp", optimizer="sgd", learning_rate=0.5, l2=0.0)
    config.update(overrides)
    method = create_method(name, config, run)
    net = build_zoo_model(
        "mlp", rngs=nnx.Rngs(0), input_shape=(4, 1, 1), hidden=(3,), num_classes=2,
        gate_factory=method.make_gates,
    )
    x = jax.random.normal(jax.random.key(0), (256, 4, 1, 1))
    y = (x[:, 0, 0, 0] + x[:, 1, 0, 0] > 0).astype(jnp.int32)
    return method, net, x, y


def train(method, net, x, y, steps):
    tx = method.optimizer()
    graphdef, params, rest = split_model(net)
    method_state = method.init(net)
    opt_state = tx.init(params)
    key = jax.random.key(1)

    def loss(params, rest):
        return method.objective(merge_model(graphdef, params, rest), method_state, x, y, key)[0]

    @jax.jit
    def step(params, rest, opt_state, index):
        updates, opt_state = tx.update(jax.grad(loss)(params, rest), opt_state, params)
        params, rest, _ = apply_after_update(
            method, graphdef, optax.apply_updates(params, updates), rest, method_state, index, key
        )
        return params, rest, opt_state

    for index in range(steps):
        params, rest, opt_state = step(params, rest, opt_state, jnp.int32(index))
    return merge_model(graphdef, params, rest)


def test_registry_lists_the_gate_sparsity_methods():
    assert {"l1", "bounded_lp"} <= set(METHODS)


def test_scale_gate_is_its_value_in_training_and_evaluation():
    gate = ScaleGate(4)
    np.testing.assert_array_equal(gate(train=True), np.ones(4))
    gate.value[...] = jnp.array([0.0, 0.5, 2.0, 0.0])
    np.testing.assert_array_equal(gate(train=True), gate(train=False))
    np.testing.assert_array_equal(gate.test_gate(), [0.0, 0.5, 2.0, 0.0])
    np.testing.assert_array_equal(gate.prob_nonzero(), [0.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("name", ["l1", "bounded_lp"])
def test_proximal_training_drives_the_useless_input_gates_to_exact_zero(name):
    method, net, x, y = tiny(name, gate_lambda=(0.05, 0.0), sigma=0.5)
    trained = train(method, net, x, y, steps=150)
    inputs = np.asarray(trained.gates["fc1"].test_gate())
    assert np.all(inputs[2:] == 0.0), inputs
    assert np.all(inputs[:2] > 0.1), inputs
    assert np.all(np.asarray(trained.gates["fc2"].test_gate()) >= 0.0)
    logits = trained(x, train=False)
    assert float(jnp.mean(jnp.argmax(logits, -1) == y)) > 0.9
    assert gate_report(trained).active_units["fc1"] == 2


@pytest.mark.parametrize("name", ["l1", "bounded_lp"])
def test_after_update_applies_the_nonnegative_prox_with_the_learning_rate_as_step(name):
    rate, lam, sigma = 0.5, 0.3, 0.4
    method, model, _, _ = tiny(name, gate_lambda=lam, sigma=sigma, learning_rate=rate)
    values = jnp.array([-0.5, 0.0, 0.1, 0.2, 0.9, 3.0])
    model.gates["fc1"].value[...] = values[:4]
    model.gates["fc2"].value[...] = values[3:]
    method.after_update(model, method.init(model), jnp.int32(0), jax.random.key(0))
    got = np.concatenate([model.gates["fc1"].test_gate(), model.gates["fc2"].test_gate()])
    threshold = rate * lam
    if name == "l1":
        expected = np.maximum(np.asarray(values) - threshold, 0.0)
    else:
        expected = np.maximum(np.asarray(prox_bounded_l1(values, threshold, sigma)), 0.0)
    np.testing.assert_allclose(got, np.concatenate([expected[:4], expected[3:]]), rtol=1e-6)
    assert got[0] == got[1] == got[2] == 0.0


def test_prox_step_size_follows_the_gate_learning_rate_schedule():
    method, net, _, _ = tiny(
        "l1", RunInfo(num_train=256, steps_per_epoch=10, epochs=2), gate_lambda=1.0,
        learning_rate=0.1, lr_schedule="step", lr_milestones=(1,), lr_factor=0.1,
    )
    graphdef, params, rest = split_model(net)
    for step, expected in [(0, 0.9), (10, 0.99)]:
        model = merge_model(graphdef, params, rest)
        method.after_update(model, {}, jnp.int32(step), jax.random.key(0))
        np.testing.assert_allclose(model.gates["fc1"].test_gate(), expected, rtol=1e-6)


def test_gate_penalty_enters_the_gradient_only_when_it_has_no_prox():
    x = jax.random.normal(jax.random.key(0), (16, 4, 1, 1))
    y = jnp.arange(16) % 2

    def gate_grads(**overrides):
        method, net, _, _ = tiny("bounded_lp", gate_lambda=0.7, sigma=0.5, **overrides)
        graphdef, params, rest = split_model(net)

        def loss(gates, penalised):
            model = merge_model(graphdef, {**params, "gates": gates}, rest)
            if penalised:
                return method.objective(model, {}, x, y, jax.random.key(0))[0]
            return jnp.mean(cross_entropy(model(x, train=False), y))

        return [np.asarray(jax.grad(loss)(params["gates"], flag)["gates"]["fc1"]["value"][...])
                for flag in (True, False)]

    with_prox, data_only = gate_grads(p=1.0)
    np.testing.assert_allclose(with_prox, data_only, rtol=1e-6)
    smooth, data_only = gate_grads(p=2.0)
    analytic = jax.grad(bounded_norm)(jnp.ones(4), 0.5, 2.0)
    np.testing.assert_allclose(smooth, data_only + 0.7 * np.asarray(analytic), rtol=1e-5)


def test_filter_penalty_is_the_bounded_norm_of_the_gated_groups():
    method, net = setup("bounded_lp", filter_lambda=0.2, filter_sigma=3.0, gate_lambda=0.0, l2=0.0)
    conv2 = net.net.conv2
    conv2.kernel[...] = conv2.kernel[...].at[..., 7].set(0.0)
    conv2.bias[...] = conv2.bias[...].at[3].set(1.5)
    norms = {
        "conv1": np.sqrt(np.sum(np.asarray(net.net.conv1.kernel[...]) ** 2, axis=(0, 1, 2))
                         + np.asarray(net.net.conv1.bias[...]) ** 2),
        "conv2": np.sqrt(np.sum(np.asarray(conv2.kernel[...]) ** 2, axis=(0, 1, 2))
                         + np.asarray(conv2.bias[...]) ** 2),
        "fc1": np.linalg.norm(np.asarray(net.net.fc1.kernel[...]), axis=1),
        "fc2": np.linalg.norm(np.asarray(net.net.fc2.kernel[...]), axis=1),
    }
    expected = 0.2 * sum(np.sum(1 - np.exp(-n / 3.0)) for n in norms.values())
    assert float(method.penalty(net, {})) == pytest.approx(expected, rel=1e-5)
    graphdef, params, rest = split_model(net)
    grads = jax.grad(lambda p: method.penalty(merge_model(graphdef, p, rest), {}))(params)
    kernel_grad = np.asarray(grads["net"]["net"]["conv2"]["kernel"][...])
    assert np.all(np.isfinite(kernel_grad))
    assert np.all(kernel_grad[..., 7] == 0.0) and np.any(kernel_grad[..., 6] != 0.0)


def test_defaults_come_from_the_model_table_and_bad_values_are_refused():
    method, net = setup("bounded_lp")
    assert set(method.gate_lambdas(net).values()) == {BOUNDED_LAMBDAS["lenet5"]}
    assert method.sigma == 0.5
    method, net = setup("l1", model="mlp")
    assert set(method.gate_lambdas(net).values()) == {L1_LAMBDAS["mlp"]}
    method, net = setup("l1", gate_lambda=(1.0, 2.0, 3.0, 4.0))
    assert method.gate_lambdas(net) == {"conv1": 1.0, "conv2": 2.0, "fc1": 3.0, "fc2": 4.0}
    with pytest.raises(ValueError, match="4 gate slots"):
        setup("l1", gate_lambda=(1.0, 2.0))
    with pytest.raises(ValueError, match="p must be >= 1"):
        setup("bounded_lp", p=0.5)
    with pytest.raises(ValueError, match="sigma must be positive"):
        setup("bounded_lp", sigma=0.0)
    with pytest.raises(ValueError, match="gate_lambda must be >= 0"):
        setup("l1", gate_lambda=-1.0)


@pytest.mark.parametrize("name", ["l1", "bounded_lp"])
def test_short_run_prunes_input_pixels_and_reports_them(tmp_path, name):
    config = get_config(name)
    config.update(
        dataset="synthetic", model="mlp", epochs=1, batch_size=64, num_train=512,
        num_test=128, log_every=4, eval_batch_size=128, gate_lambda=(2.0, 0.0, 0.0),
        gate_learning_rate=0.1, **({"sigma": 0.5} if name == "bounded_lp" else {}),
    )
    summary = train_and_evaluate(config, tmp_path)
    pixels, hidden1, hidden2 = summary["active_units"]
    assert 0 < pixels < 784
    assert (hidden1, hidden2) == (300, 100)
    assert summary["params"] < summary["dense_params"]
    assert summary["pruning_rate"] > 0.0


def test_smooth_penalty_sets_only_the_gates_at_or_below_the_threshold_to_zero():
    method, net, _, _ = tiny("bounded_lp", gate_lambda=0.3, sigma=0.5, p=2.0, gate_threshold=0.05)
    values = jnp.array([0.0, 0.03, 0.05, 0.06])
    net.gates["fc1"].value[...] = values
    method.after_update(net, {}, jnp.int32(0), jax.random.key(0))
    got = np.asarray(net.gates["fc1"].test_gate())
    np.testing.assert_allclose(got, [0.0, 0.0, 0.0, 0.06], rtol=1e-6)
