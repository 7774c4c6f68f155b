import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.gates import HardConcreteGate
from sparsejax.models import (
    MODELS,
    CifarResNet,
    ImageNetResNet,
    PreActResNet,
    WideResNet,
    resnet34,
    resnet50,
    resnet164,
    wrn28_10,
)
from sparsejax.models.base import each_slot
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure import count_layer
from sparsejax.structure.traced_model import build_zoo_model, gate_zoo_network
from tests.gated import randomize_batch_norms

CLASSES = 10
BATCH = (2, 32, 32, 3)


@each_slot
def hc_factory(slot, rngs):
    return HardConcreteGate(slot.shape, rngs=rngs, droprate_init=slot.droprate_init)


def abstract(factory, **kwargs):
    """The model's structure and parameter shapes, without allocating its parameters."""
    return nnx.eval_shape(lambda: factory(rngs=nnx.Rngs(0), **kwargs))


def n_params(model):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def exact_counts(layers, values):
    """count_network's totals, summed per layer in Python floats (float32 totals of billions of
    MACs round to a multiple of 256)."""
    counts = [count_layer(layer, values) for layer in layers]
    return {
        "weights": sum(float(c.weights) for c in counts),
        "flops": sum(float(c.macs) for c in counts),
    }


def strided(size, stride):
    return (size - 1) // stride + 1


# ----------------------------------------------------------------------------- closed forms


def wrn_formula(n, k, classes, side=32):
    """(kernel weights, BatchNorm params, MACs) of WRN-(6n+4)-k: stem 3x3x3x16, blocks of
    BN(c) conv3x3(c->w) BN(w) conv3x3(w->w) [+ conv1x1(c->w)], final BN(64k), dense 64k->classes."""
    weights, bn, macs = 27 * 16, 0, 27 * 16 * side * side
    c = 16
    for stage, width in enumerate((16 * k, 32 * k, 64 * k)):
        for b in range(n):
            side = strided(side, 2 if stage > 0 and b == 0 else 1)
            block = 9 * c * width + 9 * width * width + (c * width if c != width else 0)
            weights, macs, bn = weights + block, macs + block * side * side, bn + 2 * c + 2 * width
            c = width
    return weights + c * classes, bn + 2 * c, macs + c * classes


def preact_formula(n, widths, classes, side=32):
    """(kernel weights, BatchNorm params, MACs) of the bottleneck ResNet-(9n+2): stem
    3x3x3xw0, blocks of BN(c) conv1x1(c->p) BN(p) conv3x3/s(p->p) BN(p) conv1x1(p->4p)
    [+ conv1x1/s(c->4p)], final BN(4 p_last), dense -> classes."""
    weights, bn, macs = 27 * widths[0], 0, 27 * widths[0] * side * side
    c = widths[0]
    for stage, p in enumerate(widths):
        for b in range(n):
            out = 4 * p
            macs += c * p * side * side  # conv1 runs before the stride
            side = strided(side, 2 if stage > 0 and b == 0 else 1)
            rest = 9 * p * p + p * out + (c * out if c != out else 0)
            weights, macs = weights + c * p + rest, macs + rest * side * side
            bn += 2 * c + 4 * p
            c = out
    return weights + c * classes, bn + 2 * c, macs + c * classes


def resnet50_formula(blocks, widths, classes, side=224):
    """(kernel weights, BatchNorm params, MACs) of the v1.5 bottleneck ResNet: stem 7x7/2, max
    pool /2, blocks conv1x1(c->p) conv3x3/s(p->p) conv1x1(p->4p) each with BN,
    [+ conv1x1/s(c->4p) + BN], dense 4 p_last -> classes."""
    side = strided(side, 2)
    weights, bn, macs = 49 * 3 * widths[0], 2 * widths[0], 49 * 3 * widths[0] * side * side
    side = strided(side, 2)
    c = widths[0]
    for stage, (count, p) in enumerate(zip(blocks, widths)):
        for b in range(count):
            out = 4 * p
            macs += c * p * side * side
            side = strided(side, 2 if stage > 0 and b == 0 else 1)
            rest = 9 * p * p + p * out
            bn += 4 * p + 2 * out
            if c != out:
                rest += c * out
                bn += 2 * out
            weights, macs = weights + c * p + rest, macs + rest * side * side
            c = out
    return weights + c * classes, bn, macs + c * classes


