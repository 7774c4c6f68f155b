import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs.mnist import get_config
from sparsejax.methods import RunInfo, create_method
from sparsejax.methods.optim import build_optimizer, learning_rate_schedule


def test_step_schedule_multiplies_at_each_milestone_epoch():
    schedule = learning_rate_schedule(
        0.1, "step", steps_per_epoch=10, epochs=5, milestones=(2, 4), factor=0.2
    )
    values = [float(schedule(step)) for step in (0, 19, 20, 39, 40, 49)]
    np.testing.assert_allclose(values, [0.1, 0.1, 0.02, 0.02, 0.004, 0.004], rtol=1e-6)


def test_cosine_schedule_ends_at_zero_and_constant_stays():
    cosine = learning_rate_schedule(0.1, "cosine", steps_per_epoch=10, epochs=3)
    assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(30)) == pytest.approx(0.0)
    assert float(learning_rate_schedule(0.3, "constant", steps_per_epoch=1, epochs=1)(99)) == 0.3
    with pytest.raises(ValueError, match="valid schedules"):
        learning_rate_schedule(0.1, "linear", steps_per_epoch=1, epochs=1)


def test_weight_decay_is_coupled_l2_before_momentum():
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.5])}
    tx = build_optimizer("momentum", 0.1, weight_decay=0.01)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["w"], -0.1 * (grads["w"] + 0.01 * params["w"]), rtol=1e-6)
    updates, _ = tx.update(grads, state, params)
    first = grads["w"] + 0.01 * params["w"]
    np.testing.assert_allclose(updates["w"], -0.1 * (first * 0.9 + first), rtol=1e-6)


def test_method_optimizer_gives_gates_their_own_rate_and_no_weight_decay():
    config = get_config()
    config.update(
        optimizer="sgd", learning_rate=0.1, weight_decay=0.5, lr_schedule="step",
        lr_milestones=(1,), gate_learning_rate=0.01,
    )
    method = create_method("l0_hc", config, RunInfo(num_train=10, steps_per_epoch=2, epochs=2))
    tx = method.optimizer()
    params = {"net": {"w": jnp.ones(2)}, "gates": {"a": jnp.ones(2)}}
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    updates = []
    for _ in range(3):
        step_updates, state = tx.update(grads, state, params)
        updates.append(step_updates)
    np.testing.assert_allclose(updates[0]["net"]["w"], -0.1 * 1.5)
    np.testing.assert_allclose(updates[2]["net"]["w"], -0.01 * 1.5, rtol=1e-6)
    np.testing.assert_allclose(updates[0]["gates"]["a"], -0.01)
    np.testing.assert_allclose(updates[2]["gates"]["a"], -0.001, rtol=1e-6)
    with pytest.raises(ValueError, match="lr_schedule"):
        config.lr_schedule = "warm"
        create_method("l0_hc", config, RunInfo(num_train=10))


def test_gate_lr_factor_changes_only_the_gates_milestone_factor():
    config = get_config()
    config.update(
        optimizer="sgd", learning_rate=0.1, lr_schedule="step", lr_milestones=(1,),
        lr_factor=0.1, gate_learning_rate=0.01, gate_lr_factor=0.2,
    )
    method = create_method("l0_hc", config, RunInfo(num_train=10, steps_per_epoch=2, epochs=2))
    tx = method.optimizer()
    params = {"net": {"w": jnp.ones(2)}, "gates": {"a": jnp.ones(2)}}
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["net"]["w"], -0.01, rtol=1e-6)
    np.testing.assert_allclose(updates["gates"]["a"], -0.002, rtol=1e-6)


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="valid optimizers"):
        build_optimizer("rmsprop", 0.1)
    assert isinstance(build_optimizer("nesterov", 0.1), optax.GradientTransformation)
