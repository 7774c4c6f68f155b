import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.errors import ConfigError
from sparsejax.gates.hard_concrete import LOG_ALPHA_MAX, LOG_ALPHA_MIN
from sparsejax.methods import METHODS, create_method, cross_entropy
from sparsejax.methods.base import PER_SLOT_FIELDS
from sparsejax.models import MLP, build_model
from sparsejax.train.state import merge_model, split_model


def setup(method_name, model="lenet5", **overrides):
    config = get_config()
    config.method, config.model = method_name, model
    config.update(overrides)
    method = create_method(method_name, config, num_train=60000)
    net = build_model(model, rngs=nnx.Rngs(0), gate_factory=method.make_gate)
    method.prepare_model(net)
    return method, net


def test_registry_lists_the_methods_and_rejects_unknown_names():
    assert {"dense", "l0_hc", "l0_arm", "l0_ar"} <= set(METHODS)
    with pytest.raises(ValueError, match="valid methods: .*l0_arm"):
        create_method("l0_xyz", get_config(), num_train=10)


def test_lambdas_default_to_the_papers_and_must_fit_the_slots():
    method, _ = setup("l0_hc")
    assert method.lambdas == {"conv1": 10.0, "conv2": 0.5, "fc1": 0.1, "fc2": 10.0}
    method, _ = setup("l0_hc", lambdas=(0.3,))
    assert set(method.lambdas.values()) == {0.3}
    with pytest.raises(ValueError, match="4 gate slots"):
        setup("l0_hc", lambdas=(1.0, 2.0))


@pytest.mark.parametrize("name", ["l0_hc", "l0_arm"])
def test_wide_resnet_lambdas_default_to_the_papers(name):
    config = get_config()
    config.method, config.model = name, "wrn28_10"
    method = create_method(name, config, num_train=50000)
    net = nnx.eval_shape(
        lambda: build_model(
            "wrn28_10", rngs=nnx.Rngs(0), gate_factory=method.make_gate, input_shape=(32, 32, 3)
        )
    )
    method.prepare_model(net)
    assert len(method.lambdas) == 12 and set(method.lambdas.values()) == {0.001}


def test_dense_method_builds_no_gates():
    _, net = setup("dense")
    assert len(net.gates) == 0


def test_hard_concrete_projection_clamps_log_alpha():
    method, net = setup("l0_hc")
    _, params, _ = split_model(net)
    params["gates"] = jax.tree.map(lambda a: a * 0 + 9.0, params["gates"])
    clamped = method.project(params)
    assert all(float(a.max()) == pytest.approx(LOG_ALPHA_MAX) for a in jax.tree.leaves(clamped["gates"]))
    params["gates"] = jax.tree.map(lambda a: a * 0 - 9.0, params["gates"])
    assert all(float(a.min()) == pytest.approx(LOG_ALPHA_MIN) for a in jax.tree.leaves(method.project(params)["gates"]))


@pytest.mark.parametrize("name", ["l0_hc", "l0_arm", "l0_ar"])
def test_objective_gradients_reach_gates_and_weights(name):
    method, net = setup(name)
    graphdef, params, rest = split_model(net)
    x = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))
    y = jnp.arange(8) % 10

    def loss(params):
        return method.objective(merge_model(graphdef, params, rest), x, y, jax.random.key(1))[0]

    grads = jax.grad(loss)(params)
    for group in ("net", "gates"):
        leaves = jax.tree.leaves(grads[group])
        assert all(np.all(np.isfinite(g)) for g in leaves)
        assert any(np.any(g != 0) for g in leaves), group


def tiny_arm(per_example, estimator):
    config = get_config()
    config.update(method=estimator, model="mlp", lambdas=(0.0,), l2=0.0, per_example_gates=per_example)
    method = create_method(estimator, config, num_train=100)
    net = MLP(
        rngs=nnx.Rngs(0), input_shape=(2, 1, 1), hidden=(2,), num_classes=2, gate_factory=method.make_gate
    )
    method.prepare_model(net)
    return method, net


