import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.methods import METHODS, RunInfo, create_method
from sparsejax.methods.prune_sampling import (
    cubic_sparsity,
    inclusion_probabilities,
    sample_zeroed,
    zeroing_weights,
)
from sparsejax.models.base import ChannelCoupling, Layer
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure.nodes import alive_units, node_report
from sparsejax.structure.traced_model import build_zoo_model
from sparsejax.train import Preempted, train_and_evaluate
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.loop import build, load_data
from sparsejax.train.metrics import read_metrics
from sparsejax.train.state import init_state, merge_model, split_model
from tests.methods.test_methods import method_config
from tests.train.test_loop import comparable, config_for

SIGNIFICANCE = 1e-3


def test_cubic_schedule_matches_zhu_and_gupta():
    steps = jnp.array([0, 10, 35, 60, 110, 200])
    got = cubic_sparsity(steps, initial=0.1, final=0.9, start=10, end=110)
    progress = np.clip((np.asarray(steps) - 10) / 100, 0, 1)
    np.testing.assert_allclose(got, 0.9 + (0.1 - 0.9) * (1 - progress) ** 3, rtol=1e-6)
    assert float(cubic_sparsity(jnp.int32(5), initial=0.0, final=0.5, start=5, end=5)) == 0.5
    with pytest.raises(ValueError, match="ends"):
        cubic_sparsity(jnp.int32(0), initial=0.0, final=0.5, start=5, end=4)


def reference_inclusion(weights, count):
    """q = min(1, c w) with sum q = count, c found by bisection."""
    low, high = 0.0, 1e12
    for _ in range(200):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if np.minimum(1, middle * weights).sum() < count else (low, middle)
    return np.minimum(1.0, high * weights)


@pytest.mark.parametrize("count", [0.0, 0.3, 4.0, 17.5, 29.0])
def test_inclusion_probabilities_sum_to_the_count_and_are_proportional_below_one(count):
    weights = np.random.default_rng(0).uniform(0, 1, 30) ** 3
    got = np.asarray(inclusion_probabilities(jnp.asarray(weights, jnp.float32), jnp.float32(count)))
    np.testing.assert_allclose(got, reference_inclusion(weights, count), rtol=1e-4, atol=1e-6)
    assert got.sum() == pytest.approx(count, abs=1e-4)
    assert np.all(got <= 1.0)


def test_inclusion_count_is_capped_by_the_positive_weights():
    weights = jnp.array([0.0, 0.2, 0.0, 1.0])
    np.testing.assert_allclose(inclusion_probabilities(weights, jnp.float32(3.0)), [0, 1, 0, 1])


def test_zeroing_weights_favour_small_survivors_and_skip_pruned_entries():
    kernel = jnp.array([0.05, -0.1, 0.2, 0.4, -0.8, 0.0])
    survivors = jnp.array([True, True, True, True, True, False])
    weights = np.asarray(zeroing_weights(kernel, survivors, temperature=0.5))
    scale = np.mean(np.abs(np.asarray(kernel[:5])))
    np.testing.assert_allclose(
        weights[:5], np.exp(-(np.abs(np.asarray(kernel[:5])) - 0.05) / (0.5 * scale)), rtol=1e-6
    )
    assert weights[5] == 0.0
    assert np.all(np.diff(weights[:5][np.argsort(np.abs(np.asarray(kernel[:5])))]) < 0)


def test_sampled_zeroing_frequencies_follow_the_stated_probabilities():
    """Chi-square test of the per-weight zeroing counts over many draws, and the mean count."""
    rng = np.random.default_rng(1)
    kernel = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
    survivors = jnp.asarray(rng.uniform(size=(6, 8)) > 0.2)
    count, temperature, draws = 7.0, 0.4, 20000
    q = np.asarray(inclusion_probabilities(zeroing_weights(kernel, survivors, temperature),
                                           jnp.float32(count)))
    samples = jax.vmap(lambda k: sample_zeroed(k, kernel, survivors, jnp.float32(count), temperature))(
        jax.random.split(jax.random.key(0), draws)
    )
    frequencies = np.asarray(samples.sum(0)).reshape(-1)
    q = q.reshape(-1)
    assert np.all(frequencies[~np.asarray(survivors).reshape(-1)] == 0)
    random = (q > 0) & (q < 1)
    assert random.sum() > 20
    expected = draws * q[random]
    chi2 = np.sum((frequencies[random] - expected) ** 2 / (expected * (1 - q[random])))
    dof = int(random.sum())
    p_value = float(jax.scipy.special.gammaincc(dof / 2, chi2 / 2))
    assert p_value > SIGNIFICANCE, (chi2, dof)
    totals = np.asarray(samples.sum((1, 2)))
    standard_error = np.sqrt(np.sum(q * (1 - q)) / draws)
    assert abs(totals.mean() - count) < 5 * standard_error


