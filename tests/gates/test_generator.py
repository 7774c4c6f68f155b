import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.estimators import hard_concrete
from sparsejax.gates.base import GateParam
from sparsejax.gates.generated import GeneratedBinaryGate, GeneratedHardConcreteGate
from sparsejax.gates.generator import (
    BIAS_INIT_MEAN,
    BIAS_INIT_STD,
    LOGIT_BOUND,
    GateGenerator,
)
from sparsejax.methods import RunInfo, create_method
from sparsejax.methods.dep_l0 import generator_of
from sparsejax.structure.traced_model import build_zoo_model
from sparsejax.train.state import merge_model, split_model

WIDTHS = {"a": 3, "b": 2, "c": 4}


def hand_chain(layers, input_width):
    """h_0 = 1, h_l = ln(100) tanh(h_{l-1} W_l + b_l), in plain NumPy."""
    h = np.ones(input_width)
    outputs = []
    for layer in layers:
        h = np.log(100.0) * np.tanh(h @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]))
        outputs.append(h)
    return outputs


def test_forward_chain_is_the_recursion_from_ones_of_the_first_width():
    generator = GateGenerator(WIDTHS, dependency="forward", rngs=nnx.Rngs(0))
    kernels = [layer.kernel.shape for layer in generator.layers]
    assert kernels == [(3, 3), (3, 2), (2, 4)]
    logits = generator()
    assert list(logits) == ["a", "b", "c"]
    for name, want in zip("abc", hand_chain(generator.layers, 3)):
        np.testing.assert_allclose(logits[name], want, rtol=1e-5, atol=1e-6)


def test_backward_chain_runs_from_the_last_slot_and_returns_network_order():
    generator = GateGenerator(WIDTHS, dependency="backward", rngs=nnx.Rngs(0))
    assert generator.chain_order() == ("c", "b", "a")
    assert [layer.kernel.shape for layer in generator.layers] == [(4, 4), (4, 2), (2, 3)]
    logits = generator()
    assert list(logits) == ["a", "b", "c"]
    c, b, a = hand_chain(generator.layers, 4)
    for name, want in (("a", a), ("b", b), ("c", c)):
        np.testing.assert_allclose(logits[name], want, rtol=1e-5, atol=1e-6)


def test_input_width_can_be_set_and_bad_arguments_are_refused():
    generator = GateGenerator(WIDTHS, dependency="backward", input_width=7, rngs=nnx.Rngs(0))
    assert generator.layers[0].kernel.shape == (7, 4)
    np.testing.assert_allclose(
        generator()["c"], hand_chain(generator.layers, 7)[0], rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="dependency must be one of"):
        GateGenerator(WIDTHS, dependency="sideways", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="at least one gated slot"):
        GateGenerator({}, dependency="forward", rngs=nnx.Rngs(0))


RESNET56_WIDTHS = {f"s{i}": w for i, w in enumerate([16] * 10 + [32] * 9 + [64] * 9)}
"""Stem and the 27 block conv1 slots of ResNet-56, in network order."""


def test_initial_parameters_follow_the_reference_and_most_gates_start_open():
    generator = GateGenerator(RESNET56_WIDTHS, dependency="forward", rngs=nnx.Rngs(3))
    biases = np.concatenate([np.asarray(layer.bias[...]) for layer in generator.layers])
    assert abs(biases.mean() - BIAS_INIT_MEAN) < 2e-3
    assert biases.std() == pytest.approx(BIAS_INIT_STD, rel=0.15)
    for layer in generator.layers:
        kernel = np.asarray(layer.kernel[...])
        bound = 1.0 / np.sqrt(kernel.shape[0])
        assert np.abs(kernel).max() <= bound
        assert kernel.std() == pytest.approx(bound / np.sqrt(3.0), rel=0.25)  # U(-b, b)
    logits = np.concatenate([np.asarray(v) for v in generator().values()])
    assert logits.size == 1024
    assert np.all(np.abs(logits) <= np.float32(LOGIT_BOUND))
    assert np.median(logits) > 3.0
    # The reference reports 946 of 1024 deterministic gates open at init on ResNet-56.
    open_fraction = np.mean(hard_concrete.deterministic(logits) > 0)
    assert 0.8 < open_fraction < 1.0
    # The first layer sees only its constant input: a_1 = sum of a kernel column + bias.
    first = generator.layers[0]
    want = LOGIT_BOUND * np.tanh(np.asarray(first.kernel[...]).sum(0) + np.asarray(first.bias[...]))
    np.testing.assert_allclose(generator()["s0"], want, rtol=1e-5)


MODEL_INPUTS = {"mlp": {}, "lenet5": {}, "resnet20": {"input_shape": (32, 32, 3)},
                "resnet56": {"input_shape": (32, 32, 3)}, "vgg16": {"input_shape": (32, 32, 3)},
                "resnet50": {"input_shape": (224, 224, 3), "num_classes": 1000}}