def resnet34_formula(blocks, widths, classes, side=224):
    """(kernel weights, BatchNorm params, MACs) of the torchvision basic-block ResNet: stem 7x7/2,
    max pool /2, blocks conv3x3/s(c->p) conv3x3(p->p) each with BN, [+ conv1x1/s(c->p) + BN],
    dense p_last -> classes."""
    side = strided(side, 2)
    weights, bn, macs = 49 * 3 * widths[0], 2 * widths[0], 49 * 3 * widths[0] * side * side
    side = strided(side, 2)
    c = widths[0]
    for stage, (count, p) in enumerate(zip(blocks, widths)):
        for b in range(count):
            side = strided(side, 2 if stage > 0 and b == 0 else 1)
            block = 9 * c * p + 9 * p * p
            bn += 4 * p
            if c != p or (stage > 0 and b == 0):
                block += c * p
                bn += 2 * p
            weights, macs = weights + block, macs + block * side * side
            c = p
    return weights + c * classes, bn, macs + c * classes


@pytest.fixture(scope="module")
def full_models():
    """The full-size models, as shapes only."""
    return {
        "wrn28_10": abstract(lambda **kw: build_zoo_model("wrn28_10", **kw)),
        "resnet164": abstract(lambda **kw: build_zoo_model("resnet164", **kw)),
        "resnet34": abstract(lambda **kw: build_zoo_model("resnet34", **kw)),
        "resnet50": abstract(lambda **kw: build_zoo_model("resnet50", **kw)),
    }


FULL_SIZE = {
    # name: (kernel weights, BatchNorm params, MACs), dense biases, published total
    "wrn28_10": (wrn_formula(4, 10, CLASSES), CLASSES, 36_479_194),
    "resnet164": (preact_formula(18, (16, 32, 64), CLASSES), CLASSES, 1_703_258),
    "resnet50": (resnet50_formula((3, 4, 6, 3), (64, 128, 256, 512), 1000), 1000, 25_557_032),
    # torchvision's ResNet-34: 21,797,672 parameters (its model table and weights' meta)
    "resnet34": (resnet34_formula((3, 4, 6, 3), (64, 128, 256, 512), 1000), 1000, 21_797_672),
}


# ----------------------------------------------------------------------------- dense counts


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_dense_parameter_counts(full_models, name):
    (weights, bn, _), biases, total = FULL_SIZE[name]
    assert weights + bn + biases == total
    assert n_params(full_models[name]) == total


def test_resnet164_for_100_classes_has_network_slimmings_count():
    weights, bn, _ = preact_formula(18, (16, 32, 64), 100)
    assert weights + bn + 100 == 1_726_388  # "1.73M" in Liu et al. (2017)


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_dense_accounting(full_models, name):
    (weights, _, macs), _, _ = FULL_SIZE[name]
    counts = exact_counts(full_models[name].layers, {})
    assert counts["weights"] == weights
    assert counts["flops"] == macs


def test_known_mac_counts():
    assert resnet50_formula((3, 4, 6, 3), (64, 128, 256, 512), 1000)[2] == 4_089_184_256  # 4.09G
    # 3.66G: torchvision's "GFLOPS" of ResNet-34 and GReg's Table 3 (Wang et al. 2021)
    assert resnet34_formula((3, 4, 6, 3), (64, 128, 256, 512), 1000)[2] == 3_663_761_408
    assert wrn_formula(4, 10, CLASSES)[2] == 5_243_328_768
    assert preact_formula(18, (16, 32, 64), CLASSES)[2] == 247_646_720


# ----------------------------------------------------------------------------- gate slots


def test_wrn28_10_gate_slots(full_models):
    slots = full_models["wrn28_10"].gate_slots
    widths = [160] * 4 + [320] * 4 + [640] * 4
    inputs = [16, 160, 160, 160, 160, 320, 320, 320, 320, 640, 640, 640]
    assert [(s.name, s.layer, s.shape, s.group_size) for s in slots] == [
        (f"block{i}.conv1", f"blocks.{i - 1}.conv1", (w,), 9 * c)
        for i, (w, c) in enumerate(zip(widths, inputs), start=1)
    ]
    assert sum(math.prod(s.shape) for s in slots) == 4480
    assert all(s.axis == 3 and not s.gates_bias and s.droprate_init == 0.3 for s in slots)