def tiny_stochastic(**overrides):
    config = method_config(
        "stochastic", "mlp", l2=0.0, l1=0.0, prune_start_epoch=1.0, prune_end_epoch=3.0,
        final_sparsity=0.8,
    )
    config.update(overrides)
    method = create_method("stochastic", config, RunInfo(100, steps_per_epoch=10, epochs=4))
    net = build_zoo_model("mlp", rngs=nnx.Rngs(0), input_shape=(8, 8, 1), hidden=(40,),
                          num_classes=10)
    return method, net


def masks_of(state):
    return {name: np.asarray(mask) for name, mask in state["masks"].items()}


def test_pruning_follows_the_schedule_and_masks_only_shrink():
    method, net = tiny_stochastic()
    state = method.init(net)
    previous = masks_of(state)
    for step in range(30):
        state = method.after_update(net, state, jnp.int32(step), jax.random.key(step))
        masks = masks_of(state)
        for name, mask in masks.items():
            assert np.all(mask <= previous[name])
            kernel = np.asarray(net.layer_module(name).kernel[...])
            assert np.all(kernel[~mask] == 0.0)
        previous = masks
        if step < 10:
            assert all(m.all() for m in masks.values())
    fc1 = masks["fc1"]
    assert 1.0 - fc1.mean() == pytest.approx(0.8, abs=0.02)


def test_masked_weights_stay_zero_after_updates_unless_regrowth_is_allowed():
    for regrowth in (False, True):
        method, model = tiny_stochastic(allow_regrowth=regrowth, prune_start_epoch=0.0,
                                        prune_end_epoch=0.0, final_sparsity=0.5)
        state = method.after_update(model, method.init(model), jnp.int32(0), jax.random.key(0))
        pruned = ~masks_of(state)["fc1"]
        for variable in (model.net.fc1.kernel, model.net.fc2.kernel):
            variable[...] = variable[...] + 0.01
        state = method.after_update(model, state, jnp.int32(1), jax.random.key(1))
        kernel = np.asarray(model.net.fc1.kernel[...])
        if regrowth:
            kept = masks_of(state)["fc1"]
            revived = pruned & kept
            assert revived.sum() > 0
            np.testing.assert_allclose(kernel[revived], 0.01)
            assert 1.0 - kept.mean() == pytest.approx(0.5, abs=0.03)
            assert 1.0 - revived.sum() / pruned.sum() > 2 * (1.0 - kept[~pruned].mean())
        else:
            assert np.all(kernel[pruned] == 0.0)


def test_penalty_is_l1_plus_l2_with_zero_subgradient_at_pruned_weights():
    method, net = tiny_stochastic(l1=0.01, l2=0.1)
    net.net.fc1.kernel[...] = net.net.fc1.kernel[...].at[0, :].set(0.0)
    kernels = [np.asarray(net.net.fc1.kernel[...]), np.asarray(net.net.fc2.kernel[...])]
    biases = [np.asarray(net.net.fc1.bias[...]), np.asarray(net.net.fc2.bias[...])]
    expected = 0.01 * sum(np.abs(k).sum() for k in kernels) + 0.05 * sum(
        (a**2).sum() for a in kernels + biases
    )
    assert float(method.penalty(net, {})) == pytest.approx(expected, rel=1e-5)
    graphdef, params, rest = split_model(net)
    grads = jax.grad(lambda p: method.penalty(merge_model(graphdef, p, rest), {}))(params)
    assert np.all(np.asarray(grads["net"]["net"]["fc1"]["kernel"][...])[0] == 0.0)


def test_weight_granularity_and_bad_targets_are_refused():
    method = create_method("stochastic", method_config("stochastic", "mlp"), RunInfo(100))
    with pytest.raises(ValueError, match="granularity='unit'"):
        method.init(build_zoo_model("mlp", rngs=nnx.Rngs(0), granularity="weight"))
    refused = (((0.5, 0.5, 0.5), "2 layers"), (1.0, r"must lie in \[initial_sparsity"))
    for target, message in refused:
        method, net = tiny_stochastic(final_sparsity=target)
        with pytest.raises(ValueError, match=message):
            method.init(net)


def dense_layers(widths):
    names = [f"fc{i + 1}" for i in range(len(widths) - 1)]
    return tuple(
        Layer(name, (widths[i], widths[i + 1]), inputs=((name, 1),),
              outputs=((names[i + 1], 1),) if i + 1 < len(names) else ())
        for i, name in enumerate(names)
    )


