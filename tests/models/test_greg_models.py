"""GReg's networks (Wang, Qin, Zhang & Fu, ICLR 2021): VGG-19 on CIFAR-100, ResNet-56 on
CIFAR-10 and ResNet-34 on ImageNet. Their sizes against the published counts, GReg's layer
rules and FLOPs counter on them, and the slimming of a GReg-pruned network.

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
from sparsejax.errors import ConfigError
from sparsejax.gates import HardConcreteGate
from sparsejax.methods import RunInfo, create_method
from sparsejax.methods.greg.accounting import (
    greg_count,
    greg_pruned_count,
)
from sparsejax.models import MODELS, ImageNetResNet, each_slot
from sparsejax.models.vgg import VGG19_CONFIG
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure import count_network
from sparsejax.structure.traced_model import build_zoo_model, gate_zoo_network
from tests.gated import randomize_batch_norms

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


def greg_on(model, stage_pr, granularity="filter"):
    config = get_config("greg1")
    config.update(model=model, stage_pr=stage_pr, pretrain_epochs=0, greg_granularity=granularity)
    return create_method("greg1", config, RunInfo(num_train=100))


def test_greg_vgg19_stage_pr_is_the_8_89x_network(vgg19):
    """GReg's ratios, widths and counter on VGG-19 traced as a plain module, through the
    method: the pruned layers, their masks and its report."""
    method = greg_on("vgg19", VGG19_STAGE_PR)
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
    method = greg_on("vgg19", VGG19_STAGE_PR, "weight")
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
    method = greg_on("vgg19", "[1-4:0.5]")
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
    """ResNet-34 traced as the engine traces it for GReg: every prunable group a slot."""
    return abstract("resnet34", use_placements=False)


def test_resnet34_is_registered_with_torchvisions_counts(resnet34):
    assert "resnet34" in MODELS
    assert n_params(resnet34) == 21_797_672
    macs = count_network(resnet34.layers, {})["flops"]
    assert round(float(macs) / 1e9, 2) == 3.66
    assert round(greg_count(resnet34.layers, count_adds=False).flops / 1e9, 2) == 3.66


def test_greg_resnet34_prunes_conv1_of_each_basic_block_by_stage(resnet34):
    stage_of_block = [0] * 3 + [1] * 4 + [2] * 6 + [3] * 3  # the 3-4-6-3 stages, not 4-4-4-4
    pruned = greg_on("resnet34", RESNET34_STAGE_PR).pruned_layers(resnet34)
    assert {p.name: p.ratio for p in pruned} == {
        f"blocks.{i}.conv1": RESNET34_STAGE_PR[1 + stage]
        for i, stage in enumerate(stage_of_block) if RESNET34_STAGE_PR[1 + stage]
    }


def test_greg_resnet50_prunes_both_inner_convolutions_of_a_bottleneck_by_its_stage():
    """The stage list over the traced ResNet-50: a bottleneck's conv1 and conv2 (its stride on
    conv2, so a stage's first conv1 still works at the previous stage's resolution) take their
    block's stage; conv3, the shortcuts, the stem and fc are not pruned by filters."""
    model = abstract("resnet50", use_placements=False)
    stage_pr = (0.0, 0.1, 0.2, 0.3, 0.4, 0.0)
    stage_of_block = [0] * 3 + [1] * 4 + [2] * 6 + [3] * 3
    pruned = greg_on("resnet50", stage_pr).pruned_layers(model)
    assert {p.name: p.ratio for p in pruned} == {
        f"blocks.{i}.conv{j}": stage_pr[1 + stage]
        for i, stage in enumerate(stage_of_block) for j in (1, 2)
    }


def greg_speedup(model, method, skipped_blocks=()):
    """GReg's FLOPs speedup (its counter, through the method's report) of ``model`` with the
    filters its rules choose masked, except in the blocks ``skipped_blocks``; and the kept
    widths."""
    state = method.init(model)
    for layer, layer_state in zip(method.pruned_layers(model), state["layers"]):
        skipped = f"block{int(layer.name.split('.')[1]) + 1}" in skipped_blocks
        count = 0 if skipped else layer.count
        layer_state["mask"] = (jnp.arange(layer.group_shape[0]) >= count).astype(jnp.float32)
    report = method.report(model, state)
    return report["greg/speedup"], report["greg/widths"]


def test_greg_resnet34_with_the_reference_skips_is_the_1_32x_network(resnet34):
    method = greg_on("resnet34", RESNET34_STAGE_PR)
    speedup, widths = greg_speedup(resnet34, method, RESNET34_SKIPS)
    assert round(speedup, 2) == 1.32
    assert widths["blocks.1.conv1"] == 32 and widths["blocks.4.conv1"] == 51
    assert widths["blocks.3.conv1"] == 128  # block 4 (layer2.0) skipped
    speedup, _ = greg_speedup(resnet34, method)  # without skips (not supported)
    assert round(speedup, 2) == 1.62


