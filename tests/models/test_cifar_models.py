import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.gates import HardConcreteGate
from sparsejax.models import MODELS, VGG16, CifarResNet
from sparsejax.models.base import each_slot
from sparsejax.models.vgg import VGG16_CONFIG
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure import count_layer, count_network
from sparsejax.structure.traced_model import build_zoo_model
from tests.gated import randomize_batch_norms

BATCH = (2, 32, 32, 3)


@each_slot
def hc_factory(slot, rngs):
    return HardConcreteGate(slot.shape, rngs=rngs, droprate_init=slot.droprate_init)


def n_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def batch_stats(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


def images(seed=0):
    return jax.random.normal(jax.random.key(seed), BATCH)


def resnet_formula(n, classes=10, side=32):
    """(kernel weights, BatchNorm params, MACs) of ResNet-(6n+2) with option-A shortcuts."""
    weights, bn, macs = 3 * 3 * 3 * 16, 2 * 16, 3 * 3 * 3 * 16 * side * side
    c_in = 16
    for stage, width in enumerate((16, 32, 64)):
        for b in range(n):
            if stage > 0 and b == 0:
                side //= 2
            block = 3 * 3 * c_in * width + 3 * 3 * width * width
            weights, bn, macs = weights + block, bn + 2 * 2 * width, macs + block * side * side
            c_in = width
    return weights + 64 * classes, bn, macs + 64 * classes


def vgg16_formula(classes=10, side=32):
    """(kernel weights, conv biases, BatchNorm params, MACs) of VGG-16-BN for CIFAR."""
    weights = biases = bn = macs = 0
    c_in = 3
    for item in VGG16_CONFIG:
        if item == "M":
            side //= 2
            continue
        weights += 9 * c_in * item
        macs += 9 * c_in * item * side * side
        biases, bn, c_in = biases + item, bn + 2 * item, item
    return weights + 512 * classes, biases, bn, macs + 512 * classes


NARROW_VGG16 = tuple(c if c == "M" else 8 for c in VGG16_CONFIG)
"""The VGG-16 layout with 8 channels everywhere: few distinct shapes, so little to compile."""


@pytest.fixture(scope="module")
def vgg16():
    """A dense VGG-16 on its trace, only read (counting, slots)."""
    return build_zoo_model("vgg16", rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- dense counts


@pytest.mark.parametrize("depth, total", [(20, 269_722), (56, 853_018), (110, 1_727_962)])
def test_resnet_dense_parameter_counts(depth, total):
    model = build_zoo_model(f"resnet{depth}", rngs=nnx.Rngs(0))
    weights, bn, _ = resnet_formula((depth - 2) // 6)
    assert weights + bn + 10 == total  # + the dense bias; option-A shortcuts have no parameters
    assert n_params(model) == total


def test_vgg16_dense_parameter_count(vgg16):
    weights, biases, bn, _ = vgg16_formula()
    assert weights + biases + bn + 10 == 14_728_266
    assert n_params(vgg16) == 14_728_266


@pytest.mark.parametrize("depth, macs", [(20, 40_551_040), (56, 125_485_696), (110, 252_887_680)])
def test_resnet_dense_accounting(depth, macs):
    model = build_zoo_model(f"resnet{depth}", rngs=nnx.Rngs(0))
    weights, _, formula_macs = resnet_formula((depth - 2) // 6)
    assert formula_macs == macs
    counts = count_network(model.layers, {})
    assert counts["flops"] == macs
    assert counts["weights"] == weights
    assert counts["params"] == weights + 10  # convolutions have no bias; BatchNorm not counted


def test_vgg16_dense_accounting(vgg16):
    weights, biases, _, macs = vgg16_formula()
    assert macs == 313_201_664
    counts = count_network(vgg16.layers, {})
    assert counts["flops"] == macs
    assert counts["weights"] == weights
    assert counts["params"] == weights + biases + 10


# ----------------------------------------------------------------------------- declarations


def resnet20(**kwargs):
    """ResNet-20 on its trace."""
    return build_zoo_model("resnet20", rngs=nnx.Rngs(0), **kwargs)


def test_resnet20_gate_slots():
    model = resnet20(gate_factory=hc_factory)
    expected = [("stem", (16,), 27)]
    expected += [(f"block{i}.conv1", (16,), 144) for i in (1, 2, 3)]
    expected += [("block4.conv1", (32,), 144)]  # the first block of a stage reads half as many
    expected += [(f"block{i}.conv1", (32,), 288) for i in (5, 6)]
    expected += [("block7.conv1", (64,), 288)]
    expected += [(f"block{i}.conv1", (64,), 576) for i in (8, 9)]
    assert [(s.name, s.shape, s.group_size) for s in model.gate_slots] == expected
    assert [s.layer for s in model.gate_slots] == ["stem", *(f"blocks.{i}.conv1" for i in range(9))]
    assert all(s.axis == 3 and not s.gates_bias for s in model.gate_slots)
    assert list(model.gates) == [name for name, _, _ in expected]
    assert len(resnet20().gates) == 0


def test_vgg16_gate_slots(vgg16):
    widths = [c for c in VGG16_CONFIG if c != "M"]
    inputs = [3, *widths[:-1]]
    assert [(s.name, s.shape, s.group_size) for s in vgg16.gate_slots] == [
        (f"conv{l + 1}", (w,), 9 * c + 1) for l, (c, w) in enumerate(zip(inputs, widths))
    ]
    assert all(s.axis == 3 and s.gates_bias for s in vgg16.gate_slots)


def test_resnet_layers_have_their_geometry_and_gated_units_from_the_trace():
    """The stem's gates reach block 1's conv1 only (from block 1 on the stream carries the
    BatchNorm's bias past a closed gate); a block's gates its conv1 and conv2."""
    model = resnet20()
    layers = {l.name: l for l in model.layers}
    assert [l.name for l in model.layers] == [
        "stem", *(f"blocks.{i}.conv{j}" for i in range(9) for j in (1, 2)), "fc"
    ]
    assert layers["stem"].outputs == (("stem", 1),) and layers["stem"].out_positions == 1024
    assert layers["blocks.0.conv1"].inputs == (("stem", 1),)
    assert layers["blocks.1.conv1"].inputs == ()
    assert layers["blocks.3.conv1"].out_positions == 256
    assert layers["blocks.6.conv2"].out_positions == 64
    assert layers["blocks.3.conv2"].inputs == (("block4.conv1", 1),)
    assert layers["blocks.3.conv2"].outputs == ()
    assert layers["fc"].inputs == () and layers["fc"].outputs == ()
    for layer in model.layers:
        module = model.layer_module(layer.name)
        assert module.kernel.shape == layer.kernel_shape
        assert (module.bias is not None) == layer.has_bias


def test_vgg16_layers_chain_the_conv_slots(vgg16):
    assert all(s.layer == s.name for s in vgg16.gate_slots)
    layers = vgg16.layers
    assert layers[0].inputs == () and layers[0].outputs == (("conv1", 1),)
    assert all(l.inputs == ((f"conv{i}", 1),) for i, l in enumerate(layers[1:13], start=1))
    assert layers[-1].name == "fc" and layers[-1].inputs == (("conv13", 1),)
    positions = [1024] * 2 + [256] * 2 + [64] * 3 + [16] * 3 + [4] * 3
    assert [l.out_positions for l in layers[:13]] == positions
    for layer in layers:
        assert vgg16.layer_module(layer.name).kernel.shape == layer.kernel_shape


# ----------------------------------------------------------------------------- forward / backward


def param_grads(model, x):
    def loss(m):
        return jnp.sum(m(x, train=True, rngs=nnx.Rngs(gates=1)) ** 2)

    return nnx.jit(nnx.grad(loss))(model)


def check_train_and_eval_forward(model):
    """Logits in both modes; train mode moves the BatchNorm statistics, eval mode does not."""
    x = images()
    before = batch_stats(model)
    out = model(x, train=True, rngs=nnx.Rngs(gates=0))
    assert out.shape == (2, 10) and bool(jnp.all(jnp.isfinite(out)))
    trained = batch_stats(model)
    norms = sum(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_graph(model))
    assert len(trained) == 2 * norms  # running mean and variance
    assert all(not np.array_equal(a, b) for a, b in zip(before, trained))
    out = model(x, train=False)
    assert out.shape == (2, 10) and bool(jnp.all(jnp.isfinite(out)))
    for a, b in zip(trained, batch_stats(model)):
        np.testing.assert_array_equal(a, b)


def check_gradients(model):
    """Finite gradients, nonzero for every declared kernel and every gate's parameters."""
    grads = param_grads(model, images())
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in leaves)
    kernels = [g for path, g in leaves if "kernel" in jax.tree_util.keystr(path)]
    assert len(kernels) == len(model.layers)
    assert all(float(jnp.abs(g).sum()) > 0 for g in kernels)
    for slot in model.gates:
        assert float(jnp.abs(grads["gates"][slot]["log_alpha"][...]).sum()) > 0


@pytest.mark.parametrize("gated", [False, True])
def test_resnet20_forward_backward_and_batchnorm_statistics(gated):
    model = resnet20(gate_factory=hc_factory if gated else None)
    assert len(model.gates) == (10 if gated else 0)
    check_train_and_eval_forward(model)
    check_gradients(model)


def test_vgg16_forward_and_batchnorm_statistics():
    check_train_and_eval_forward(build_zoo_model("vgg16", rngs=nnx.Rngs(0),
                                                 gate_factory=hc_factory))


def test_vgg16_backward_at_narrow_width():
    check_gradients(build_zoo_model("vgg16", rngs=nnx.Rngs(0), config=NARROW_VGG16,
                                    gate_factory=hc_factory))


# ----------------------------------------------------------------------------- gate semantics


def test_closed_stem_gates_make_the_output_independent_of_the_input():
    model = resnet20(gate_factory=hc_factory)
    model(images(), train=True, rngs=nnx.Rngs(gates=0))  # nontrivial running statistics
    closed = {"stem": jnp.zeros(16)}
    a = model(images(1), train=False, gates=closed)
    b = model(images(2), train=False, gates=closed)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(model(images(1), train=False), model(images(2), train=False))


def test_stem_gates_act_after_the_batchnorm():
    model = resnet20(gate_factory=hc_factory)
    model(images(), train=True, rngs=nnx.Rngs(gates=0))
    z = jax.random.uniform(jax.random.key(3), (16,))
    gated = model(images(1), train=False, gates={"stem": z})
    norm = model.net.stem_bn
    norm.scale[...] = norm.scale[...] * z
    norm.bias[...] = norm.bias[...] * z
    folded = model(images(1), train=False, gates={"stem": jnp.ones(16)})
    np.testing.assert_allclose(folded, gated, rtol=1e-5, atol=1e-5)


def test_closed_block1_conv1_cuts_both_convolutions_of_the_block():
    model = resnet20(gate_factory=hc_factory)
    model(images(), train=True, rngs=nnx.Rngs(gates=0))
    x = images(1)
    closed = {"block1.conv1": jnp.zeros(16)}
    out_closed, out_open = model(x, train=False, gates=closed), model(x, train=False)
    block = model.net.blocks[0]
    block.conv1.kernel[...] = 2.0 * block.conv1.kernel[...] + 1.0
    block.conv2.kernel[...] = -3.0 * block.conv2.kernel[...]
    out = model(x, train=False, gates=closed)
    np.testing.assert_allclose(out, out_closed, rtol=1e-5, atol=1e-5)
    assert not np.allclose(model(x, train=False), out_open, atol=1e-4)


def test_per_example_stem_gates_act_per_example():
    model = resnet20(gate_factory=hc_factory)
    z = {"stem": jnp.stack([jnp.ones(16), jnp.zeros(16)])}
    a = model(images(1), train=False, gates=z)
    b = model(images(2), train=False, gates=z)
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    assert not np.allclose(a[0], b[0])


def test_weight_granularity_gates_every_kernel():
    model = resnet20(gate_factory=hc_factory, granularity="weight")
    assert {n: tuple(g.shape) for n, g in model.gates.items()} == {
        l.name: l.kernel_shape for l in model.layers
    }
    assert all(l.inputs == () and l.outputs == () and l.kernel_slot == l.name for l in model.layers)
    closed = {name: jnp.zeros(g.shape) for name, g in model.gates.items()}
    out = model(images(), train=False, gates=closed)
    np.testing.assert_allclose(out, jnp.broadcast_to(model.net.fc.bias[...], out.shape), atol=1e-6)


# ----------------------------------------------------------------------------- pruned accounting


def half(n):
    return np.concatenate([np.ones(n // 2), np.zeros(n - n // 2)]).astype(np.float32)


def test_half_closed_conv1_slot_halves_its_block_in_the_counts():
    model = resnet20()
    layers = {l.name: l for l in model.layers}
    dense = count_network(model.layers, {})
    masks = {"block4.conv1": half(32)}  # stride-2 block: 16 -> 32 channels, 16x16 outputs
    assert float(count_layer(layers["blocks.3.conv1"], masks).weights) == 9 * 16 * 16
    assert float(count_layer(layers["blocks.3.conv1"], masks).macs) == 9 * 16 * 16 * 256
    assert float(count_layer(layers["blocks.3.conv2"], masks).weights) == 9 * 16 * 32
    assert float(count_layer(layers["blocks.3.conv2"], masks).macs) == 9 * 16 * 32 * 256
    counts = count_network(model.layers, masks)
    removed = 9 * 16 * 16 + 9 * 16 * 32
    assert float(counts["weights"]) == dense["weights"] - removed
    assert float(counts["flops"]) == dense["flops"] - removed * 256


def test_half_closed_stem_reaches_only_the_first_block():
    model = resnet20()
    dense = count_network(model.layers, {})
    counts = count_network(model.layers, {"stem": half(16)})
    removed_weights = 9 * 3 * 8 + 9 * 8 * 16
    assert float(counts["weights"]) == dense["weights"] - removed_weights
    assert float(counts["flops"]) == dense["flops"] - removed_weights * 1024


def test_vgg16_half_closed_conv_slots(vgg16):
    dense = count_network(vgg16.layers, {})
    counts = count_network(vgg16.layers, {"conv5": half(256)})
    # conv5 (128 -> 256) keeps 128 outputs and biases, conv6 (256 -> 256) 128 inputs, 8x8 maps
    removed = 9 * 128 * 128 + 9 * 128 * 256
    assert float(counts["weights"]) == dense["weights"] - removed
    assert float(counts["params"]) == dense["params"] - removed - 128
    assert float(counts["flops"]) == dense["flops"] - removed * 64
    counts = count_network(vgg16.layers, {"conv13": half(512)})
    removed = 9 * 512 * 256 + 256 * 10
    assert float(counts["weights"]) == dense["weights"] - removed
    assert float(counts["flops"]) == dense["flops"] - 9 * 512 * 256 * 4 - 256 * 10


def test_vgg16_slims_from_its_trace_to_its_open_channels():
    """Closed channel gates remove their filters, biases and BatchNorm entries and the next
    layer's rows; the slim network has the gated model's count and test-time logits."""
    model = build_zoo_model("vgg16", rngs=nnx.Rngs(0), config=NARROW_VGG16,
                            gate_factory=hc_factory)
    randomize_batch_norms(model, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    kept = {}
    for slot in model.gate_slots:
        keep = rng.random(slot.shape) < 0.6
        model.gates[slot.name].log_alpha[...] = jnp.where(keep, 5.0, -5.0)
        kept[slot.name] = int(keep.sum())
    x = np.asarray(images(3))
    slim = slim_traced_model(model, x)
    widths = [3, *kept.values()]
    assert {name: tuple(slim.params[f"{name}.kernel"].shape) for name in kept} == {
        name: (3, 3, c_in, c_out) for name, c_in, c_out in zip(kept, widths, widths[1:])
    }
    assert tuple(slim.params["fc.kernel"].shape) == (widths[-1], 10)
    masks = {name: (np.arange(8) < width).astype(np.float32) for name, width in kept.items()}
    assert slim.report.flops_after == float(count_network(model.layers, masks)["flops"])
    gated = model(jnp.asarray(x), train=False)
    np.testing.assert_allclose(np.asarray(slim(x)), np.asarray(gated), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- construction


def test_registry_and_bad_arguments():
    assert {"resnet20", "resnet56", "resnet110", "vgg16"} <= set(MODELS)
    model = resnet20()
    assert isinstance(model.net, CifarResNet) and model.net.depth == 20
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(depth=21, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="at least 32 pixels"):
        VGG16(rngs=nnx.Rngs(0), input_shape=(28, 28, 1))
