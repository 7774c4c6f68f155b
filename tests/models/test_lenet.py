import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.gates import HardConcreteGate
from sparsejax.methods import RunInfo, create_method
from sparsejax.models import MLP, LeNet5
from sparsejax.models.base import each_slot
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure.accounting import count_network
from sparsejax.structure.nodes import node_report
from sparsejax.structure.traced_model import build_zoo_model
from sparsejax.train.loop import build, load_data
from tests.methods.test_methods import method_config


@each_slot
def hc_factory(slot, rngs):
    return HardConcreteGate(slot.shape, rngs=rngs, droprate_init=slot.droprate_init)


def n_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_dense_parameter_counts_match_the_published_architectures():
    assert n_params(MLP(rngs=nnx.Rngs(0))) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert n_params(LeNet5(rngs=nnx.Rngs(0))) == (
        25 * 20 + 20 + 25 * 20 * 50 + 50 + 800 * 500 + 500 + 500 * 10 + 10
    )


@pytest.mark.parametrize("name", ["mlp", "lenet5"])
@pytest.mark.parametrize("train", [True, False])
def test_forward_shapes(name, train):
    model = build_zoo_model(name, rngs=nnx.Rngs(0), gate_factory=hc_factory)
    logits = model(jnp.ones((3, 28, 28, 1)), train=train, rngs=nnx.Rngs(gates=0))
    assert logits.shape == (3, 10)


def test_gate_slots_follow_the_papers():
    mlp = build_zoo_model("mlp", rngs=nnx.Rngs(0), gate_factory=hc_factory)
    assert [(s.name, s.shape, s.group_size, s.droprate_init) for s in mlp.gate_slots] == [
        ("fc1", (784,), 300, 0.2),
        ("fc2", (300,), 100, 0.5),
        ("fc3", (100,), 10, 0.5),
    ]
    lenet = build_zoo_model("lenet5", rngs=nnx.Rngs(0), gate_factory=hc_factory)
    assert [(s.name, s.shape, s.group_size) for s in lenet.gate_slots] == [
        ("conv1", (20,), 26),
        ("conv2", (50,), 501),
        ("fc1", (800,), 500),
        ("fc2", (500,), 10),
    ]
    assert set(lenet.gates) == {"conv1", "conv2", "fc1", "fc2"}
    assert len(build_zoo_model("lenet5", rngs=nnx.Rngs(0)).gates) == 0


def test_fc1_gates_select_rows_even_where_they_meet_conv2_channels_one_to_one():
    """On 16x16 images conv2 leaves one position, so fc1's inputs are conv2's channels: its
    gates stay an input selection in series with conv2's, as on 28x28 images. A closed fc1
    gate removes its row; a closed conv2 gate its filter, bias and that row."""
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0), input_shape=(16, 16, 1),
                            channels=(2, 3), hidden=4, num_classes=3)
    slots = {s.name: s for s in model.gate_slots}
    assert [(s.name, s.shape, s.group_size) for s in model.gate_slots] == [
        ("conv1", (2,), 26), ("conv2", (3,), 51), ("fc1", (3,), 4), ("fc2", (4,), 3)]

    def params(closed_slot):
        masks = {name: np.ones(slot.shape, np.float32) for name, slot in slots.items()}
        if closed_slot:
            masks[closed_slot][0] = 0.0
        return float(count_network(model.layers, masks)["params"])

    assert params("fc1") == params(None) - 4
    assert params("conv2") == params(None) - (5 * 5 * 2 + 1) - 4


def test_closed_conv1_gates_make_the_output_independent_of_the_input():
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0), gate_factory=hc_factory)
    zeros = {"conv1": jnp.zeros(20)}
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    out = model(x, train=True, rngs=nnx.Rngs(gates=0), gates=zeros)
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)


def test_explicit_gates_equal_a_model_with_gates_folded_into_the_weights():
    model = build_zoo_model("mlp", rngs=nnx.Rngs(0), gate_factory=hc_factory)
    z = {
        name: jax.random.bernoulli(jax.random.key(i), 0.6, slot.shape).astype(jnp.float32)
        for i, (name, slot) in enumerate((s.name, s) for s in model.gate_slots)
    }
    x = jax.random.normal(jax.random.key(9), (4, 28, 28, 1))
    gated = model(x, train=True, gates=z)
    dense = build_zoo_model("mlp", rngs=nnx.Rngs(0))
    for name in z:
        layer = getattr(dense.net, name)
        layer.kernel[...] = layer.kernel[...] * z[name][:, None]
    np.testing.assert_allclose(gated, dense(x, train=False), rtol=1e-5, atol=1e-5)