def test_wrn_weight_gates_take_its_drop_rate():
    """The weight gates, which no placement sets, start at WRN's ``droprate_init`` 0.3 (the
    L0-HC script's), not a traced model's default 0.5."""
    model = abstract(NARROW["wrn_10_1"], granularity="weight")
    assert len(model.gate_slots) == 2 * 3 + 2 + 2  # conv1, conv2 per block, 2 shortcuts, stem, fc
    assert {slot.droprate_init for slot in model.gate_slots} == {0.3}


def test_resnet50_gate_slots(full_models):
    slots = full_models["resnet50"].gate_slots
    assert len(slots) == 33
    assert [s.shape[0] for s in slots] == [64] * 7 + [128] * 8 + [256] * 12 + [512] * 6
    assert slots[0].name == "stem" and slots[0].group_size == 7 * 7 * 3
    assert [(s.name, s.layer) for s in slots[1:]] == [
        (f"block{i}.conv{j}", f"blocks.{i - 1}.conv{j}") for i in range(1, 17) for j in (1, 2)]
    groups = {s.name: s.group_size for s in slots}
    assert groups["block1.conv1"] == 64 and groups["block4.conv1"] == 256  # 1x1 over the input
    assert groups["block4.conv2"] == 9 * 128
    assert all(s.axis == 3 and not s.gates_bias and s.droprate_init == 0.5 for s in slots)


