import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.errors import ConfigError
from sparsejax.gates.hard_concrete import LOG_ALPHA_MAX, LOG_ALPHA_MIN
from sparsejax.methods import METHODS, RunInfo, create_method, cross_entropy
from sparsejax.structure.traced_model import build_zoo_model
from sparsejax.train.config import resolve_config
from sparsejax.train.state import merge_model, split_model


def method_config(method_name, model="lenet5", **overrides):
    """The MNIST config of ``method_name`` training ``model``, with ``overrides``."""
    config = get_config(method_name)
    config.model = model
    config.update(overrides)
    return config


def setup(method_name, model="lenet5", **overrides):
    config = method_config(method_name, model, **overrides)
    method = create_method(method_name, config, RunInfo(num_train=60000))
    net = build_zoo_model(model, rngs=nnx.Rngs(0), gate_factory=method.make_gates)
    method.init(net)
    return method, net


def test_registry_lists_the_methods_and_rejects_unknown_names():
    assert {"dense", "l0_hc", "l0_arm", "l0_ar", "gmp"} <= set(METHODS)
    with pytest.raises(ConfigError, match="valid methods: .*l0_arm"):
        create_method("l0_xyz", get_config(), RunInfo(num_train=10))


def test_lambdas_default_to_the_papers_and_must_fit_the_slots():
    method, net = setup("l0_hc")
    assert method.lambdas(net) == {"conv1": 10.0, "conv2": 0.5, "fc1": 0.1, "fc2": 10.0}
    assert method.config.lambdas == (10.0, 0.5, 0.1, 10.0)
    method, net = setup("l0_hc", lambdas=(0.3,))
    assert set(method.lambdas(net).values()) == {0.3}
    with pytest.raises(ValueError, match="4 gate slots"):
        setup("l0_hc", lambdas=(1.0, 2.0))


@pytest.mark.parametrize("name", ["l0_hc", "l0_arm"])
def test_wide_resnet_lambdas_default_to_the_papers(name):
    method = create_method(name, method_config(name, "wrn28_10"), RunInfo(num_train=50000))
    net = nnx.eval_shape(
        lambda: build_zoo_model(
            "wrn28_10", rngs=nnx.Rngs(0), gate_factory=method.make_gates, input_shape=(32, 32, 3)
        )
    )
    lambdas = method.lambdas(net)
    assert len(lambdas) == 12 and set(lambdas.values()) == {0.001}


def test_dense_method_builds_no_gates():
    _, net = setup("dense")
    assert len(net.gates) == 0


def test_hard_concrete_projection_clamps_log_alpha():
    method, net = setup("l0_hc")
    for value, bound in ((9.0, LOG_ALPHA_MAX), (-9.0, LOG_ALPHA_MIN)):
        for gate in net.gates.values():
            gate.log_alpha[...] = jnp.full(gate.shape, value)
        method.after_update(net, {}, jnp.int32(0), jax.random.key(0))
        assert all(
            np.allclose(gate.log_alpha[...], bound) for gate in net.gates.values()
        ), value


@pytest.mark.parametrize("name", ["l0_hc", "l0_arm", "l0_ar"])
def test_objective_gradients_reach_gates_and_weights(name):
    method, net = setup(name)
    graphdef, params, rest = split_model(net)
    x = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))
    y = jnp.arange(8) % 10

    def loss(params):
        model = merge_model(graphdef, params, rest)
        return method.objective(model, {}, x, y, jax.random.key(1))[0]

    grads = jax.grad(loss)(params)
    for group in ("net", "gates"):
        leaves = jax.tree.leaves(grads[group])
        assert all(np.all(np.isfinite(g)) for g in leaves)
        assert any(np.any(g != 0) for g in leaves), group


def tiny_arm(per_example, estimator):
    config = method_config(
        estimator, "mlp", lambdas=(0.0,), l2=0.0, per_example_gates=per_example
    )
    method = create_method(estimator, config, RunInfo(num_train=100))
    net = build_zoo_model(
        "mlp", rngs=nnx.Rngs(0), input_shape=(2, 1, 1), hidden=(2,), num_classes=2,
        gate_factory=method.make_gates,
    )
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
            return method.objective(model, {}, x, y, key)[0]

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
    method = create_method(name, method_config(name, "resnet20"), RunInfo(num_train=100))
    net = build_zoo_model(
        "resnet20", rngs=nnx.Rngs(0), input_shape=(8, 8, 3), gate_factory=method.make_gates
    )
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
    after = stats_after(lambda m: method.objective(m, {}, x, y, jax.random.key(1)))
    initial = jax.tree.leaves(nnx.state(merge_model(graphdef, params, rest), nnx.BatchStat))
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(reference), initial))
    for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


OPTIONAL_FIELDS = {
    "droprate_init", "generator_input_width", "filter_sigma", "pretrained",
    "target_flops", "target_params", "target_warmup_epochs", "target_kp",
}
"""Fields whose unset value (None) is itself a setting: derived from the model when used."""
DERIVED_FIELDS = {"lambdas", "lamba", "pretrain_epochs", "prune_end_epoch"}
"""Fields whose default depends on other fields (checked by their methods' tests)."""


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("model", ["mlp", "lenet5"])
def test_the_resolved_config_of_a_default_run_holds_the_declared_defaults(method_name, model):
    cls, resolved = resolve_config(method_config(method_name, model))
    assert cls is METHODS[method_name]
    for name, field in cls.fields.items():
        if name in OPTIONAL_FIELDS:
            continue
        assert resolved[name] is not None, name
        if name not in DERIVED_FIELDS:
            assert resolved[name] == field.default_for(model), name
    if method_name in ("l0_hc", "l0_arm", "l0_ar"):
        assert resolved.lambdas == {"mlp": (0.1,) * 3, "lenet5": (10.0, 0.5, 0.1, 10.0)}[model]


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_a_field_of_another_method_is_refused_when_set_and_dropped_when_unset(method_name):
    other = "stage_pr" if method_name not in ("greg1", "greg2") else "lambdas"
    config = method_config(method_name, "mlp")
    with config.unlocked():
        config[other] = None
    _, resolved = resolve_config(config)
    assert other not in resolved
    config[other] = 0.5
    with pytest.raises(ConfigError, match=f"{other!r} is not a field of method {method_name!r}"):
        resolve_config(config)


def test_a_misspelt_field_is_refused_with_a_suggestion():
    config = method_config("l0_hc", "mlp")
    with config.unlocked():
        config.lambda_s = 0.1
    with pytest.raises(ConfigError, match="did you mean 'lambdas'"):
        resolve_config(config)


GATELESS = {"dense", "greg1", "greg2", "stochastic", "gmp"}


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_the_gate_optimizer_a_run_uses_is_written_out(method_name):
    """Unset gate optimizer fields resolve to the values used: the network's (Dep-L0: its
    generator's Adam at 1e-3), and stay unset for a method without gates."""
    config = method_config(method_name, "lenet5", optimizer="sgd", learning_rate=0.05,
                           lr_schedule="step", lr_factor=0.2)
    _, resolved = resolve_config(config)
    fields = ("gate_optimizer", "gate_learning_rate", "gate_lr_schedule", "gate_lr_factor")
    values = tuple(resolved[field] for field in fields)
    if method_name in GATELESS:
        assert values == (None,) * 4
    elif method_name.startswith("dep_l0"):
        assert values == ("adam", 1e-3, "step", 0.2)
    else:
        assert values == ("sgd", 0.05, "step", 0.2)
    config.gate_learning_rate = 0.3
    assert resolve_config(config)[1].gate_learning_rate == 0.3