def test_weight_granularity_gates_every_kernel_entry():
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0), gate_factory=hc_factory,
                             granularity="weight")
    assert {n: tuple(g.shape) for n, g in model.gates.items()} == {
        "conv1": (5, 5, 1, 20),
        "conv2": (5, 5, 20, 50),
        "fc1": (800, 500),
        "fc2": (500, 10),
    }
    x = jnp.ones((2, 28, 28, 1))
    closed = {name: jnp.zeros(g.shape) for name, g in model.gates.items()}
    out = model(x, train=True, gates=closed)
    np.testing.assert_allclose(out, jnp.broadcast_to(model.net.fc2.bias[...], out.shape),
                               atol=1e-6)


def test_per_example_gates_act_per_example():
    model = build_zoo_model("mlp", rngs=nnx.Rngs(0), gate_factory=hc_factory)
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    z = {"fc1": jnp.stack([jnp.ones(784), jnp.zeros(784)])}
    out = model(x, train=True, rngs=nnx.Rngs(gates=0), gates=z)
    blank = model(jnp.zeros_like(x), train=True, rngs=nnx.Rngs(gates=0), gates=z)
    np.testing.assert_allclose(out[1], blank[1], atol=1e-6)
    assert not np.allclose(out[0], blank[0])


def test_unknown_model_and_granularity_are_clear_errors():
    with pytest.raises(ValueError, match="valid models: .*lenet5, .*mlp, mobilenet_v2"):
        build_zoo_model("vgg99", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="granularity"):
        build_zoo_model("mlp", rngs=nnx.Rngs(0), granularity="block")
    with pytest.raises(ValueError, match="at least 16x16 pixels, got 15x28"):
        LeNet5(rngs=nnx.Rngs(0), input_shape=(15, 28, 1))


def assert_std(values, std, what):
    """The sample std of n draws of N(0, std^2) is within 5 standard errors, std / sqrt(2n)."""
    values = np.asarray(values, np.float64).ravel()
    assert abs(np.std(values) - std) < 5 * std / np.sqrt(2 * values.size), what
    assert abs(np.mean(values)) < 5 * std / np.sqrt(values.size), what


def test_initialisation_is_the_reference_codes():
    """He-normal N(0, 2 / fan_in) for every kernel (L0-HC: conv fan_in; dense (in, out) with
    PyTorch's "fan_out", which is dimension 0 = in), zero biases; LeNet-5's convolutions with
    ``conv_fan="fan_out"`` (L0-ARM) N(0, 2 / (25 * out))."""
    mlp = MLP(rngs=nnx.Rngs(0))
    for name, fan_in in (("fc1", 784), ("fc2", 300), ("fc3", 100)):
        layer = getattr(mlp, name)
        assert_std(layer.kernel[...], np.sqrt(2 / fan_in), name)
        assert np.all(layer.bias[...] == 0)
    for conv_fan, fans in (("fan_in", (25, 500)), ("fan_out", (500, 1250))):
        net = LeNet5(rngs=nnx.Rngs(0), conv_fan=conv_fan)
        for name, fan in zip(("conv1", "conv2", "fc1", "fc2"), (*fans, 800, 500)):
            layer = getattr(net, name)
            assert_std(layer.kernel[...], np.sqrt(2 / fan), f"{conv_fan} {name}")
            assert np.all(layer.bias[...] == 0)
    with pytest.raises(ValueError, match="kernel_fan must be one of"):
        LeNet5(rngs=nnx.Rngs(0), conv_fan="fan_avg")


def test_gate_parameters_start_at_the_reference_drop_rates():
    """L0-HC: log alpha ~ N(logit(1 - r), 0.01^2); L0-ARM: phi ~ N(logit(1 - r) / 7,
    (0.01 / 7)^2); r = 0.2 on the MLP's pixels, 0.5 elsewhere."""
    for name, attr, k in (("l0_hc", "log_alpha", 1.0), ("l0_arm", "phi", 7.0)):
        method = create_method(name, method_config(name, "mlp"), RunInfo(num_train=60000))
        mlp = build_zoo_model("mlp", rngs=nnx.Rngs(0), gate_factory=method.make_gates)
        for slot, rate in (("fc1", 0.2), ("fc2", 0.5), ("fc3", 0.5)):
            values = np.asarray(getattr(mlp.gates[slot], attr)[...]) * k
            mean = np.log(1 - rate) - np.log(rate)
            assert abs(np.mean(values) - mean) < 5 * 0.01 / np.sqrt(values.size), (name, slot)
            if values.size > 100:
                assert_std(values - mean, 0.01, (name, slot))


