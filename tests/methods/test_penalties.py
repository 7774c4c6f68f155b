import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.methods.penalties import expected_l0, gated_l2
from sparsejax.structure.traced_model import build_zoo_model


def test_expected_l0_weights_each_slot_by_group_size_over_n():
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0))
    probs = {s.name: jnp.full(s.shape, 0.5) for s in model.gate_slots}
    lambdas = {"conv1": 10.0, "conv2": 0.5, "fc1": 0.1, "fc2": 10.0}
    value = expected_l0(model.gate_slots, probs, lambdas, 60000)
    hand = (10 * 26 * 10 + 0.5 * 501 * 25 + 0.1 * 500 * 400 + 10 * 10 * 250) / 60000
    assert float(value) == pytest.approx(hand, rel=1e-6)
    buggy = expected_l0(model.gate_slots, probs, lambdas, 60000, reference_bias_sign=True)
    assert float(value - buggy) == pytest.approx((10 * 2 * 10 + 0.5 * 2 * 25) / 60000, rel=1e-5)


def test_gated_l2_weights_groups_by_keep_probability():
    model = build_zoo_model("mlp", rngs=nnx.Rngs(0), hidden=(3, 2), input_shape=(2, 2, 1),
                            num_classes=2)
    probs = {"fc1": jnp.array([1.0, 0.5, 0.0, 0.25])}
    value = gated_l2(model, probs, 0.1)
    w1, b1 = np.asarray(model.net.fc1.kernel[...]), np.asarray(model.net.fc1.bias[...])
    rest = sum(
        np.sum(np.square(np.asarray(p[...])))
        for layer in (model.net.fc2, model.net.fc3)
        for p in (layer.kernel, layer.bias)
    )
    hand = 0.05 * (np.sum(np.asarray(probs["fc1"]) * np.sum(w1**2, axis=1)) + np.sum(b1**2) + rest)
    assert float(value) == pytest.approx(hand, rel=1e-5)
    assert float(gated_l2(model, probs, 0.0)) == 0.0


def test_conv_gates_also_weight_their_bias():
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0))
    model.net.conv1.bias[...] = jnp.ones(20)
    closed = {"conv1": jnp.zeros(20)}
    open_ = {"conv1": jnp.ones(20)}
    conv1_kernel = float(jnp.sum(model.net.conv1.kernel[...] ** 2))
    diff = float(gated_l2(model, open_, 2.0) - gated_l2(model, closed, 2.0))
    assert diff == pytest.approx(conv1_kernel + 20.0, rel=1e-5)
