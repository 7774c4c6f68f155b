"""GReg's two networks (Wang, Qin, Zhang & Fu, ICLR 2021): VGG-19 on CIFAR-100 and ResNet-34 on
ImageNet. Their sizes against the published counts, GReg's layer rules and FLOPs counter on them,
and the slimming of a GReg-pruned network.

Sources of the numbers: VGG-19 is the GReg code's ``model/vgg.py`` (EigenDamage's, bias-free
convolutions, global average pooling, one dense layer); its counter (``utils.get_n_flops_``, run
on the reference, spec reg_family.md section 1.7) gives 20.07M kernel weights, and with
``--stage_pr [1-15:0.7]`` widths [64, 19, 38, 38, 76 x 4, 153 x 8], 1.81M weights and 8.89x (the
paper's label: 8.84x). ResNet-34 is torchvision's: 21,797,672 parameters and 3.66G
multiply-accumulates (torchvision's model table; GReg's Table 3 "FLOPs 3.66G"), pruned 1.32x by
``--stage_pr [0,0.5,0.6,0.4,0,0] --skip_layers 1.0,2.0,2.3,3.0,3.5`` (GReg README).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.gates import HardConcreteGate
from sparsejax.methods import RunInfo, create_method
from sparsejax.methods.greg.accounting import (
    greg_count,
    greg_kept_inputs,
    greg_pruned_count,
)
from sparsejax.methods.greg.rules import layer_ratios
from sparsejax.models import MODELS, ImageNetResNet, each_slot
from sparsejax.models.vgg import VGG19_CONFIG
from sparsejax.slim import slim_model
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure import count_network
from sparsejax.structure.traced_model import build_zoo_model
from tests.slim.test_surgery import randomize_batch_norms

CIFAR100 = 100
VGG19_STAGE_PR = "[1-15:0.7]"
RESNET34_STAGE_PR = (0.0, 0.5, 0.6, 0.4, 0.0, 0.0)
RESNET34_SKIPS = ("block1", "block4", "block7", "block8", "block13")
"""The reference's ``--skip_layers 1.0,2.0,2.3,3.0,3.5`` (stage.block, both from layer1.0):
layer1.0, layer2.0, layer2.3, layer3.0 and layer3.5 in our block numbering."""


def abstract(name, **kwargs):
    return nnx.eval_shape(lambda: build_zoo_model(name, rngs=nnx.Rngs(0), **kwargs))


def n_params(model):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@each_slot
def hc_factory(slot, rngs):
    return HardConcreteGate(slot.shape, rngs=rngs, droprate_init=slot.droprate_init)


def vgg19_formula(classes, side=32):
    """(kernel weights, BatchNorm params, MACs) of GReg's VGG-19: bias-free 3x3 convolutions,
    global average pooling, dense 512 -> classes (with bias)."""
    weights = bn = macs = 0
    c_in = 3
    for item in VGG19_CONFIG:
        if item == "M":
            side //= 2
            continue
        weights += 9 * c_in * item
        macs += 9 * c_in * item * side * side
        bn, c_in = bn + 2 * item, item
    return weights + 512 * classes, bn, macs + 512 * classes


def greg_widths(layers, ratios):
    """Kept output units of the layers GReg prunes at ``ratios``."""
    by_name = {layer.name: layer for layer in layers}
    return {
        name: by_name[name].out_units - greg_pruned_count(ratio, by_name[name].out_units)
        for name, ratio in ratios.items()
    }


def greg_pruned(layers, ratios):
    """(dense, pruned) GReg counts of the network pruned at ``ratios``."""
    kept_out = greg_widths(layers, ratios)
    return greg_count(layers), greg_count(layers, kept_out, greg_kept_inputs(layers, kept_out))


# ----------------------------------------------------------------------------- VGG-19


@pytest.fixture(scope="module")
def vgg19():
    return abstract("vgg19", num_classes=CIFAR100)


def test_vgg19_dense_counts_are_the_published_ones(vgg19):
    weights, bn, macs = vgg19_formula(CIFAR100)
    assert weights + bn + CIFAR100 == n_params(vgg19) == 20_081_188
    counts = count_network(vgg19.layers, {})
    assert float(counts["weights"]) == weights == 20_070_080
    assert float(counts["params"]) == weights + CIFAR100  # no conv biases
    assert float(counts["flops"]) == macs == 398_182_400
    greg = greg_count(vgg19.layers)
    assert round(greg.weights / 1e6, 2) == 20.07 and greg.flops == 2 * macs


def test_vgg19_layers_and_gate_slots(vgg19):
    widths = [c for c in VGG19_CONFIG if c != "M"]
    inputs = [3, *widths[:-1]]
    assert [(s.name, s.shape, s.group_size) for s in vgg19.gate_slots] == [
        (f"conv{l + 1}", (w,), 9 * c) for l, (c, w) in enumerate(zip(inputs, widths))
    ]
    assert all(s.axis == 3 and not s.gates_bias for s in vgg19.gate_slots)
    layers = vgg19.layers
    assert len(layers) == 17 and not any(l.has_bias for l in layers[:16])
    positions = [1024] * 2 + [256] * 2 + [64] * 4 + [16] * 4 + [4] * 4
    assert [l.out_positions for l in layers[:16]] == positions
    fc = layers[-1]  # reads the average of the 2x2 map (flattened, it would read 4 * 512)
    assert fc.kernel_shape == (512, CIFAR100) and fc.inputs == (("conv16", 1),)


def test_vgg19_forward_and_gradients():
    model = build_zoo_model("vgg19", rngs=nnx.Rngs(0), num_classes=CIFAR100,
                            gate_factory=hc_factory)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    assert model(x, train=True, rngs=nnx.Rngs(gates=0)).shape == (2, CIFAR100)
    assert model(x, train=False).shape == (2, CIFAR100)
    narrow = build_zoo_model("vgg19", rngs=nnx.Rngs(0), gate_factory=hc_factory,
                             config=tuple(c if c == "M" else 4 for c in VGG19_CONFIG))

    def loss(m):
        return jnp.sum(m(x, train=True, rngs=nnx.Rngs(gates=1)) ** 2)

    grads = nnx.grad(loss)(narrow)
    assert all(float(jnp.abs(grads["gates"][s]["log_alpha"][...]).sum()) > 0
               for s in narrow.gates)


def greg_on_vgg19(stage_pr, granularity="filter"):
    config = get_config("greg1")
    config.update(model="vgg19", stage_pr=stage_pr, pretrain_epochs=0,
                  greg_granularity=granularity)
    return create_method("greg1", config, RunInfo(num_train=100))


def test_greg_vgg19_stage_pr_is_the_8_89x_network(vgg19):
    """GReg's ratios, widths and counter on VGG-19 traced as a plain module, through the
    method: the pruned layers, their masks and its report."""
    method = greg_on_vgg19(VGG19_STAGE_PR)
    pruned = method.pruned_layers(vgg19)
    assert {p.name: p.ratio for p in pruned} == {f"conv{l}": 0.7 for l in range(2, 17)}
    kept = [p.group_shape[0] - p.count for p in pruned]  # first conv and fc kept whole
    assert kept == [19, 38, 38, 76, 76, 76, 76] + [153] * 8
    state = method.init(vgg19)
    for layer, layer_state in zip(pruned, state["layers"]):
        layer_state["mask"] = (jnp.arange(layer.group_shape[0]) >= layer.count).astype(
            jnp.float32)
    size = method.report(vgg19, state)
    assert size["greg/dense_weights"] == greg_count(vgg19.layers).weights
    assert round(size["greg/weights"] / 1e6, 2) == 1.81
    assert round(size["greg/speedup"], 2) == 8.89
    assert list(size["greg/widths"].values()) == kept


def test_greg_weight_granularity_prunes_the_kernels_of_the_layer_indices(vgg19):
    method = greg_on_vgg19(VGG19_STAGE_PR, "weight")
    kernels = {layer.name: layer.kernel_shape for layer in vgg19.layers}
    assert {p.name: (p.ratio, p.count, p.group_shape) for p in method.pruned_layers(vgg19)} == {
        f"conv{l}": (0.7, greg_pruned_count(0.7, math.prod(kernels[f"conv{l}"])),
                     kernels[f"conv{l}"])
        for l in range(2, 17)
    }


def test_greg_pruned_vgg19_slims_from_its_trace_to_the_same_logits():
    """Masking the filters GReg's rules choose (as its pruning does: every member of the unit,
    BatchNorm entries included) and slimming from the trace gives the GReg-counted widths and
    the same eval logits."""
    model = build_zoo_model("vgg19", rngs=nnx.Rngs(0), use_placements=False,
                            config=(8, 8, "M", 8, "M", 16, "M", 16, "M", 16))
    rng = np.random.default_rng(0)
    randomize_batch_norms(model, rng)
    method = greg_on_vgg19("[1-4:0.5]")
    slots = {slot.name: slot for slot in model.gate_slots}
    kept = {}
    for layer in method.pruned_layers(model):
        width = layer.group_shape[0]
        mask = np.ones(width, np.float32)
        mask[rng.choice(width, layer.count, replace=False)] = 0.0
        model.scale_units(slots[layer.name], jnp.asarray(mask))
        kept[layer.name] = width - layer.count
    assert kept == {"conv2": 4, "conv3": 4, "conv4": 8, "conv5": 8}
    images = np.asarray(jax.random.normal(jax.random.key(7), (4, 32, 32, 3)))
    slim = slim_traced_model(model, images)
    assert {name: slim.params[f"{name}.kernel"].shape[-1] for name in kept} == kept
    assert slim.report.max_logit_difference < 1e-4
    assert slim.report.flops_after < slim.report.flops_before


# ----------------------------------------------------------------------------- ResNet-34


@pytest.fixture(scope="module")
def resnet34():
    return abstract("resnet34")


def test_resnet34_is_registered_with_torchvisions_counts(resnet34):
    assert "resnet34" in MODELS
    assert n_params(resnet34) == 21_797_672
    macs = count_network(resnet34.layers, {})["flops"]
    assert round(float(macs) / 1e9, 2) == 3.66
    assert round(greg_count(resnet34.layers, count_adds=False).flops / 1e9, 2) == 3.66


def test_greg_resnet34_prunes_conv1_of_each_basic_block_by_stage(resnet34):
    ratios = layer_ratios(resnet34.layers, RESNET34_STAGE_PR, "filter")
    stage_of_block = [0] * 3 + [1] * 4 + [2] * 6 + [3] * 3  # the 3-4-6-3 stages, not 4-4-4-4
    expected = {
        f"block{i}.conv1": RESNET34_STAGE_PR[1 + stage]
        for i, stage in enumerate(stage_of_block, start=1)
        if RESNET34_STAGE_PR[1 + stage]
    }
    assert ratios == expected
    assert not any(name.endswith((".conv2", ".shortcut")) or name in ("stem", "fc")
                   for name in ratios)


def test_greg_resnet34_with_the_reference_skips_is_the_1_32x_network(resnet34):
    ratios = layer_ratios(resnet34.layers, RESNET34_STAGE_PR, "filter")
    skipped = {n: r for n, r in ratios.items() if n.split(".")[0] not in RESNET34_SKIPS}
    dense, pruned = greg_pruned(resnet34.layers, skipped)
    assert round(dense.flops / pruned.flops, 2) == 1.32
    kept = greg_widths(resnet34.layers, skipped)
    assert kept["block2.conv1"] == 32 and kept["block5.conv1"] == 51
    assert greg_kept_inputs(resnet34.layers, kept)["block5.conv2"] == 51
    dense, pruned = greg_pruned(resnet34.layers, ratios)  # without skips (not supported)
    assert round(dense.flops / pruned.flops, 2) == 1.62


def test_greg_resnet34_weight_granularity_prunes_shortcuts_at_their_stage(resnet34):
    ratios = layer_ratios(resnet34.layers, (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), "weight")
    assert "stem" not in ratios and ratios["fc"] == 0.5
    assert [ratios[f"block{i}.shortcut"] for i in (4, 8, 14)] == [0.2, 0.3, 0.4]
    assert ratios["block3.conv2"] == 0.1 and ratios["block16.conv2"] == 0.4


# ----------------------------------------------------------------------------- slimming


def zero_filters(model, layer_name, channels):
    """GReg filter pruning: the kernel slice and the following BatchNorm's scale and bias."""
    layer = next(layer for layer in model.layers if layer.name == layer_name)
    module = model.layer_module(layer_name)
    index = np.asarray(channels)
    module.kernel[...] = module.kernel[...].at[..., index].set(0.0)
    norm = model.module_at(layer.norm)
    norm.scale[...] = norm.scale[...].at[index].set(0.0)
    norm.bias[...] = norm.bias[...].at[index].set(0.0)