@pytest.mark.parametrize("name, conv_std", [
    ("l0_hc", np.sqrt(2 / 500)), ("l0_arm", np.sqrt(2 / 1250)), ("l0_ar", np.sqrt(2 / 1250)),
])
def test_the_engine_builds_lenet5_with_the_methods_initialisation(name, conv_std):
    config = method_config(name, "lenet5", dataset="synthetic", num_train=100, num_test=100)
    _, model, _ = build(config, load_data(config))
    assert_std(model.net.conv2.kernel[...], conv_std, name)
    mlp = create_method(name, method_config(name, "mlp"), RunInfo(num_train=60000))
    assert mlp.model_options() == {}


def slimmed_with_random_gates(name):
    """Zoo model ``name`` with about 40% of each slot's gates closed, slimmed from its trace;
    checked to have the gated model's count and test-time logits. Returns the slim network and
    the open gates."""
    model = build_zoo_model(name, rngs=nnx.Rngs(0), gate_factory=hc_factory)
    rng = np.random.default_rng(4)
    keep = {}
    for slot in model.gate_slots:
        keep[slot.name] = rng.random(slot.shape) < 0.6
        model.gates[slot.name].log_alpha[...] = jnp.where(keep[slot.name], 5.0, -5.0)
    images = np.asarray(jax.random.normal(jax.random.key(2), (8, 28, 28, 1)))
    slim = slim_traced_model(model, images)
    counted = count_network(model.layers, {k: v.astype(np.float32) for k, v in keep.items()})
    assert slim.report.params_after == float(counted["params"])
    gated = model(jnp.asarray(images), train=False)
    np.testing.assert_allclose(np.asarray(slim(images)), np.asarray(gated), rtol=1e-5, atol=1e-5)
    return slim, keep


def test_the_mlp_slims_from_its_trace_to_its_open_pixels_and_neurons():
    """Closed gates remove their pixel rows of fc1 and their neurons' columns, bias and reader
    rows."""
    slim, keep = slimmed_with_random_gates("mlp")
    pixels, hidden1, hidden2 = (int(keep[name].sum()) for name in ("fc1", "fc2", "fc3"))
    assert {path: tuple(v.shape) for path, v in slim.params.items()} == {
        "fc1.kernel": (pixels, hidden1), "fc1.bias": (hidden1,),
        "fc2.kernel": (hidden1, hidden2), "fc2.bias": (hidden2,),
        "fc3.kernel": (hidden2, 10), "fc3.bias": (10,),
    }


def test_lenet5_slims_from_its_trace_to_its_open_channels_and_inputs():
    """Closed conv gates remove their filters and the next layer's rows (a closed conv2 channel
    its 16 flattened rows of fc1); closed fc1 gates select fc1's rows alone, closed fc2 gates
    remove fc1's neurons."""
    slim, keep = slimmed_with_random_gates("lenet5")
    c1, c2, hidden = (int(keep[name].sum()) for name in ("conv1", "conv2", "fc2"))
    rows = int((keep["fc1"] & np.tile(keep["conv2"], 16)).sum())  # channel fastest
    assert {path: tuple(v.shape) for path, v in slim.params.items()} == {
        "conv1.kernel": (5, 5, 1, c1), "conv1.bias": (c1,),
        "conv2.kernel": (5, 5, c1, c2), "conv2.bias": (c2,),
        "fc1.kernel": (rows, hidden), "fc1.bias": (hidden,),
        "fc2.kernel": (hidden, 10), "fc2.bias": (10,),
    }


def test_dead_mlp_neurons_leave_the_slim_network_with_their_constants_in_the_next_bias():
    model = build_zoo_model("mlp", rngs=nnx.Rngs(0))
    rng = np.random.default_rng(5)
    for layer in model.layers:
        module = model.layer_module(layer.name)
        kernel = np.asarray(module.kernel[...]) * (rng.random(layer.kernel_shape) > 0.9)
        module.kernel[...] = jnp.asarray(kernel)
        module.bias[...] = jnp.asarray(rng.normal(0, 0.5, layer.out_units), jnp.float32)
    fc1 = model.layer_module("fc1")
    fc1.kernel[...] = fc1.kernel[...].at[:, :40].set(0.0)  # 40 neurons without inputs
    images = np.asarray(jax.random.normal(jax.random.key(3), (8, 28, 28, 1)))
    slim = slim_traced_model(model, images)
    assert slim.params["fc1.kernel"].shape[1] <= 300 - 40
    kernels = sum(v.size for path, v in slim.params.items() if path.endswith("kernel"))
    assert kernels == node_report(model).kept_weights
    gated = model(jnp.asarray(images), train=False)
    np.testing.assert_allclose(np.asarray(slim(images)), np.asarray(gated), rtol=1e-5, atol=1e-5)
