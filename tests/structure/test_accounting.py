import jax
import numpy as np
import pytest
from flax import nnx

from sparsejax.gates import HardConcreteGate
from sparsejax.models.base import each_slot
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure import (
    count_network,
    gate_report,
    pruning_rate,
    sparsity_report,
    weight_report,
)
from sparsejax.structure.traced_model import build_zoo_model


def lenet():
    return build_zoo_model("lenet5", rngs=nnx.Rngs(0))


def test_dense_lenet5_macs_and_params():
    counts = count_network(lenet().layers, {})
    conv1 = 5 * 5 * 1 * 20 * 24 * 24
    conv2 = 5 * 5 * 20 * 50 * 8 * 8
    assert counts["flops"] == conv1 + conv2 + 800 * 500 + 500 * 10
    assert counts["weights"] == 430_500
    assert counts["params"] == 430_500 + 20 + 50 + 500 + 10


def random_masks(model, rng, p=0.5):
    return {s.name: (rng.random(s.shape) < p).astype(np.float32) for s in model.gate_slots}


def test_lenet5_pruning_rate_matches_the_l0_arm_formula_when_conv2_is_open():
    model = lenet()
    rng = np.random.default_rng(0)
    masks = random_masks(model, rng)
    masks["conv2"] = np.ones(50, np.float32)
    a, b, c, d = (int(masks[n].sum()) for n in ("conv1", "conv2", "fc1", "fc2"))
    expected = 100 * (1 - (25 * a + 25 * a * b + c * d + 10 * d) / 430_500)
    assert pruning_rate(model.layers, masks) == pytest.approx(expected, rel=1e-6)


def test_a_closed_conv2_channel_removes_its_flattened_fc1_inputs():
    model = lenet()
    masks = {"conv2": np.ones(50, np.float32)}
    masks["conv2"][7] = 0
    counts = count_network(model.layers, masks)
    assert counts["weights"] == 500 + 25 * 20 * 49 + (800 - 16) * 500 + 5000


def test_mlp_pruning_rate_matches_the_l0_arm_formula():
    model = build_zoo_model("mlp", rngs=nnx.Rngs(0))
    masks = random_masks(model, np.random.default_rng(1), p=0.3)
    a, b, c = (int(masks[n].sum()) for n in ("fc1", "fc2", "fc3"))
    expected = 100 * (1 - (a * b + b * c + c * 10) / 266_200)
    assert pruning_rate(model.layers, masks) == pytest.approx(expected, rel=1e-6)


def test_expected_counts_equal_the_monte_carlo_mean_of_mask_counts():
    model = lenet()
    rng = np.random.default_rng(2)
    probs = {s.name: rng.random(s.shape).astype(np.float32) for s in model.gate_slots}
    expected = count_network(model.layers, probs)
    draws = [
        count_network(
            model.layers, {n: (rng.random(p.shape) < p).astype(np.float32) for n, p in probs.items()}
        )
        for _ in range(300)
    ]
    for key in ("params", "flops"):
        values = np.array([float(d[key]) for d in draws])
        stderr = values.std() / np.sqrt(len(values))
        assert abs(values.mean() - float(expected[key])) < 5 * stderr


def test_weight_granularity_counts_the_open_kernel_entries():
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0), granularity="weight")
    rng = np.random.default_rng(3)
    masks = {l.name: (rng.random(l.kernel_shape) < 0.2).astype(np.float32) for l in model.layers}
    counts = count_network(model.layers, masks)
    assert counts["weights"] == sum(m.sum() for m in masks.values())
    assert counts["flops"] == sum(m.sum() * l.out_positions for m, l in zip(masks.values(), model.layers))


def test_gate_report_of_a_gated_model():
    @each_slot
    def factory(slot, rngs):
        return HardConcreteGate(slot.shape, rngs=rngs, droprate_init=0.5)

    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0), gate_factory=factory)
    model.gates["conv1"].log_alpha[...] = jax.numpy.where(
        jax.numpy.arange(20) < 5, -5.0, 3.0
    )
    report = gate_report(model)
    assert report.active_units == {"conv1": 15, "conv2": 50, "fc1": 800, "fc2": 500}
    assert report.architecture == "15-50-800-500"
    assert report.dense_params == 431_080
    assert report.params < report.dense_params
    assert 0 < report.expected_l0 < report.dense_params
    dense_report = gate_report(build_zoo_model("lenet5", rngs=nnx.Rngs(0)))
    assert dense_report.architecture == "20-50-800-500" and dense_report.pruning_rate == 0.0


def test_weight_report_of_an_ungated_network_is_the_slim_network_less_its_zero_weights():
    model = lenet()
    conv1 = model.layer_module("conv1")
    conv1.kernel[...] = conv1.kernel[...].at[..., np.array([0, 3])].set(0.0)  # two filters
    conv1.bias[...] = conv1.bias[...].at[np.array([0, 3])].set(0.0)
    fc1 = model.layer_module("fc1")
    zeroed = np.random.default_rng(0).random(fc1.kernel.shape) < 0.3  # unstructured, in fc1
    fc1.kernel[...] = np.where(zeroed, 0.0, np.asarray(fc1.kernel[...]))
    images = np.asarray(jax.random.normal(jax.random.key(0), (4, 28, 28, 1)))
    slim = slim_traced_model(model, images).report

    report = weight_report(model)
    assert report.active_units == {"conv1": 18, "conv2": 50, "fc1": 800, "fc2": 500}
    assert report.params == slim.params_after - zeroed.sum()
    assert report.flops == slim.flops_after - zeroed.sum()  # one position per dense weight
    dense_weights = count_network(model.layers, {})["weights"]
    kept_weights = slim.params_after - zeroed.sum() - (18 + 50 + 500 + 10)
    assert report.pruning_rate == pytest.approx(100 * (1 - kept_weights / dense_weights))
    assert (report.expected_l0, report.expected_flops) == (report.params, report.flops)
    assert sparsity_report(model) == report


def test_sparsity_report_reads_the_gates_of_a_gated_network():
    @each_slot
    def factory(slot, rngs):
        return HardConcreteGate(slot.shape, rngs=rngs, droprate_init=0.5)

    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0), gate_factory=factory)
    model.gates["fc1"].log_alpha[...] = jax.numpy.where(jax.numpy.arange(800) < 100, -5.0, 3.0)
    model.layer_module("fc2").kernel[...] = 0.0  # zero weights do not count where gates decide
    report = sparsity_report(model)
    assert report.architecture == "20-50-700-500"
    assert set(report.test_gates) == {"conv1", "conv2", "fc1", "fc2"}