def test_dead_nodes_by_missing_inputs_missing_outputs_and_cascade():
    """4-3-3-2: hidden1 unit 0 gets no input (and so hidden2 unit 0, fed only by it, is dead
    too), hidden1 unit 1 feeds nothing, input 3 is unread."""
    layers = dense_layers((4, 3, 3, 2))
    fc1 = np.ones((4, 3))
    fc1[:, 0] = 0.0
    fc1[3, :] = 0.0
    fc2 = np.ones((3, 3))
    fc2[1, :] = 0.0
    fc2[2, 0] = 0.0
    fc3 = np.ones((3, 2))
    alive = alive_units(layers, {"fc1": fc1, "fc2": fc2, "fc3": fc3})
    np.testing.assert_array_equal(alive["fc1"], [True, True, True, False])
    np.testing.assert_array_equal(alive["fc2"], [False, False, True])
    np.testing.assert_array_equal(alive["fc3"], [False, True, True])
    couplings = (ChannelCoupling("stream", ("fc1",)),)
    coupled = alive_units(layers, {"fc1": fc1, "fc2": fc2, "fc3": fc3}, couplings)
    np.testing.assert_array_equal(coupled["fc2"], [False, True, True])


def test_node_report_counts_the_node_pruned_network():
    net = build_zoo_model("mlp", rngs=nnx.Rngs(0), input_shape=(4, 1, 1), hidden=(3, 3),
                          num_classes=2)
    net.net.fc1.kernel[...] = net.net.fc1.kernel[...].at[:, 0].set(0.0).at[3, :].set(0.0)
    net.net.fc2.kernel[...] = net.net.fc2.kernel[...].at[1, :].set(0.0).at[2, 0].set(0.0)
    net.net.fc3.kernel[...] = net.net.fc3.kernel[...].at[2, 0].set(0.0)
    report = node_report(net)
    assert report.alive_units == {"fc1": 3, "fc2": 1, "fc3": 2}
    assert report.nodes == 6 and report.nodes_removed == 3
    assert report.nodes_removed_percent == pytest.approx(50.0)
    assert report.kept_weights == 3 * 1 + 1 * 2 + 2 * 2
    assert report.nonzero_weights == 3 + 2 + 3
    assert report.weight_sparsity == pytest.approx(100.0 / 9)
    assert report.summary()["nodes/architecture"] == "3-1-2"
    net.net.fc1.kernel[...] = net.net.fc1.kernel[...].at[1, 2].set(0.0)
    assert node_report(net).alive_units["fc1"] == 2  # input 1 now reaches dead nodes only


def test_dead_filters_of_lenet5_through_the_flattened_dense_layer():
    net = build_zoo_model("lenet5", rngs=nnx.Rngs(0))
    net.net.conv1.kernel[...] = net.net.conv1.kernel[...].at[..., 2].set(0.0)
    rows = np.arange(800) % 50 == 5
    net.net.fc1.kernel[...] = net.net.fc1.kernel[...].at[rows, :].set(0.0)
    report = node_report(net)
    assert report.alive_units["conv1"] == 19
    assert report.alive_units["conv2"] == 49
    assert report.alive_units["fc1"] == 800 - 16
    assert report.nodes == 20 + 50 + 500 and report.nodes_removed == 2


def stochastic_config(**overrides):
    return config_for(
        method="stochastic", final_sparsity=0.6, prune_end_epoch=1.5, l1=1e-4, **overrides
    )


def restored_run(workdir, config):
    """The model and method state of the newest checkpoint of the run in ``workdir``."""
    method, model, method_state = build(config, load_data(config))
    graphdef, template = init_state(model, method_state, method.optimizer(), jax.random.key(0))
    checkpointer = Checkpointer(workdir)
    state, _ = checkpointer.restore(template)
    checkpointer.close()
    return merge_model(graphdef, state.params, state.model_state), state.method_state


