import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.gates import HardConcreteGate
from sparsejax.gates.generator import GateGenerator
from sparsejax.methods import RunInfo, create_method
from sparsejax.models import MODELS, DenseNet, MobileNetV2
from sparsejax.models.base import Layer, each_slot
from sparsejax.models.mobilenet_v2 import CIFAR_TABLE, IMAGENET_TABLE, make_divisible
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure import count_layer, count_network
from sparsejax.structure.trace import trace_structure
from sparsejax.structure.traced_model import build_zoo_model, gate_zoo_network
from tests.gated import randomize_batch_norms
from tests.methods.test_methods import method_config

CLASSES = 10
SIDE = 8
"""Input side of the narrow models run in the tests."""
NARROW_TABLE = ((1, 8, 1, 1), (2, 8, 2, 2))
"""A short MobileNetV2: a t = 1 block, then a strided stage of two blocks (one residual)."""


@each_slot
def hc_factory(slot, rngs):
    return HardConcreteGate(slot.shape, rngs=rngs, droprate_init=slot.droprate_init)


def n_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def network_counts(layers, values=None):
    """:func:`count_network` under one ``jax.jit`` (eagerly, every small op would compile)."""
    return jax.jit(lambda v: count_network(layers, v))(values or {})


def abstract(build):
    """The model with abstract parameters: counts and declarations without allocating."""
    return nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0)))


def zoo(name):
    """The zoo model ``name`` gated as the engine gates it; kwargs for its constructor."""
    return functools.partial(build_zoo_model, name)


@pytest.fixture(scope="module")
def densenet40_shape():
    return abstract(zoo("densenet40"))


@pytest.fixture(scope="module")
def mobilenet_v2_shape():
    return abstract(zoo("mobilenet_v2"))


def cheap_key(seed):
    """A key of the "rbg" generator, whose draws compile far faster on CPU than the default
    threefry ones (every new parameter or gate shape compiles its own draw); these tests do not
    depend on the values drawn."""
    return jax.random.key(seed, impl="rbg")


def cheap_rngs():
    return nnx.Rngs(cheap_key(0))


def narrow_densenet(depth=7, gate_factory=hc_factory, **kwargs):
    """DenseNet-7 (one layer a block), growth rate 4, on 8x8 images, on its trace."""
    rngs = cheap_rngs()
    net = DenseNet(depth=depth, growth_rate=4, initial_features=4, input_shape=(SIDE, SIDE, 3),
                   num_classes=CLASSES, rngs=rngs)
    return gate_zoo_network(net, "densenet40", rngs=rngs, gate_factory=gate_factory, **kwargs)


def narrow_mobilenet(variant="cifar", **kwargs):
    """A short MobileNetV2 on its trace (:data:`NARROW_TABLE`, a head of 12 channels)."""
    rngs = cheap_rngs()
    net = MobileNetV2(variant=variant, table=NARROW_TABLE, head_features=12,
                      num_classes=CLASSES, input_shape=(SIDE, SIDE, 3), rngs=rngs)
    name = {"imagenet": "mobilenet_v2", "cifar": "mobilenet_v2_cifar"}[variant]
    return gate_zoo_network(net, name, rngs=rngs, gate_factory=hc_factory, **kwargs)


@pytest.fixture(scope="module")
def densenet_unit():
    """Built once (every new kernel shape compiles its initialiser); tests use clones."""
    return narrow_densenet()


@pytest.fixture(scope="module")
def mobilenet_unit():
    return narrow_mobilenet()


def images(seed=0):
    return jax.random.normal(jax.random.key(seed), (2, SIDE, SIDE, 3))


# ----------------------------------------------------------------------------- closed forms


def densenet_formula(layers_per_block, growth, initial, classes=CLASSES, side=32, blocks=3):
    """(kernel weights, BatchNorm params, MACs) of a DenseNet without bottleneck or compression."""
    weights, bn, macs = 9 * 3 * initial, 0, 9 * 3 * initial * side * side
    channels = initial
    for block in range(blocks):
        for _ in range(layers_per_block):
            weights, bn = weights + 9 * channels * growth, bn + 2 * channels
            macs += 9 * channels * growth * side * side
            channels += growth
        if block + 1 < blocks:
            weights, bn = weights + channels * channels, bn + 2 * channels
            macs += channels * channels * side * side
            side //= 2
    return weights + channels * classes, bn + 2 * channels, macs + channels * classes