def test_resnet34_gate_slots(full_models):
    """A basic block gates conv1 only; the stem writes into stage 1's stream, so it is not
    gated."""
    slots = full_models["resnet34"].gate_slots
    assert [(s.name, s.layer) for s in slots] == [
        (f"block{i}.conv1", f"blocks.{i - 1}.conv1") for i in range(1, 17)]
    assert [s.shape[0] for s in slots] == [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3
    groups = {s.name: s.group_size for s in slots}
    assert groups["block1.conv1"] == 9 * 64 and groups["block4.conv1"] == 9 * 64
    assert groups["block5.conv1"] == 9 * 128
    assert all(s.axis == 3 and not s.gates_bias for s in slots)
    layers = {l.name: l for l in full_models["resnet34"].layers}
    assert layers["blocks.3.conv1"].out_positions == 28 * 28  # the stride is on conv1


def test_resnet164_gate_slots(full_models):
    slots = full_models["resnet164"].gate_slots
    assert len(slots) == 3 * 54 + 1
    block1 = [(s.name, s.layer, s.shape, s.axis, s.group_size) for s in slots[:3]]
    assert block1 == [
        ("block1.conv1_in", "blocks.0.conv1", (16,), 2, 16),
        ("block1.conv2_in", "blocks.0.conv2", (16,), 2, 9 * 16),
        ("block1.conv3_in", "blocks.0.conv3", (16,), 2, 64),
    ]
    by_name = {s.name: s for s in slots}
    assert by_name["block2.conv1_in"].shape == (64,)
    assert by_name["block19.conv1_in"].shape == (64,) and by_name["block19.conv2_in"].shape == (32,)
    assert by_name["block54.conv3_in"].group_size == 256
    fc = slots[-1]
    assert (fc.name, fc.layer, fc.shape, fc.axis, fc.group_size) == ("fc_in", "fc", (256,), 0, 10)


# ----------------------------------------------------------------------------- channel flow


NARROW = {
    # narrow widths shared across the models keep the number of distinct shapes (and compilations)
    # small. Stage 1 keeps the stem's width: the stem joins stage 1's stream.
    "wrn_10_1": lambda **kw: traced_network(
        lambda rngs: WideResNet(depth=10, widen_factor=1, stem_width=4, base_widths=(4, 4, 4),
                                rngs=rngs), "wrn28_10", **kw),
    # two blocks a stage: projections (on a width change or a stride) and identity shortcuts
    "preact_20": lambda **kw: traced_network(
        lambda rngs: PreActResNet(depth=20, widths=(4, 4, 4), rngs=rngs), "resnet164", **kw),
    "bottleneck_2_1": lambda **kw: traced_network(
        lambda rngs: ImageNetResNet(blocks_per_stage=(2, 1), widths=(4, 4), input_shape=BATCH[1:],
                                    num_classes=CLASSES, rngs=rngs), "resnet50", **kw),
    # option A: an identity block, a stride-2 block zero-padding its stream to twice the width,
    # a stride-2 block that only subsamples it
    "cifar_8": lambda **kw: traced_network(
        lambda rngs: CifarResNet(depth=8, widths=(4, 8, 8), rngs=rngs), "resnet20", **kw),
    # basic blocks: an identity first stage that the stem joins, then a projection
    "basic_2_1": lambda **kw: traced_network(
        lambda rngs: ImageNetResNet(blocks_per_stage=(2, 1), widths=(4, 8), block="basic",
                                    input_shape=BATCH[1:], num_classes=CLASSES, rngs=rngs),
        "resnet34", **kw),
}


def fast_key(seed):
    """A key of the "rbg" generator, whose samplers compile several times faster than threefry's
    (each new initialiser shape is a compilation)."""
    return jax.random.key(seed, impl="rbg")


def traced_network(build_net, name, *, rngs, **kwargs):
    """The plain network ``build_net(rngs)`` gated from its trace, as the engine gates the zoo
    model ``name``."""
    return gate_zoo_network(build_net(rngs), name, rngs=rngs, **kwargs)


@pytest.fixture(scope="module")
def narrow():
    """``narrow(name, granularity)``: a fresh copy of a gated narrow model, each built once."""
    built = {}

    def copy(name, granularity="unit"):
        if (name, granularity) not in built:
            built[name, granularity] = NARROW[name](
                rngs=nnx.Rngs(fast_key(0)), gate_factory=hc_factory, granularity=granularity
            )
        return nnx.clone(built[name, granularity])

    return copy


def test_stream_membership_of_the_stem():
    wrn = abstract(NARROW["wrn_10_1"])  # its trace finds the streams the declarations gave
    assert [set(c.layers) for c in wrn.channel_couplings] == [
        {"stem", "blocks.0.conv2"},
        {"blocks.1.shortcut", "blocks.1.conv2"},
        {"blocks.2.shortcut", "blocks.2.conv2"},
    ]
    resnet = abstract(NARROW["bottleneck_2_1"])  # the stem is no member: block 1 projects it
    assert [set(c.layers) for c in resnet.channel_couplings] == [
        {"blocks.0.shortcut", "blocks.0.conv3", "blocks.1.conv3"},
        {"blocks.2.shortcut", "blocks.2.conv3"},
    ]
    basic = abstract(NARROW["basic_2_1"])
    assert [set(c.layers) for c in basic.channel_couplings] == [
        {"stem", "blocks.0.conv2", "blocks.1.conv2"},
        {"blocks.2.shortcut", "blocks.2.conv2"},
    ]
    cifar = abstract(NARROW["cifar_8"])  # option A: stage 1's stream is padded into stage 2's
    assert [set(c.layers) for c in cifar.channel_couplings] == [
        {"stem", "blocks.0.conv2"}, {"blocks.1.conv2", "blocks.2.conv2"},
    ]


# ----------------------------------------------------------------------------- forward / backward


def images(seed=0):
    return jax.random.normal(jax.random.key(seed), BATCH)


def batch_stats(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


@nnx.jit
def eval_logits(model, x, gates):
    return model(x, train=False, gates=gates)


@nnx.jit
def train_logits(model, x, gates):
    return model(x, train=True, gates=gates)


GATE_SEED = 1


@nnx.jit
def train_logits_and_grads(model, x):
    def loss(m):
        logits = m(x, train=True, rngs=nnx.Rngs(gates=fast_key(GATE_SEED)))
        return jnp.sum(logits**2), logits

    (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return logits, grads


def check_forward_and_backward(model):
    """Train mode moves every BatchNorm's statistics and gives finite gradients, nonzero for
    every declared kernel and every gate's parameters; eval mode moves no statistics."""
    x = images()
    before = batch_stats(model)
    out, grads = train_logits_and_grads(model, x)
    assert out.shape == (2, CLASSES) and bool(jnp.all(jnp.isfinite(out)))
    trained = batch_stats(model)
    assert len(trained) == 2 * sum(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_graph(model))
    assert all(not np.array_equal(a, b) for a, b in zip(before, trained))
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in leaves)
    for layer in model.layers:
        kernel = model.layer_module(layer.name).kernel
        assert kernel.shape == layer.kernel_shape
    kernels = [g for path, g in leaves if "'kernel']" in jax.tree_util.keystr(path)]
    assert len(kernels) == len(model.layers)
    assert all(float(jnp.abs(g).sum()) > 0 for g in kernels)
    drawn = model.gate_values(x.shape[0], train=True, rngs=nnx.Rngs(gates=fast_key(GATE_SEED)),
                              gates=None)
    for slot, z in drawn.items():
        # the clip of a hard-concrete sample at 0 or 1 stops its gradient
        if bool(jnp.any((z > 0) & (z < 1))):
            assert float(jnp.abs(grads["gates"][slot]["log_alpha"][...]).sum()) > 0, slot
    out = eval_logits(model, x, None)
    assert out.shape == (2, CLASSES) and bool(jnp.all(jnp.isfinite(out)))
    for a, b in zip(trained, batch_stats(model)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(NARROW))
def test_forward_backward_with_unit_gates(narrow, name):
    model = narrow(name)
    assert set(model.gates) == {s.name for s in model.gate_slots}
    assert all(l.kernel_slot is None for l in model.layers)
    check_forward_and_backward(model)


@pytest.mark.parametrize("name", sorted(NARROW))
def test_weight_granularity_gates_every_kernel(narrow, name):
    """Weight gates multiply every kernel entry: gating with random 0/1 masks gives the logits of
    the network whose kernels are multiplied by the masks."""
    model = narrow(name, "weight")
    assert {n: tuple(g.shape) for n, g in model.gates.items()} == {
        l.name: l.kernel_shape for l in model.layers
    }
    assert all(l.inputs == () and l.outputs == () and l.kernel_slot == l.name for l in model.layers)
    rng = np.random.default_rng(0)
    masks = {s.name: (rng.random(s.shape) < 0.7).astype(np.float32) for s in model.gate_slots}
    x = images()
    gated = eval_logits(model, x, masks)
    assert gated.shape == (2, CLASSES) and bool(jnp.all(jnp.isfinite(gated)))
    for layer in model.layers:
        kernel = model.layer_module(layer.name).kernel
        kernel[...] = kernel[...] * masks[layer.name]
    np.testing.assert_allclose(eval_logits(model, x, all_open(model)), gated, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- gate semantics


def all_open(model):
    return {s.name: jnp.ones(s.shape) for s in model.gate_slots}


def declared_dead_weights(model, slot, channel):
    """(layer, kernel index) of every weight the declarations say a closed ``channel`` of
    ``slot`` switches off: the output column of each layer the slot gates the outputs of, the
    input row(s) of each layer it gates the inputs of."""
    dead = []
    for layer in model.layers:
        assert layer.groups == 1
        for source, _ in layer.outputs:
            if source == slot:
                dead.append((layer.name, (..., channel)))
        for source, tiles in layer.inputs:
            if source == slot:
                rows = [p * (layer.in_units // tiles) + channel for p in range(tiles)]
                dead.append((layer.name, (..., np.array(rows), slice(None))))
    return dead


def perturb(model, dead, seed):
    rng = np.random.default_rng(seed)
    for name, index in dead:
        kernel = model.layer_module(name).kernel
        values = np.array(kernel[...])
        values[index] += 1.0 + rng.normal(size=values[index].shape)
        kernel[...] = jnp.asarray(values)


@pytest.mark.parametrize("name", sorted(NARROW))
def test_closed_gate_removes_exactly_the_declared_weights(narrow, name):
    """For every slot: with channel 0 closed, changing the weights the declarations call removed
    does not change the logits, while with the gate open it does; and the accounting removes
    exactly those weights and their MACs."""
    model = narrow(name)
    train_logits(model, images(), all_open(model))  # nontrivial running statistics
    layers = {l.name: l for l in model.layers}
    x = images(1)
    dense = exact_counts(model.layers, {})
    for slot in model.gate_slots:
        closed = all_open(model) | {slot.name: jnp.ones(slot.shape).at[0].set(0.0)}
        dead = declared_dead_weights(model, slot.name, 0)
        assert dead, f"slot {slot.name} gates no declared layer"
        saved = {n: model.layer_module(n).kernel[...] for n, _ in dead}
        out_closed = eval_logits(model, x, closed)
        out_open = eval_logits(model, x, all_open(model))
        perturb(model, dead, seed=7)
        np.testing.assert_allclose(eval_logits(model, x, closed), out_closed, atol=1e-5,
                                   err_msg=slot.name)
        changed = eval_logits(model, x, all_open(model))
        assert not np.allclose(changed, out_open, atol=1e-4), slot.name
        for n, kernel in saved.items():
            model.layer_module(n).kernel[...] = kernel
        removed = [(layers[n], saved[n][index].size) for n, index in dead]
        counts = exact_counts(model.layers, {slot.name: np.asarray(closed[slot.name])})
        assert dense["weights"] - counts["weights"] == sum(w for _, w in removed)
        assert dense["flops"] - counts["flops"] == sum(l.out_positions * w for l, w in removed)


@pytest.mark.parametrize(
    "name, slot, norm_of",
    [
        ("wrn_10_1", "block2.conv1", lambda m: m.net.blocks[1].bn2),
        ("preact_20", "block1.conv1_in", lambda m: m.net.blocks[0].bn1),
        ("preact_20", "block4.conv2_in", lambda m: m.net.blocks[3].bn2),
        ("preact_20", "block5.conv3_in", lambda m: m.net.blocks[4].bn3),
        ("preact_20", "fc_in", lambda m: m.net.final_bn),
        ("bottleneck_2_1", "stem", lambda m: m.net.stem_bn),
        ("bottleneck_2_1", "block3.conv1", lambda m: m.net.blocks[2].bn1),
        ("bottleneck_2_1", "block3.conv2", lambda m: m.net.blocks[2].bn2),
        ("basic_2_1", "block3.conv1", lambda m: m.net.blocks[2].bn1),
        ("cifar_8", "stem", lambda m: m.net.stem_bn),
        ("cifar_8", "block2.conv1", lambda m: m.net.blocks[1].bn1),
    ],
)
def test_gates_multiply_the_batchnorm_output(narrow, name, slot, norm_of):
    """A gate z equals scaling its BatchNorm's scale and bias by z (eval mode): the gate acts
    after the BatchNorm. In train mode, halving one channel's gate changes the logits, which a
    gate placed before a train-mode BatchNorm would not (the BatchNorm divides it back out)."""
    model = narrow(name)
    x = images(1)
    train_logits(model, images(), all_open(model))  # nontrivial running statistics
    shape = {s.name: s.shape for s in model.gate_slots}[slot]
    z = jax.random.uniform(jax.random.key(3), shape)
    gated = eval_logits(model, x, all_open(model) | {slot: z})
    norm = norm_of(model)
    scale, bias = norm.scale[...], norm.bias[...]
    norm.scale[...], norm.bias[...] = scale * z, bias * z
    np.testing.assert_allclose(eval_logits(model, x, all_open(model)), gated, rtol=1e-5, atol=1e-5)
    norm.scale[...], norm.bias[...] = scale, bias
    halved = train_logits(model, x, all_open(model) | {slot: jnp.ones(shape).at[0].set(0.5)})
    assert not np.allclose(halved, train_logits(model, x, all_open(model)), atol=1e-4)


def gates_set(model, keep_of):
    """Random BatchNorms, and each slot's test-time gates open on ``keep_of(slot)`` (booleans)
    and closed elsewhere; returns the open units per slot as 0/1 masks."""
    randomize_batch_norms(model, np.random.default_rng(1))
    open_units = {}
    for slot in model.gate_slots:
        keep = keep_of(slot)
        model.gates[slot.name].log_alpha[...] = jnp.where(keep, 5.0, -5.0)
        open_units[slot.name] = keep.astype(np.float32)
    return open_units


def kernel_shapes(slim):
    return {name: tuple(v.shape) for name, v in slim.params.items() if name.endswith("kernel")}


def assert_slim_logits(slim, model, x):
    np.testing.assert_allclose(np.asarray(slim(x)), np.asarray(eval_logits(model, x, None)),
                               rtol=1e-5, atol=1e-5)


def test_a_gated_wrn_slims_from_its_trace_to_its_open_channels(narrow):
    """Closed conv1 gates remove their channels from conv1, BN2 and conv2 (the residual
    streams stay whole); the slim network has the gated model's FLOPs and test-time logits."""
    model = narrow("wrn_10_1")
    rng = np.random.default_rng(2)  # one channel closed per slot
    open_units = gates_set(model, lambda s: np.arange(s.shape[0]) != rng.integers(s.shape[0]))
    x = np.asarray(images(1))
    slim = slim_traced_model(model, x)
    assert {name: tuple(v.shape) for name, v in slim.params.items() if name.endswith("kernel")
            and ".conv" in name} == {
        f"blocks.{i}.{conv}.kernel": shape
        for i in range(3)
        for conv, shape in (("conv1", (3, 3, 4, 3)), ("conv2", (3, 3, 3, 4)))
    }
    counted = exact_counts(model.layers, open_units)
    assert slim.report.flops_after == pytest.approx(float(counted["flops"]))
    assert_slim_logits(slim, model, x)


def test_a_gated_bottleneck_resnet_slims_from_its_trace_to_its_open_channels(narrow):
    """One channel closed in every slot: the stem's goes from the stem, its BatchNorm and both
    readers of block 1 (conv1 and the shortcut), a block's conv1 / conv2 channel from the
    convolution and the next one's rows; the streams stay whole. The slim network has the
    gated model's FLOPs and test-time logits."""
    model = narrow("bottleneck_2_1")
    open_units = gates_set(model, lambda s: np.arange(s.shape[0]) != 1)
    x = np.asarray(images(1))
    slim = slim_traced_model(model, x)
    block = {"conv1": (1, 1, 16, 3), "conv2": (3, 3, 3, 3), "conv3": (1, 1, 3, 16)}
    assert kernel_shapes(slim) == {
        "stem.kernel": (7, 7, 3, 3), "fc.kernel": (16, CLASSES),
        "blocks.0.conv1.kernel": (1, 1, 3, 3), "blocks.0.shortcut.kernel": (1, 1, 3, 16),
        "blocks.2.shortcut.kernel": (1, 1, 16, 16),
        **{f"blocks.{i}.{conv}.kernel": shape for i in range(3) for conv, shape in block.items()
           if (i, conv) != (0, "conv1")},
    }
    counted = exact_counts(model.layers, open_units)
    assert slim.report.flops_after == pytest.approx(float(counted["flops"]))
    assert_slim_logits(slim, model, x)


def cifar_8_kernels(block1_rows, inner):
    """The kernel shapes of the narrow CIFAR ResNet slimmed with its streams (4, 8, 8 channels)
    whole, ``block1_rows`` of the stem's channels read by block 1's conv1 and ``inner`` conv1
    channels left in each block."""
    streams, inputs = (4, 8, 8), (block1_rows, 4, 8)
    return {"stem.kernel": (3, 3, 3, 4), "fc.kernel": (8, CLASSES)} | {
        f"blocks.{i}.{conv}.kernel": shape for i in range(3) for conv, shape in (
            ("conv1", (3, 3, inputs[i], inner[i])), ("conv2", (3, 3, inner[i], streams[i])))
    }


def test_a_gated_cifar_resnet_slims_from_its_trace_to_its_open_channels(narrow):
    """One channel closed in every slot: a block's conv1 channel goes from conv1, BN1 and
    conv2's rows; the stem's, one member of a stream that option A pads into the next, leaves
    the stem and its BatchNorm whole (the stream keeps its width) and goes from the rows of
    block 1's conv1, its only reader. The slim network has the gated model's test-time logits
    and its FLOPs but for the stem's closed channels, which the counts take out and the stream
    keeps (their BatchNorm outputs zero)."""
    model = narrow("cifar_8")
    open_units = gates_set(model, lambda s: np.arange(s.shape[0]) != 1)
    x = np.asarray(images(1))
    slim = slim_traced_model(model, x)
    assert kernel_shapes(slim) == cifar_8_kernels(block1_rows=3, inner=(3, 7, 7))
    counted = exact_counts(model.layers, open_units)
    stem_column = 3 * 3 * 3 * 32 * 32  # the MACs of one stem channel on 32 x 32 pixels
    assert slim.report.flops_after == pytest.approx(float(counted["flops"]) + stem_column)
    assert_slim_logits(slim, model, x)


def zero_channels(conv, norm, channels):
    """GReg's pruned filters: the kernel columns of ``channels`` and their BatchNorm's scale and
    bias zero, so that the channels output exactly zero."""
    channels = np.asarray(channels)
    conv.kernel[...] = conv.kernel[...].at[..., channels].set(0.0)
    norm.scale[...] = norm.scale[...].at[channels].set(0.0)
    norm.bias[...] = norm.bias[...].at[channels].set(0.0)


def test_zeroed_filters_of_a_cifar_resnet_slim_without_gates():
    """GReg-style zeroed conv1 filters in every block leave the slim network (conv1's columns,
    BN1's entries, conv2's rows) with no gates at all; channel 0 zeroed in every member of
    every stream stays, since option A pads each stream into the next (fixed widths), and
    leaves only the rows of block 1's conv1 that read the zeroed stem. The slim network
    computes the zeroed one."""
    model = NARROW["cifar_8"](rngs=nnx.Rngs(fast_key(0)))
    randomize_batch_norms(model, np.random.default_rng(1))
    net = model.net
    zero_channels(net.stem, net.stem_bn, [0])
    for block, inner in zip(net.blocks, ([1, 2], [0, 3, 5], [6])):
        zero_channels(block.conv1, block.bn1, inner)
        zero_channels(block.conv2, block.bn2, [0])
    x = np.asarray(images(1))
    slim = slim_traced_model(model, x)
    assert kernel_shapes(slim) == cifar_8_kernels(block1_rows=3, inner=(2, 5, 7))
    assert_slim_logits(slim, model, x)


def test_zeroed_stream_channels_go_only_where_every_member_is_zero(narrow):
    """GReg-style zeroed filters (kernel column and BatchNorm scale and bias) on a residual
    stream: channels zeroed in both of stage 2's members (the shortcut and conv3) leave the slim
    network, channels zeroed in one member only stay; the logits are the gated model's."""
    model = narrow("bottleneck_2_1")
    randomize_batch_norms(model, np.random.default_rng(1))
    for gate in model.gates.values():
        gate.log_alpha[...] = jnp.full(gate.shape, 5.0)
    block = model.net.blocks[2]
    zero_channels(block.shortcut, block.shortcut_bn, [0, 3, 5])
    zero_channels(block.conv3, block.bn3, [0, 1, 2, 3, 5])
    x = np.asarray(images(1))
    slim = slim_traced_model(model, x)
    assert slim.params["blocks.2.conv3.kernel"].shape[-1] == 13
    assert slim.params["blocks.2.shortcut.kernel"].shape[-1] == 13
    assert slim.params["fc.kernel"].shape[0] == 13
    assert slim.params["blocks.1.conv3.kernel"].shape[-1] == 16  # stage 1 untouched
    assert_slim_logits(slim, model, x)


def test_a_gated_preact_resnet_slims_from_its_trace_to_its_open_inputs(narrow):
    """Closed gates after a block's BN1 and the final BN drop conv1's and fc's rows only (the
    stream stays whole for the shortcuts and the other blocks); those after BN2 and BN3 drop
    conv1's and conv2's output channels. The slim network has the gated model's FLOPs and
    test-time logits."""
    model = narrow("preact_20")
    rng = np.random.default_rng(3)
    open_units = gates_set(model, lambda s: rng.random(s.shape) >= 0.3)
    x = np.asarray(images(1))
    slim = slim_traced_model(model, x)
    first = slim.params["blocks.0.conv1.kernel"].shape
    assert first[2:] == (int(open_units["block1.conv1_in"].sum()),
                         int(open_units["block1.conv2_in"].sum()))
    assert slim.params["fc.kernel"].shape[0] == int(open_units["fc_in"].sum())
    assert slim.params["blocks.0.shortcut.kernel"].shape[2] == 4  # the stem, whole
    counted = exact_counts(model.layers, open_units)
    assert slim.report.flops_after == pytest.approx(float(counted["flops"]))
    assert_slim_logits(slim, model, x)


# ----------------------------------------------------------------------------- construction


def test_registry_and_bad_arguments():
    assert MODELS["wrn28_10"] is wrn28_10
    assert MODELS["resnet164"] is resnet164
    assert MODELS["resnet50"] is resnet50
    assert MODELS["resnet34"] is resnet34
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(depth=21, rngs=nnx.Rngs(0))
    model = abstract(lambda **kw: build_zoo_model("resnet50", **kw), num_classes=7,
                     input_shape=(64, 64, 3))
    assert model.layers[-1].kernel_shape == (2048, 7)
    assert model.layers[0].out_positions == 32 * 32
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=27, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="9n \\+ 2"):
        PreActResNet(depth=164 + 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="one positive block count per stage"):
        ImageNetResNet(blocks_per_stage=(3, 4, 6), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block must be one of"):
        ImageNetResNet(block="preact", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="granularity"):
        NARROW["wrn_10_1"](rngs=nnx.Rngs(0), granularity="channel")
