import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.estimators import hard_concrete
from sparsejax.gates import BinaryGate, HardConcreteGate, gate_units
from sparsejax.gates.base import logit


def hc_gate(**kwargs):
    return HardConcreteGate(kwargs.pop("shape", 16), rngs=nnx.Rngs(params=0), **kwargs)


def test_hard_concrete_init_follows_droprate():
    gate = hc_gate(shape=4000, droprate_init=0.2)
    log_alpha = np.asarray(gate.log_alpha[...])
    assert abs(log_alpha.mean() - logit(0.8)) < 1e-3
    assert 0.008 < log_alpha.std() < 0.012


def test_hard_concrete_same_key_same_gates_and_fresh_keys_differ():
    gate = hc_gate()
    a = gate(train=True, rngs=nnx.Rngs(gates=1))
    b = gate(train=True, rngs=nnx.Rngs(gates=1))
    c = gate(train=True, rngs=nnx.Rngs(gates=2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_hard_concrete_stream_advances_between_draws():
    gate = hc_gate()
    rngs = nnx.Rngs(gates=3)
    assert not np.array_equal(gate.sample(rngs), gate.sample(rngs))


def test_hard_concrete_eval_is_the_deterministic_rule():
    gate = hc_gate()
    expected = hard_concrete.deterministic(gate.log_alpha[...])
    np.testing.assert_allclose(gate(train=False), expected)
    np.testing.assert_allclose(gate.prob_nonzero(), hard_concrete.prob_nonzero(gate.log_alpha[...]))


def test_per_example_noise_has_a_batch_axis_and_differs_per_row():
    gate = hc_gate(per_example=True)
    z = gate(train=True, rngs=nnx.Rngs(gates=0), batch_size=5)
    assert z.shape == (5, 16)
    assert not np.array_equal(z[0], z[1])
    with pytest.raises(ValueError, match="batch size"):
        gate(train=True, rngs=nnx.Rngs(gates=0))


def test_training_without_rngs_is_a_clear_error():
    with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
        hc_gate()(train=True)


def test_weight_granularity_gate_has_kernel_shape():
    gate = hc_gate(shape=(5, 5, 1, 20))
    assert gate(train=True, rngs=nnx.Rngs(gates=0)).shape == (5, 5, 1, 20)


def test_invalid_droprate_is_rejected():
    with pytest.raises(ValueError, match="droprate_init"):
        hc_gate(droprate_init=0.0)


def test_binary_gate_samples_are_bernoulli_pi():
    gate = BinaryGate(6, rngs=nnx.Rngs(params=0), droprate_init=0.3, per_example=True)
    z = gate(train=True, rngs=nnx.Rngs(gates=0), batch_size=20000)
    assert set(np.unique(z)) <= {0.0, 1.0}
    pi = np.asarray(gate.probability())
    np.testing.assert_allclose(z.mean(0), pi, atol=5 * np.sqrt(0.25 / 20000))
    np.testing.assert_allclose(pi, 0.7, atol=0.01)


@pytest.mark.parametrize("rule", ["binary", "scaled"])
def test_binary_gate_test_rule(rule):
    gate = BinaryGate(4, rngs=nnx.Rngs(params=0), test_rule=rule)
    gate.phi[...] = jnp.array([-0.2, -0.01, 0.01, 0.3])
    pi = np.asarray(gate.probability())
    expected = np.where(pi >= 0.5, pi if rule == "scaled" else 1.0, 0.0)
    np.testing.assert_allclose(gate(train=False), expected)
    np.testing.assert_array_equal(np.asarray(gate(train=False)) > 0, [False, False, True, True])


def test_binary_gate_rejects_unknown_choices():
    with pytest.raises(ValueError, match="test_rule"):
        BinaryGate(3, rngs=nnx.Rngs(params=0), test_rule="soft")
    with pytest.raises(ValueError, match="sigmoid"):
        BinaryGate(3, rngs=nnx.Rngs(params=0), gate_fn="tanh")


def test_gate_units_broadcasts_per_example_gates_over_space():
    x = jnp.ones((2, 3, 3, 4))
    z = jnp.array([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 0.0, 2.0]])
    y = gate_units(x, z)
    np.testing.assert_array_equal(y[1, 2, 0], z[1])
    np.testing.assert_array_equal(gate_units(x, z[0])[1, 1, 1], z[0])
    with pytest.raises(ValueError, match="do not fit"):
        gate_units(x, jnp.ones((3, 4)))


def test_gradient_reaches_log_alpha_through_a_sample():
    graphdef, params = nnx.split(hc_gate())

    def loss(params):
        gate = nnx.merge(graphdef, params)
        return jnp.sum(gate(train=True, rngs=nnx.Rngs(gates=0)))

    grad = jax.tree.leaves(jax.grad(loss)(params))[0]
    assert np.all(np.isfinite(grad)) and np.any(grad > 0)