@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("estimator", ["l0_arm", "l0_ar"])
def test_method_gate_gradient_is_unbiased_against_enumeration(per_example, estimator):
    """The phi-gradient of the objective, averaged over noise, equals the exact gradient of
    E_z[mean CE] obtained by enumerating the 2^4 gate settings of a 2-2-2 MLP."""
    method, net = tiny_arm(per_example, estimator)
    for i, gate in enumerate(net.gates.values()):
        gate.phi[...] = jnp.array([0.15, -0.1]) * (i + 1)
    graphdef, params, rest = split_model(net)
    x = jnp.array([[1.0, -2.0], [0.5, 1.5], [-1.0, 0.3]]).reshape(3, 2, 1, 1)
    y = jnp.array([0, 1, 1])

    def exact(gate_params):
        model = merge_model(graphdef, {**params, "gates": gate_params}, rest)
        pis = {n: g.probability() for n, g in model.gates.items()}
        total = 0.0
        for bits in itertools.product([0.0, 1.0], repeat=4):
            z = {"fc1": jnp.array(bits[:2]), "fc2": jnp.array(bits[2:])}
            weight = jnp.prod(jnp.stack([jnp.prod(jnp.where(z[n] > 0, pis[n], 1 - pis[n])) for n in z]))
            total = total + weight * jnp.mean(cross_entropy(model(x, train=True, gates=z), y))
        return total

    exact_grad = jax.grad(exact)(params["gates"])

    def estimate(key):
        def loss(gate_params):
            model = merge_model(graphdef, {**params, "gates": gate_params}, rest)
            return method.objective(model, x, y, key)[0]

        return jax.grad(loss)(params["gates"])

    keys = jax.random.split(jax.random.key(0), 40000)
    samples = jax.jit(jax.vmap(estimate))(keys)
    for est, ref in zip(jax.tree.leaves(samples), jax.tree.leaves(exact_grad)):
        mean = est.mean(0)
        stderr = est.std(0) / np.sqrt(est.shape[0])
        np.testing.assert_array_less(np.abs(mean - ref), 5 * stderr + 1e-6)


@pytest.mark.parametrize("name", ["l0_hc", "l0_arm"])
def test_batchnorm_statistics_are_updated_once_per_step(name):
    """With every gate open, the objective must move BatchNorm statistics exactly as one
    training forward pass does (ARM's antithetic pass must not add a second update)."""
    config = get_config()
    config.update(method=name, model="resnet20")
    method = create_method(name, config, num_train=100)
    net = build_model(
        "resnet20", rngs=nnx.Rngs(0), input_shape=(8, 8, 3), gate_factory=method.make_gate
    )
    method.prepare_model(net)
    for gate in net.gates.values():
        for variable in (getattr(gate, "phi", None), getattr(gate, "log_alpha", None)):
            if variable is not None:
                variable[...] = jnp.full(gate.shape, 10.0)
    graphdef, params, rest = split_model(net)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    y = jnp.arange(4) % 10

    def stats_after(fn):
        model = merge_model(graphdef, params, rest)
        fn(model)
        return nnx.state(model, nnx.BatchStat)

    ones = {n: jnp.ones(g.shape) for n, g in net.gates.items()}
    reference = stats_after(lambda m: m(x, train=True, gates=ones))
    after = stats_after(lambda m: method.objective(m, x, y, jax.random.key(1)))
    initial = jax.tree.leaves(nnx.state(merge_model(graphdef, params, rest), nnx.BatchStat))
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(reference), initial))
    for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("field", PER_SLOT_FIELDS)
def test_a_per_slot_field_is_an_error_for_a_method_that_does_not_read_it(method_name, field):
    config = get_config()
    config.update(method=method_name, model="mlp")
    config[field] = (0.1, 0.1)
    if field in METHODS[method_name].per_slot_fields:
        create_method(method_name, config, num_train=100)
    else:
        with pytest.raises(ConfigError, match=f"config.{field}=.* does not apply to method"):
            create_method(method_name, config, num_train=100)