def test_masks_persist_through_checkpoints_and_resume_equals_an_uninterrupted_run(
    tmp_path, monkeypatch
):
    whole = train_and_evaluate(stochastic_config(), tmp_path / "whole")
    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "reached_preemption", lambda self, step: step == 5)
        with pytest.raises(Preempted):
            train_and_evaluate(stochastic_config(), tmp_path / "split")
    resumed = train_and_evaluate(stochastic_config(), tmp_path / "split")
    for key in ("test_error", "nodes/nonzero_weights", "nodes/alive_units", "nodes/weight_sparsity"):
        assert resumed[key] == whole[key], key
    evaluations = [
        comparable([r for r in read_metrics(tmp_path / d) if "eval/err" in r]) for d in ("split", "whole")
    ]
    assert evaluations[0] == evaluations[1]
    runs = [restored_run(tmp_path / d, stochastic_config()) for d in ("whole", "split")]
    for name, mask in masks_of(runs[0][1]).items():
        np.testing.assert_array_equal(mask, masks_of(runs[1][1])[name])
        kernel = np.asarray(runs[0][0].layer_module(name).kernel[...])
        assert np.all(kernel[~mask] == 0.0)
        assert 1.0 - mask.mean() == pytest.approx(0.6, abs=0.05)
    assert whole["nodes/total_sparsity"] >= 59.0
    assert "stochastic" in METHODS


def test_temperature_interpolates_between_magnitude_pruning_and_uniform_sampling():
    """Cold: of two well-separated magnitude clusters, the count is drawn from the small one
    with certainty; hot: every survivor has the same probability."""
    magnitudes = np.concatenate([np.linspace(0.10, 0.11, 10), np.linspace(1.0, 1.1, 30)])
    order = np.random.default_rng(2).permutation(40)
    kernel = jnp.asarray(magnitudes[order] * np.where(order % 2, 1.0, -1.0), jnp.float32)
    survivors = jnp.ones(40, bool)
    count = jnp.float32(10.0)
    cold = np.asarray(inclusion_probabilities(zeroing_weights(kernel, survivors, 0.05), count))
    np.testing.assert_allclose(cold, (order < 10).astype(float), atol=1e-6)
    frozen = np.asarray(inclusion_probabilities(zeroing_weights(kernel, survivors, 1e-3), count))
    np.testing.assert_allclose(frozen, (order < 10).astype(float), atol=1e-5)  # no underflow
    hot = np.asarray(inclusion_probabilities(zeroing_weights(kernel, survivors, 1e4), count))
    np.testing.assert_allclose(hot, 10.0 / 40.0, rtol=1e-3)


def test_removing_the_dead_nodes_preserves_the_logits():
    """6-5-4-3 MLP: hidden1 unit 0 has no input, unit 1 no output, unit 4 feeds only hidden2
    unit 3, which has no output; hidden2 unit 2 is fed only by hidden1 unit 0; input 5 is
    unread. The slim network without the dead nodes, their constant outputs folded into the
    consumers' biases, has the node report's size and computes the same logits."""
    net = build_zoo_model("mlp", rngs=nnx.Rngs(0), input_shape=(6, 1, 1), hidden=(5, 4),
                          num_classes=3)
    rng = np.random.default_rng(3)
    w1, w2, w3 = (rng.normal(size=s).astype(np.float32) for s in [(6, 5), (5, 4), (4, 3)])
    w1[:, 0] = 0.0
    w1[5, :] = 0.0
    w2[1, :] = 0.0
    w2[1:, 2] = 0.0
    w2[4, :3] = 0.0
    w3[3, :] = 0.0
    kernels = [w1, w2, w3]
    biases = [rng.uniform(0.2, 1.0, size=n).astype(np.float32) for n in (5, 4, 3)]
    for layer, w, b in zip((net.net.fc1, net.net.fc2, net.net.fc3), kernels, biases):
        layer.kernel[...] = jnp.asarray(w)
        layer.bias[...] = jnp.asarray(b)
    report = node_report(net)
    assert report.alive_units == {"fc1": 5, "fc2": 2, "fc3": 2}
    assert report.nodes_removed == 5 and report.summary()["nodes/architecture"] == "5-2-2"

    x = rng.normal(size=(64, 6)).astype(np.float32)
    activations = [x]
    for i, (w, b) in enumerate(zip(kernels, biases)):
        h = activations[-1] @ w + b
        activations.append(np.maximum(h, 0.0) if i < 2 else h)
    logits = np.asarray(net(jnp.asarray(x).reshape(64, 6, 1, 1), train=False))
    np.testing.assert_allclose(activations[-1], logits, rtol=1e-5, atol=1e-5)

    slim = slim_traced_model(net, x.reshape(64, 6, 1, 1))
    kernels = {path: tuple(v.shape) for path, v in slim.params.items() if path.endswith("kernel")}
    assert kernels == {"fc1.kernel": (5, 2), "fc2.kernel": (2, 2), "fc3.kernel": (2, 3)}
    assert sum(math.prod(shape) for shape in kernels.values()) == report.kept_weights
    np.testing.assert_allclose(np.asarray(slim(x.reshape(64, 6, 1, 1))), logits, rtol=1e-5,
                               atol=1e-5)
