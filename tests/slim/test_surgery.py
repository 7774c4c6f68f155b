import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.gates.scale import ScaleGate
from sparsejax.models import DenseNet
from sparsejax.models.base import GatedModel, each_slot
from sparsejax.slim import slim_model
from sparsejax.structure import count_network, gate_report

count = jax.jit(count_network, static_argnums=0)
"""The accounting, compiled once per network rather than once per layer shape."""

CIFAR = (32, 32, 3)
@each_slot
def scale_gates(slot, rngs):
    return ScaleGate(slot.shape)


ARCHITECTURES = {
    "densenet40": (functools.partial(DenseNet, depth=10, growth_rate=4), (16, 16, 3)),
}


def build(name: str, gate_factory=None) -> tuple[GatedModel, tuple[int, ...]]:
    constructor, shape = ARCHITECTURES[name]
    kwargs = {} if "input_shape" in constructor.keywords else {"input_shape": shape}
    model = constructor(rngs=nnx.Rngs(0), num_classes=10, gate_factory=gate_factory, **kwargs)
    randomize_batch_norms(model, np.random.default_rng(1))
    return model, shape


def randomize_batch_norms(model: nnx.Module, rng: np.random.Generator) -> None:
    """Nontrivial scale, bias and running statistics in every BatchNorm."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm):
            n = node.num_features
            node.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
            node.bias[...] = jnp.asarray(rng.normal(0, 0.2, n), jnp.float32)
            node.mean[...] = jnp.asarray(rng.normal(0, 0.3, n), jnp.float32)
            node.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)


def close_random_gates(model: GatedModel, rng: np.random.Generator, closed: float = 0.4) -> None:
    for gate in model.gates.values():
        values = rng.uniform(0.5, 1.5, gate.shape) * (rng.random(gate.shape) >= closed)
        gate.value[...] = jnp.asarray(values, jnp.float32)


def images(shape, count=2):
    return jax.random.normal(jax.random.key(7), (count, *shape))


@nnx.jit
def eval_logits(model, x):
    return model(x, train=False)


def assert_same_logits(model, slim, shape):
    x = images(shape)
    expected = eval_logits(model, x)
    got = eval_logits(slim, x)
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-4 * max(scale, 1.0))


def predicted_counts(model: GatedModel) -> dict[str, float]:
    """The accounting of the gated network under its test-time masks, where moreover a
    producer's unit goes when every layer reading it has closed it with its own input gate (a
    DenseNet feature or a pre-activation stream channel no consumer selects)."""
    masks = {name: np.asarray(gate.test_gate() > 0, np.float32)
             for name, gate in model.gates.items()}
    input_slots = {s.layer: s.name for s in model.gate_slots
                   if s.axis is not None and s.axis != len(s.kernel_shape) - 1}
    streams = {c.name: c for c in model.channel_couplings}
    layers = {layer.name: layer for layer in model.layers}
    width = {name: (layers[streams[name].layers[0]] if name in streams else layers[name]).out_units
             for name in {p for layer in model.layers for p in layer.reads} if name != "input"}
    wanted = {name: np.zeros(w, bool) for name, w in width.items()}
    for layer in model.layers:
        if layer.reads == ("input",):
            continue
        total = sum(width[p] for p in layer.reads)
        kept = np.ones(layer.in_units, bool)
        if layer.name in input_slots:
            kept = masks[input_slots[layer.name]] > 0
        kept = kept.reshape(-1, total).any(axis=0)
        offset = 0
        for producer in layer.reads:
            wanted[producer] |= kept[offset:offset + width[producer]]
            offset += width[producer]
    values = dict(masks)
    extended = []
    for layer in model.layers:
        producer = next((c.name for c in model.channel_couplings if layer.name in c.layers),
                        layer.name)
        if producer in wanted and not wanted[producer].all():
            values[f"{producer}/read"] = wanted[producer].astype(np.float32)
            layer = dataclasses.replace(layer, outputs=(*layer.outputs, (f"{producer}/read", 1)))
        extended.append(layer)
    return count(tuple(extended), values)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_slim_logits_equal_gated_logits_and_sizes_equal_the_accounting(name):
    model, shape = build(name, scale_gates)
    close_random_gates(model, np.random.default_rng(2))
    before = jax.tree.map(np.array, nnx.state(model))  # a copy: slimming must not touch the model
    result = slim_model(model)
    slim = result.model
    assert_same_logits(model, slim, shape)
    assert len(slim.gates) == 0
    after = count(slim.layers, {})
    predicted = predicted_counts(model)
    assert float(after["params"]) == pytest.approx(float(predicted["params"]))
    assert float(after["flops"]) == pytest.approx(float(predicted["flops"]))
    assert result.report.stored_params_after < result.report.stored_params_before
    assert result.report.flops_after < result.report.flops_before
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)


def test_slim_architecture_string_is_the_gated_one():
    model, _ = build("densenet40", scale_gates)
    close_random_gates(model, np.random.default_rng(3))
    slim = slim_model(model).model
    assert gate_report(slim).architecture == gate_report(model).architecture


def test_hard_concrete_test_gates_fold_into_batch_norm():
    from sparsejax.gates import HardConcreteGate

    model, shape = build(
        "densenet40", each_slot(lambda slot, rngs: HardConcreteGate(slot.shape, rngs=rngs))
    )
    rng = np.random.default_rng(6)
    for gate in model.gates.values():
        gate.log_alpha[...] = jnp.asarray(rng.normal(0.0, 3.0, gate.shape), jnp.float32)
    result = slim_model(model)
    assert_same_logits(model, result.model, shape)
    assert float(count(result.model.layers, {})["flops"]) == pytest.approx(
        float(predicted_counts(model)["flops"]))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_declared_batch_norms_match_their_layers(name):
    model, _ = build(name)
    for layer in model.layers:
        if layer.norm is not None:
            norm = model.module_at(layer.norm)
            assert isinstance(norm, nnx.BatchNorm) and norm.num_features == layer.out_units
        if layer.input_norm is not None:
            norm = model.module_at(layer.input_norm)
            assert isinstance(norm, nnx.BatchNorm) and norm.num_features == layer.in_units
    normalised = {p for l in model.layers for p in (l.norm, l.input_norm) if p is not None}
    every_norm = {id(node) for _, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)}
    assert {id(model.module_at(p)) for p in normalised} == every_norm


def test_rounded_widths_stay_exact():
    model, shape = build("densenet40", scale_gates)
    close_random_gates(model, np.random.default_rng(8))
    exact = slim_model(model)
    rounded = slim_model(model, width_multiple=8)
    assert_same_logits(model, rounded.model, shape)
    for layer in rounded.model.layers[:-1]:
        assert layer.out_units % 8 == 0 or layer.out_units == next(
            l.out_units for l in model.layers if l.name == layer.name)
    assert exact.report.flops_after <= rounded.report.flops_after < rounded.report.flops_before


def test_a_gate_generator_goes_with_the_gates():
    from sparsejax.gates.generator import GateGenerator
    from sparsejax.methods import RunInfo, create_method
    from tests.methods.test_methods import method_config

    method = create_method("dep_l0", method_config("dep_l0", "densenet40"),
                           RunInfo(num_train=100))
    model, shape = build("densenet40", method.make_gates)
    assert any(isinstance(node, GateGenerator) for _, node in nnx.iter_graph(model))
    slim = slim_model(model).model
    assert not any(isinstance(node, GateGenerator) for _, node in nnx.iter_graph(slim))
    assert_same_logits(model, slim, shape)