def mobilenet_formula(table, stem_stride, classes, side, head=1280, stem=32):
    """(kernel weights, BatchNorm params, MACs) of MobileNetV2 1.0 (Sandler et al. 2018)."""
    side = (side - 1) // stem_stride + 1
    weights, bn, macs = 27 * stem, 2 * stem, 27 * stem * side * side
    c_in = stem
    for t, c, n, s in table:
        for b in range(n):
            hidden = c_in * t
            if t != 1:
                weights, bn, macs = weights + c_in * hidden, bn + 2 * hidden, macs + (
                    c_in * hidden * side * side)
            side = (side - 1) // (s if b == 0 else 1) + 1
            block = 9 * hidden + hidden * c
            weights, bn, macs = weights + block, bn + 2 * hidden + 2 * c, macs + block * side * side
            c_in = c
    weights, bn, macs = weights + c_in * head, bn + 2 * head, macs + c_in * head * side * side
    return weights + head * classes, bn, macs + head * classes


def test_densenet40_dense_counts(densenet40_shape):
    model = densenet40_shape
    weights, bn, macs = densenet_formula(12, 12, 24)
    assert weights + bn + CLASSES == 1_059_298  # + the classifier's bias
    assert n_params(model) == 1_059_298
    huang = abstract(functools.partial(zoo("densenet40"), initial_features=16))
    assert n_params(huang) == sum(densenet_formula(12, 12, 16)[:2]) + CLASSES == 1_019_722
    counts = network_counts(model.layers)
    assert float(counts["weights"]) == weights
    assert float(counts["params"]) == weights + CLASSES
    assert float(counts["flops"]) == pytest.approx(macs, rel=1e-7)
    assert macs == 282_917_328


def test_mobilenet_v2_imagenet_dense_counts(mobilenet_v2_shape):
    model = mobilenet_v2_shape
    weights, bn, macs = mobilenet_formula(IMAGENET_TABLE, 2, 1000, 224)
    assert weights + bn + 1000 == 3_504_872  # the published 3.50M
    assert n_params(model) == 3_504_872
    counts = network_counts(model.layers)
    assert float(counts["weights"]) == weights
    assert float(counts["flops"]) == pytest.approx(macs, rel=1e-7)
    assert macs == 300_774_272  # the published ~300M multiply-adds
    assert macs == pytest.approx(300e6, rel=0.01)


def test_mobilenet_v2_cifar_dense_counts_and_strides():
    model = abstract(zoo("mobilenet_v2_cifar"))
    weights, bn, macs = mobilenet_formula(CIFAR_TABLE, 1, CLASSES, 32)
    assert n_params(model) == weights + bn + CLASSES == 2_236_682
    assert float(network_counts(model.layers)["flops"]) == pytest.approx(macs, rel=1e-7)
    layers = {l.name: l for l in model.layers}
    # 32x32 maps up to stage 2 (stem and stage-2 strides changed to 1), then 16, 8, 8, 4, 4
    assert layers["stem"].out_positions == 32 * 32
    assert layers["blocks.2.project"].out_positions == 32 * 32
    assert [layers[f"blocks.{i}.depthwise"].out_positions for i in (3, 7, 11, 14, 16)] == [
        16 * 16, 8 * 8, 8 * 8, 4 * 4, 4 * 4
    ]
    assert layers["head"].out_positions == 16


def test_make_divisible_rounds_widths_like_the_reference():
    assert [make_divisible(c * 0.35) for c in (32, 16, 24, 96, 320)] == [16, 8, 8, 32, 112]
    assert [make_divisible(c * 1.4) for c in (32, 24, 1280)] == [48, 32, 1792]


# ----------------------------------------------------------------------------- grouped accounting