@pytest.mark.parametrize("dependency", ["forward", "backward"])
@pytest.mark.parametrize("model_name", sorted(MODEL_INPUTS))
def test_generator_makes_one_logit_per_unit_of_every_declared_slot(model_name, dependency):
    config = get_config("dep_l0")
    config.update(model=model_name, dependency=dependency)
    method = create_method("dep_l0", config, RunInfo(num_train=100))

    def build():
        model = build_zoo_model(
            model_name, rngs=nnx.Rngs(0), gate_factory=method.make_gates, **MODEL_INPUTS[model_name]
        )
        return model, generator_of(model)()

    model, logits = nnx.eval_shape(build)
    assert {name: v.shape for name, v in logits.items()} == {
        slot.name: slot.shape for slot in model.gate_slots
    }
    generator = generator_of(model)
    assert generator.slot_names == tuple(slot.name for slot in model.gate_slots)
    first = model.gate_slots[0 if dependency == "forward" else -1]
    assert generator.input_width == first.shape[0]


@pytest.mark.parametrize(
    "model_name,dependency,count",
    [("resnet56", "forward", 47_104), ("vgg16", "forward", 1_642_624)],
)
def test_generator_sizes_match_the_reference(model_name, dependency, count):
    """The Dep-L0 code's generators: 47,104 parameters for ResNet-56 and 1.64M for VGG-16."""
    config = get_config("dep_l0")
    config.update(model=model_name, dependency=dependency)
    method = create_method("dep_l0", config, RunInfo(num_train=100))

    def build():
        model = build_zoo_model(model_name, rngs=nnx.Rngs(0), gate_factory=method.make_gates,
                                input_shape=(32, 32, 3))
        return model

    generator = generator_of(nnx.eval_shape(build))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(generator, GateParam))) == count


def tiny_lenet(method_name):
    config = get_config(method_name)
    method = create_method(method_name, config, RunInfo(num_train=100))
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0), input_shape=(16, 16, 1), channels=(2, 3),
                            hidden=4, num_classes=3, gate_factory=method.make_gates)
    return method, model


@pytest.mark.parametrize("method_name", ["dep_l0", "dep_l0_arm"])
def test_gates_share_one_generator_through_split_and_merge(method_name):
    _, model = tiny_lenet(method_name)
    graphdef, params, rest = split_model(model)
    gate_leaves = jax.tree.leaves(params["gates"])
    assert len(gate_leaves) == 2 * len(model.gate_slots)  # a kernel and a bias per slot, once
    assert len(jax.tree.leaves(rest)) == 0
    merged = merge_model(graphdef, params, rest)
    generator = generator_of(merged)
    assert all(gate.generator is generator for gate in merged.gates.values())
    logits = generator()
    for name, gate in merged.gates.items():
        np.testing.assert_array_equal(gate.test_gate(), gate.deterministic(logits[name]))
        np.testing.assert_array_equal(gate.prob_nonzero(), gate.keep_probability(logits[name]))


def test_gate_distributions_given_logits():
    logits = jnp.array([-3.0, -0.5, 0.0, 0.5, 3.0])
    hc = GeneratedHardConcreteGate("s", 5, per_example=True)
    np.testing.assert_allclose(
        hc.keep_probability(logits), jax.nn.sigmoid(logits + 1.5986), rtol=1e-4
    )
    np.testing.assert_allclose(hc.deterministic(logits), hard_concrete.deterministic(logits))
    draws = hc.draw(logits, jax.random.key(0), 20000)
    assert draws.shape == (20000, 5)
    np.testing.assert_allclose(np.mean(draws > 0, 0), hc.keep_probability(logits), atol=0.015)

    binary = GeneratedBinaryGate("s", 5, test_rule="scaled")
    pi = jax.nn.sigmoid(logits)
    np.testing.assert_allclose(binary.deterministic(logits), np.where(pi >= 0.5, pi, 0.0))
    draws = binary.draw(logits, jax.random.key(1), None)
    assert draws.shape == (5,) and set(np.unique(draws)) <= {0.0, 1.0}
    keys = jax.random.split(jax.random.key(2), 20000)
    many = jax.vmap(lambda k: binary.draw(logits, k, None))(keys)
    np.testing.assert_allclose(many.mean(0), pi, atol=0.015)


def test_a_gate_without_generator_says_how_to_attach_one():
    gate = GeneratedHardConcreteGate("conv1", 4)
    with pytest.raises(ValueError, match="make_gates"):
        gate.test_gate()
    with pytest.raises(ValueError, match="not for slot 'conv1'"):
        gate.attach(GateGenerator({"fc1": 2}, dependency="forward", rngs=nnx.Rngs(0)))