def test_greg_resnet34_weight_granularity_prunes_shortcuts_at_their_stage(resnet34):
    method = greg_on("resnet34", (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), "weight")
    ratios = {p.name: p.ratio for p in method.pruned_layers(resnet34)}
    assert "stem" not in ratios and ratios["fc"] == 0.5
    assert [ratios[f"blocks.{i}.shortcut"] for i in (3, 7, 13)] == [0.2, 0.3, 0.4]
    assert ratios["blocks.2.conv2"] == 0.1 and ratios["blocks.15.conv2"] == 0.4


# ----------------------------------------------------------------------------- ResNet-56


RESNET56_STAGE_PR = (0.0, 0.75, 0.75, 0.32, 0.0)
"""GReg's ResNet-56 setting on CIFAR-10, the paper's 2.55x network."""


@pytest.fixture(scope="module")
def resnet56():
    """ResNet-56 traced as the engine traces it for GReg: every prunable group a slot."""
    return abstract("resnet56", use_placements=False)


def test_greg_resnet56_prunes_conv1_of_each_block_by_stage(resnet56):
    """Filters: each block's conv1 at its stage's ratio (one ratio: the same layers), never the
    stem, a stream or fc; weights: every kernel, the stem at the first ratio and fc at the
    last."""
    ratios = {p.name: p.ratio
              for p in greg_on("resnet56", RESNET56_STAGE_PR).pruned_layers(resnet56)}
    assert ratios == {f"blocks.{i}.conv1": RESNET56_STAGE_PR[1 + i // 9] for i in range(27)}
    assert [p.name for p in greg_on("resnet56", 0.5).pruned_layers(resnet56)] == list(ratios)
    method = greg_on("resnet56", (0.1, 0.2, 0.3, 0.4, 0.5), "weight")
    weight = {p.name: p.ratio for p in method.pruned_layers(resnet56)}
    assert len(weight) == 56 and weight["stem"] == 0.1 and weight["fc"] == 0.5
    assert weight["blocks.9.conv2"] == 0.3
    with pytest.raises(ConfigError, match="the stem and fc ratios must be 0"):
        greg_on("resnet56", (0.5, 0.75, 0.75, 0.32, 0.0)).pruned_layers(resnet56)


def test_greg_resnet56_at_the_paper_ratios_is_the_2_55x_network(resnet56):
    """The reference's counter (``utils.get_n_flops_``) on its ResNet-56 pruned by
    ``[0,0.75,0.75,0.32,0]``: 0.2510G -> 0.0982G FLOPs and 0.849M -> 0.485M weights (conv and
    linear kernels; the model's 853,018 parameters also hold biases and BatchNorm), 2.55x."""
    method = greg_on("resnet56", RESNET56_STAGE_PR)
    state = method.init(resnet56)
    for layer, layer_state in zip(method.pruned_layers(resnet56), state["layers"]):
        layer_state["mask"] = (jnp.arange(layer.group_shape[0]) >= layer.count).astype(
            jnp.float32)
    report = method.report(resnet56, state)
    assert [report["greg/widths"][f"blocks.{i}.conv1"] for i in (0, 8, 9, 17, 18, 26)] == [
        4, 4, 8, 8, 43, 43]
    assert round(report["greg/dense_flops"] / 1e9, 4) == 0.2510
    assert round(report["greg/flops"] / 1e9, 4) == 0.0982
    assert round(report["greg/dense_weights"] / 1e6, 3) == 0.849
    assert round(report["greg/weights"] / 1e6, 3) == 0.485
    assert round(report["greg/speedup"], 2) == 2.55


# ----------------------------------------------------------------------------- slimming


def test_greg_pruned_resnet34_slims_from_its_trace_to_the_same_logits():
    """Masking the filters GReg's rules choose on a narrow ResNet-34 (every member of the unit,
    BatchNorm entries included, as its pruning does) and slimming from the trace gives the
    GReg-counted widths and the same eval logits."""
    net = ImageNetResNet(rngs=nnx.Rngs(0), blocks_per_stage=(3, 4, 6, 3), widths=(8, 8, 16, 16),
                         block="basic", num_classes=10, input_shape=(32, 32, 3))
    model = gate_zoo_network(net, "resnet34", rngs=nnx.Rngs(1), use_placements=False)
    rng = np.random.default_rng(0)
    randomize_batch_norms(model, rng)
    slots = {slot.name: slot for slot in model.gate_slots}
    kept = {}
    for layer in greg_on("resnet34", RESNET34_STAGE_PR).pruned_layers(model):
        width = layer.group_shape[0]
        mask = np.ones(width, np.float32)
        mask[rng.choice(width, layer.count, replace=False)] = 0.0
        model.scale_units(slots[layer.name], jnp.asarray(mask))
        kept[layer.name] = width - layer.count
    assert sorted(set(kept.values())) == [3, 4, 9]  # of 8 at 0.6 and 0.5, of 16 at 0.4
    images = np.asarray(jax.random.normal(jax.random.key(7), (4, 32, 32, 3)))
    slim = slim_traced_model(model, images)
    assert {name: slim.params[f"{name}.kernel"].shape[-1] for name in kept} == kept
    assert slim.report.max_logit_difference < 1e-4
    assert slim.report.flops_after < slim.report.flops_before