def kept_kernel(layer: Layer, kept_in: np.ndarray, kept_out: np.ndarray) -> np.ndarray:
    """Brute force: kernel entry (..., i, o) is kept when its input unit (group of o, row i) and
    its output unit o are both kept; shaped like the kernel."""
    rows = layer.kernel_shape[-2]
    per_group_out = layer.out_units // layer.groups
    mask = np.zeros(layer.kernel_shape[-2:], np.float32)
    for o in range(layer.out_units):
        for i in range(rows):
            mask[i, o] = kept_in[(o // per_group_out) * rows + i] * kept_out[o]
    return np.broadcast_to(mask, layer.kernel_shape)


def jitted_layer_count(layer):
    """(weights, biases, MACs) of :func:`count_layer` for ``layer``, compiled once."""

    def count(values):
        result = count_layer(layer, values)
        return result.weights, result.biases, result.macs

    return jax.jit(count)


@pytest.mark.parametrize("in_units, out_units, groups", [(8, 12, 4), (16, 16, 16), (6, 6, 1)])
def test_grouped_conv_accounting_equals_a_brute_force_count(in_units, out_units, groups):
    layer = Layer("g", (3, 3, in_units // groups, out_units), out_positions=5, has_bias=True,
                  inputs=(("a", 1),), outputs=(("b", 1),), groups=groups)
    unit_count = jitted_layer_count(layer)
    weight_count = jitted_layer_count(Layer("g", layer.kernel_shape, 5, groups=groups,
                                            inputs=(("a", 1),), outputs=(("b", 1),),
                                            kernel_slot="w"))
    rng = np.random.default_rng(groups)
    for _ in range(5):
        a = rng.integers(0, 2, in_units).astype(np.float32)
        b = rng.integers(0, 2, out_units).astype(np.float32)
        expected = kept_kernel(layer, a, b).sum()
        weights, biases, macs = unit_count({"a": a, "b": b})
        assert float(weights) == expected
        assert float(macs) == 5 * expected
        assert float(biases) == b.sum()
        w = rng.integers(0, 2, layer.kernel_shape).astype(np.float32)
        weights, _, _ = weight_count({"a": a, "b": b, "w": w})
        assert float(weights) == (w * kept_kernel(layer, a, b)).sum()


def test_closing_hidden_channels_removes_expansion_depthwise_and_projection(mobilenet_v2_shape):
    model = mobilenet_v2_shape
    dense = network_counts(model.layers)
    closed = 100  # of block 5's 6 * 32 = 192 hidden channels (32 -> 192 -> 32, 28x28 maps)
    mask = np.concatenate([np.zeros(closed), np.ones(192 - closed)]).astype(np.float32)
    counts = network_counts(model.layers, {"block5": mask})
    per_channel = 32 + 9 + 32
    assert float(counts["weights"]) == dense["weights"] - closed * per_channel
    assert float(counts["flops"]) == pytest.approx(
        float(dense["flops"]) - closed * per_channel * 28 * 28, rel=1e-7)
    probs = np.full(192, 0.25, np.float32)  # expectation: each channel counted once, times p
    expected = network_counts(model.layers, {"block5": probs})
    assert float(expected["weights"]) == pytest.approx(
        float(dense["weights"]) - 0.75 * 192 * per_channel, rel=1e-7)


def test_densenet_gates_remove_one_consumers_input_columns(densenet40_shape):
    model = densenet40_shape
    dense = network_counts(model.layers)
    half = np.repeat(np.float32([0, 1]), [100, 212])  # trans2 reads 312 channels, 8x8 maps
    counts = network_counts(model.layers, {"trans2": half})
    assert float(counts["weights"]) == dense["weights"] - 100 * 312
    counts = network_counts(model.layers, {"block3.layer1": half})
    assert float(counts["weights"]) == dense["weights"] - 100 * 9 * 12
    assert float(counts["flops"]) == pytest.approx(
        float(dense["flops"]) - 100 * 9 * 12 * 64, rel=1e-7)


# ----------------------------------------------------------------------------- declarations


def test_densenet_gate_slots_select_each_consumers_inputs(densenet40_shape):
    """One slot per consumer (dense layer, transition, classifier) over its input rows, an input
    selection: no layer's outputs are gated, so a feature lives on while any consumer reads it."""
    model = densenet40_shape
    slots = {s.name: s for s in model.gate_slots}
    assert len(slots) == 3 * 12 + 2 + 1
    assert [(n, slots[n].layer, slots[n].shape, slots[n].axis, slots[n].group_size)
            for n in ("block1.layer1", "block1.layer12", "trans1", "block2.layer1", "fc")] == [
        ("block1.layer1", "blocks.0.0.conv", (24,), 2, 108),
        ("block1.layer12", "blocks.0.11.conv", (156,), 2, 108),
        ("trans1", "transitions.0.conv", (168,), 2, 168),
        ("block2.layer1", "blocks.1.0.conv", (168,), 2, 108),
        ("fc", "fc", (456,), 0, 10),
    ]
    layers = {l.name: l for l in model.layers}
    assert layers["stem"].inputs == ()
    by_layer = {s.layer: s.name for s in model.gate_slots}
    assert all(l.inputs == ((by_layer[l.name], 1),) and l.outputs == ()
               for l in model.layers[1:])
    assert [layers[n].out_positions for n in ("blocks.0.0.conv", "transitions.0.conv",
                                                "blocks.1.0.conv", "blocks.2.11.conv")] == [
        1024, 1024, 256, 64]
    for layer in model.layers:
        assert model.layer_module(layer.name).kernel.shape == layer.kernel_shape


def test_densenet_consumers_read_the_concatenated_features_in_order():
    """Dense layer j of a block reads the block input (the stem or the transition before) and
    then the new channels of the block's layers 1..j-1, each at its offset of the kernel rows."""
    model = narrow_densenet(depth=10)  # two layers a block
    structure = model.structure
    kernel = {l.name: f"{l.name}.kernel" for l in model.layers}

    def rows_read(reader, producer):
        in_axis = len(structure.param_shapes[kernel[reader]]) - 2
        (index,) = structure.groups_of(kernel[producer], len(
            structure.param_shapes[kernel[producer]]) - 1)
        return structure.groups[index].member(kernel[reader], in_axis).indices

    assert rows_read("blocks.0.1.conv", "stem") == (0, 1, 2, 3)
    assert rows_read("blocks.0.1.conv", "blocks.0.0.conv") == (4, 5, 6, 7)
    assert rows_read("transitions.0.conv", "blocks.0.1.conv") == (8, 9, 10, 11)
    assert rows_read("blocks.1.1.conv", "transitions.0.conv") == tuple(range(12))
    assert rows_read("blocks.1.1.conv", "blocks.1.0.conv") == (12, 13, 14, 15)
    assert rows_read("fc", "blocks.2.1.conv") == tuple(range(24, 28))


def test_densenet_train_mode_finds_the_same_groups():
    """BatchNorm on batch statistics (train mode) reduces over the batch and positions only."""
    net = narrow_densenet().net
    shape = jax.ShapeDtypeStruct((2, SIDE, SIDE, 3), jnp.float32)
    summaries = []
    for mode in (net.eval, net.train):
        mode()
        groups = trace_structure(net, shape).groups
        summaries.append([(g.size, g.producers, g.members, g.prunable) for g in groups])
    assert summaries[0] == summaries[1]


def test_mobilenet_v2_gate_slots_streams_and_layers_from_its_trace(mobilenet_v2_shape):
    """A slot per block's hidden channels and the head; the projections of a stage of several
    blocks are one residual stream; a hidden channel switches off the expansion's output, the
    depthwise filter (counted once) and the projection's input, and in block 1 (t = 1) the
    stem's output."""
    model = mobilenet_v2_shape
    slots = model.gate_slots
    assert [s.name for s in slots] == [f"block{i}" for i in range(1, 18)] + ["head"]
    assert [s.shape[0] for s in slots[:4]] == [32, 96, 144, 144]
    assert slots[-1].shape == (1280,) and slots[-1].layer == "head"
    stages = ((1, 2), (3, 4, 5), (6, 7, 8, 9), (10, 11, 12), (13, 14, 15))
    streams = [set(c.layers) for c in model.channel_couplings
               if any(layer.endswith(".project") for layer in c.layers)]
    assert streams == [{f"blocks.{i}.project" for i in stage} for stage in stages]
    summed = {i for stage in stages for i in stage[1:]}
    for i, block in enumerate(model.net.blocks):  # the summed projections are the coupled
        assert block.residual == (i in summed)  # ones after the first
    layers = {l.name: l for l in model.layers}
    assert "blocks.0.expand" not in layers  # t = 1
    assert layers["stem"].outputs == (("block1", 1),)  # block 1 is the stem's only reader
    assert layers["blocks.2.expand"].outputs == (("block3", 1),)
    assert layers["blocks.2.depthwise"].outputs == (("block3", 1),)
    assert layers["blocks.2.depthwise"].inputs == ()
    assert model.net.blocks[2].depthwise.groups == 144
    assert layers["blocks.2.project"].inputs == (("block3", 1),)
    assert layers["blocks.2.project"].outputs == ()
    assert layers["fc"].inputs == (("head", 1),)
    for layer in model.layers:
        assert model.layer_module(layer.name).kernel.shape == layer.kernel_shape


# ----------------------------------------------------------------------------- forward / backward


def batch_stats(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


@nnx.jit
def train_and_eval(model, x):
    """Gradients of a train-mode loss, the train-mode logits, then the eval-mode logits."""

    def loss(m):
        logits = m(x, train=True, rngs=nnx.Rngs(gates=cheap_key(1)))
        return jnp.sum(logits**2), logits

    (_, train_logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return grads, train_logits, model(x, train=False)


@nnx.jit
def eval_logits(model, x, gates):
    return model(x, train=False, gates=gates)


def check_forward_backward(model):
    """Finite logits in both modes, train mode moves the BatchNorm statistics, and finite
    gradients, nonzero for every declared kernel and every gate's parameters."""
    before = batch_stats(model)
    grads, train_logits, test_logits = train_and_eval(model, images())
    for logits in (train_logits, test_logits):
        assert logits.shape == (2, CLASSES) and bool(jnp.all(jnp.isfinite(logits)))
    assert all(not np.array_equal(a, b) for a, b in zip(before, batch_stats(model)))
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in leaves)
    kernels = [g for path, g in leaves if "kernel" in jax.tree_util.keystr(path)]
    assert len(kernels) == len(model.layers)
    assert all(float(jnp.abs(g).sum()) > 0 for g in kernels)
    assert len(model.gates) > 0
    for slot in model.gates:
        assert float(jnp.abs(grads["gates"][slot]["log_alpha"][...]).sum()) > 0


def test_densenet_forward_backward(densenet_unit):
    model = nnx.clone(densenet_unit)
    assert len(model.gates) == len(model.layers) - 1  # the stem's inputs are not gated
    check_forward_backward(model)


def test_mobilenet_v2_forward_backward(mobilenet_unit):
    model = nnx.clone(mobilenet_unit)
    assert list(model.gates) == ["block1", "block2", "block3", "head"]
    check_forward_backward(model)


@pytest.mark.parametrize("build, side, classes", [
    (zoo("densenet40"), 32, 10), (zoo("mobilenet_v2"), 224, 1000), (zoo("mobilenet_v2_cifar"), 32, 10),
])
def test_full_size_models_trace_to_logits(build, side, classes):
    graphdef, state = nnx.split(abstract(build))
    x = jax.ShapeDtypeStruct((2, side, side, 3), jnp.float32)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=False), state, x)
    assert out.shape == (2, classes)


# ----------------------------------------------------------------------------- gate semantics


def open_gates(model):
    return {slot.name: jnp.ones(slot.shape) for slot in model.gate_slots}


def unit_mask(sources, slot, mask, size):
    """The 0/1 value of each of ``size`` units under ``slot = mask`` (other slots open)."""
    values = np.ones(size, np.float32)
    for name, tiles in sources:
        if name == slot:
            values = values * np.tile(mask, tiles)
    return values


def zero_declared_weights(model, slot, mask):
    """Zero every kernel entry and bias that the declarations say ``slot = mask`` removes;
    returns how many kernel entries that is."""
    removed = 0
    for layer in model.layers:
        kept_in = unit_mask(layer.inputs, slot, mask, layer.in_units)
        kept_out = unit_mask(layer.outputs, slot, mask, layer.out_units)
        kept = kept_kernel(layer, kept_in, kept_out)
        module = model.layer_module(layer.name)
        module.kernel[...] = module.kernel[...] * kept
        if module.bias is not None:
            module.bias[...] = module.bias[...] * kept_out
        removed += int(kept.size - kept.sum())
    return removed


def check_closed_slot(model, slot, seed):
    """With half of ``slot`` closed, the weights the declarations remove do not matter; with the
    slot open they do; and the accounting removes exactly those weights."""
    randomize_batch_norms(model, np.random.default_rng(seed))
    x = images(seed)
    size = {s.name: s.shape[0] for s in model.gate_slots}[slot]
    mask = np.random.default_rng(seed).permutation(np.arange(size) % 2).astype(np.float32)
    opened = open_gates(model)
    closed = {**opened, slot: jnp.asarray(mask)}
    closed_logits, open_logits = eval_logits(model, x, closed), eval_logits(model, x, opened)
    dense = network_counts(model.layers)
    removed = zero_declared_weights(model, slot, mask)
    assert removed > 0
    counts = network_counts(model.layers, {slot: mask})
    assert float(dense["weights"]) - float(counts["weights"]) == removed
    np.testing.assert_allclose(eval_logits(model, x, closed), closed_logits, rtol=1e-5, atol=1e-5)
    assert not np.allclose(eval_logits(model, x, opened), open_logits, atol=1e-4)


@pytest.mark.parametrize("slot", ["block2.layer1", "trans1", "fc"])
def test_closed_densenet_gates_remove_what_they_declare(densenet_unit, slot):
    check_closed_slot(nnx.clone(densenet_unit), slot, seed=1)


@pytest.mark.parametrize("slot", ["block1", "block2", "block3", "head"])
def test_closed_mobilenet_v2_gates_remove_what_they_declare(mobilenet_unit, slot):
    check_closed_slot(nnx.clone(mobilenet_unit), slot, seed=2)


@pytest.mark.parametrize("slot, norm_of", [
    ("block2", lambda net: net.blocks[1].depthwise_bn), ("head", lambda net: net.head_bn),
])
def test_mobilenet_v2_gates_multiply_the_batchnorm_output_before_the_relu6(
    mobilenet_unit, slot, norm_of
):
    """A gate z equals scaling its BatchNorm's scale and bias by z, before the ReLU6: with the
    BatchNorm's outputs above 6 (where ReLU6 clips), a gate after the ReLU6 would differ."""
    model = nnx.clone(mobilenet_unit)
    randomize_batch_norms(model, np.random.default_rng(5))
    norm = norm_of(model.net)
    norm.bias[...] = norm.bias[...] + 8.0  # outputs past the clip
    x = images(5)
    z = jax.random.uniform(jax.random.key(6), norm.bias.shape, minval=0.2, maxval=0.8)
    gated = eval_logits(model, x, {**open_gates(model), slot: z})
    norm.scale[...], norm.bias[...] = norm.scale[...] * z, norm.bias[...] * z
    np.testing.assert_allclose(eval_logits(model, x, open_gates(model)), gated,
                               rtol=1e-5, atol=1e-5)


def test_a_gated_mobilenet_v2_slims_from_its_trace_to_its_open_channels(mobilenet_unit):
    """One channel closed in every slot: a hidden channel leaves the expansion (block 1: the
    stem), the depthwise convolution and the projection's rows, a head channel the head and the
    classifier's rows; the slim network has the gated model's test-time logits and counts."""
    model = nnx.clone(mobilenet_unit)
    randomize_batch_norms(model, np.random.default_rng(7))
    open_units = {}
    for slot in model.gate_slots:
        keep = np.arange(slot.shape[0]) != 1
        model.gates[slot.name].log_alpha[...] = jnp.where(keep, 5.0, -5.0)
        open_units[slot.name] = keep.astype(np.float32)
    x = np.asarray(images(7))
    slim = slim_traced_model(model, x)
    assert {name: tuple(v.shape) for name, v in slim.params.items()
            if name.endswith("kernel")} == {
        "stem.kernel": (3, 3, 3, 31), "blocks.0.depthwise.kernel": (3, 3, 1, 31),
        "blocks.0.project.kernel": (1, 1, 31, 8),
        "blocks.1.expand.kernel": (1, 1, 8, 15), "blocks.1.depthwise.kernel": (3, 3, 1, 15),
        "blocks.1.project.kernel": (1, 1, 15, 8),
        "blocks.2.expand.kernel": (1, 1, 8, 15), "blocks.2.depthwise.kernel": (3, 3, 1, 15),
        "blocks.2.project.kernel": (1, 1, 15, 8),
        "head.kernel": (1, 1, 8, 11), "fc.kernel": (11, CLASSES),
    }
    counted = network_counts(model.layers, open_units)
    assert slim.report.flops_after == pytest.approx(float(counted["flops"]))
    assert slim.report.max_logit_difference < 1e-5


def test_a_gated_densenet_slims_from_its_trace_to_each_consumers_open_inputs(densenet_unit):
    """Closed input gates leave their consumer's kernel rows and its own BatchNorm's entries;
    a feature every consumer closed leaves its producer too (the stem's channel 0, block 1's
    new channel 1, which only trans1 reads); the slim network has the gated model's test-time
    logits and fewer parameters and FLOPs."""
    model = nnx.clone(densenet_unit)
    randomize_batch_norms(model, np.random.default_rng(8))
    closed = {"block1.layer1": (0, 1), "trans1": (0, 5), "block2.layer1": (2,), "fc": (3, 4, 7)}
    for slot in model.gate_slots:
        keep = ~np.isin(np.arange(slot.shape[0]), closed.get(slot.name, ()))
        model.gates[slot.name].log_alpha[...] = jnp.where(keep, 5.0, -5.0)
    x = np.asarray(images(8))
    slim = slim_traced_model(model, x)
    shapes = {name: tuple(v.shape) for name, v in slim.params.items()}
    assert shapes["stem.kernel"] == (3, 3, 3, 3)  # channel 0: closed by its two consumers
    assert shapes["blocks.0.0.conv.kernel"] == (3, 3, 2, 3)
    assert shapes["blocks.0.0.bn.scale"] == (2,)
    assert shapes["transitions.0.conv.kernel"] == (1, 1, 6, 8)
    assert shapes["transitions.0.bn.scale"] == shapes["transitions.0.bn.mean"] == (6,)
    assert shapes["blocks.1.0.conv.kernel"] == (3, 3, 7, 4)
    assert shapes["fc.kernel"] == (13, CLASSES) and shapes["final_bn.bias"] == (13,)
    assert slim.report.params_after < slim.report.params_before
    assert slim.report.flops_after < slim.report.flops_before
    assert slim.report.max_logit_difference < 1e-5


def test_a_dep_l0_densenet_slims_without_its_gate_generator():
    """Dep-L0's gates come from a generator: the slim network, the plain network's arrays with
    the generator's test-time gates folded in, has the gated logits."""
    method = create_method("dep_l0", method_config("dep_l0", "densenet40"), RunInfo(100))
    model = narrow_densenet(gate_factory=method.make_gates)
    assert any(isinstance(node, GateGenerator) for _, node in nnx.iter_graph(model))
    randomize_batch_norms(model, np.random.default_rng(9))
    slim = slim_traced_model(model, np.asarray(images(9)))
    assert slim.report.max_logit_difference < 1e-5


@nnx.jit
def train_logits(model, x):
    return model(x, train=True, rngs=nnx.Rngs(gates=cheap_key(0)))


@pytest.mark.parametrize("build, layer", [
    (narrow_densenet, "transitions.0.conv"),
    (functools.partial(narrow_mobilenet, "imagenet"), "blocks.1.depthwise"),
])
def test_weight_granularity_gates_every_kernel(build, layer):
    """One weight gate per kernel entry: the model runs in both modes, and a 0/1 draw of one
    layer's weight gates equals multiplying them into that kernel."""
    model = build(granularity="weight")
    assert {n: tuple(g.shape) for n, g in model.gates.items()} == {
        l.name: l.kernel_shape for l in model.layers
    }
    assert all(l.inputs == () and l.outputs == () and l.kernel_slot == l.name
               for l in model.layers)
    x = images(3)
    logits = train_logits(model, x)
    assert logits.shape == (2, CLASSES) and bool(jnp.all(jnp.isfinite(logits)))
    randomize_batch_norms(model, np.random.default_rng(3))
    z = jax.random.bernoulli(jax.random.key(4), 0.5, model.gates[layer].shape).astype(jnp.float32)
    opened = {name: jnp.ones(g.shape) for name, g in model.gates.items()}
    gated = eval_logits(model, x, {**opened, layer: z})
    module = model.layer_module(layer)
    module.kernel[...] = module.kernel[...] * z
    np.testing.assert_allclose(eval_logits(model, x, opened), gated, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- construction


def test_registry_and_bad_arguments():
    assert {"densenet40", "mobilenet_v2", "mobilenet_v2_cifar"} <= set(MODELS)
    model = nnx.eval_shape(lambda: build_zoo_model("mobilenet_v2_cifar", rngs=nnx.Rngs(0),
                                                   num_classes=100, input_shape=(32, 32, 3)))
    assert isinstance(model.net, MobileNetV2) and model.net.variant == "cifar"
    assert model.layers[-1].kernel_shape == (1280, 100)
    model = nnx.eval_shape(lambda: build_zoo_model("densenet40", rngs=nnx.Rngs(0)))
    assert isinstance(model.net, DenseNet)
    assert model.net.depth == 40 and model.net.layers_per_block == 12
    with pytest.raises(ValueError, match="3m \\+ 4"):
        DenseNet(depth=41, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="at least 4 pixels"):
        DenseNet(depth=7, input_shape=(2, 2, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="variant"):
        MobileNetV2(variant="tiny", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="table"):
        MobileNetV2(table=((6, 24, 2, 3),), rngs=nnx.Rngs(0))