def test_greg_pruned_resnet34_slims_to_the_same_logits():
    """Zeroing the filters GReg's rules choose and slimming gives the GReg-counted widths and the
    same eval logits."""
    model = ImageNetResNet(rngs=nnx.Rngs(0), blocks_per_stage=(3, 4, 6, 3), widths=(8, 8, 16, 16),
                           block="basic", num_classes=10, input_shape=(32, 32, 3))
    stage_pr, shape = RESNET34_STAGE_PR, (32, 32, 3)
    rng = np.random.default_rng(0)
    randomize_batch_norms(model, rng)
    ratios = layer_ratios(model.layers, stage_pr, "filter")
    kept = greg_widths(model.layers, ratios)
    for name, width in kept.items():
        out_units = next(l.out_units for l in model.layers if l.name == name)
        zero_filters(model, name, rng.choice(out_units, out_units - width, replace=False))
    result = slim_model(model)
    x = jax.random.normal(jax.random.key(7), (2, *shape))
    expected = model(x, train=False)
    np.testing.assert_allclose(result.model(x, train=False), expected,
                               atol=1e-4 * max(float(jnp.max(jnp.abs(expected))), 1.0))
    slim_layers = {l.name: l for l in result.model.layers}
    assert {name: slim_layers[name].out_units for name in kept} == kept
    slim_kept_in = {name: slim_layers[name].in_units
                    for name in greg_kept_inputs(model.layers, kept)}
    assert slim_kept_in == greg_kept_inputs(model.layers, kept)
    assert result.report.flops_after < result.report.flops_before
