"""Gate placements: the papers' gates put on models traced as plain modules (where the zoo's
models say their papers put them, and test models of the kinds users write)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.errors import ConfigError
from sparsejax.methods import create_method
from sparsejax.methods.base import RunInfo
from sparsejax.methods.greg.accounting import greg_pruned_count
from sparsejax.methods.greg.rules import layer_ratios, traced_slot_ratios
from sparsejax.methods.l0_hc import L0HardConcrete
from sparsejax.models.registry import build_model
from sparsejax.models.transformer import HIDDEN
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure.accounting import count_network
from sparsejax.structure.blocks import traced_layer_stages, traced_stages
from sparsejax.structure.slim_trace import load_slim_function
from sparsejax.structure.traced_model import GatePlacement, TracedModel, build_zoo_model
from tests.gated import scale_gates
from tests.structure.test_trace import FusedAttention, GroupedQueryAttention

MNIST = (28, 28, 1)
CIFAR = (32, 32, 3)
BRANCHES = {"attn": ("q", "k", "v"), "mlp": ("gate", "up")}
"""The layers that feed a transformer sublayer's output projection, by sublayer family (the
ViT's MLP has no ``gate``: a model's branch is those it has)."""


def plain_vit() -> nnx.Module:
    """The zoo's ViT at 2 blocks, a plain module, on Fashion-MNIST images."""
    return build_model("vit_tiny", rngs=nnx.Rngs(params=0), num_classes=10, input_shape=MNIST,
                       depth=2)


def resnet20_groups() -> TracedModel:
    """ResNet-20 on its trace with one slot per removable group, as GReg and gmp take it."""
    return build_zoo_model("resnet20", rngs=nnx.Rngs(params=0), use_placements=False)


RESNET20_WIDTHS = (16, 32, 64)
"""The width of each stage of ResNet-20, whose blocks 3s .. 3s + 2 make stage s."""


@pytest.mark.parametrize("stage_pr, ratios", [
    ((0, 0.5, 0.6, 0.7, 0), (0.5, 0.6, 0.7)), ("[0, 0.3, 0.3, 0.3, 0]", (0.3,) * 3),
    (0.4, (0.4,) * 3),
])
def test_greg_layer_rules_prune_the_first_convolution_of_each_block_of_a_traced_resnet(
    stage_pr, ratios
):
    """The stage list ``[stem, stage 1, ..., stage k, fc]`` (or one ratio for all) applies to
    the convolutions inside the blocks of a residual network, never the stem or a stream: on
    ResNet-20, each block's conv1 at its stage's ratio."""
    model = resnet20_groups()
    traced = traced_slot_ratios(model.gate_slots, stage_pr, [l.name for l in model.layers],
                                traced_stages(model))
    slots = {slot.name: slot for slot in model.gate_slots}
    assert {slots[n].layer: (r, slots[n].shape[0]) for n, r in traced.items()} == {
        f"blocks.{i}.conv1": (ratios[i // 3], RESNET20_WIDTHS[i // 3]) for i in range(9)
    }


@pytest.mark.parametrize("stage_pr", [
    0.5, (0.1, 0.2, 0.3, 0.4, 0.5), "[0, 0.3, 0.4, 0.5, 0.2]",
])
def test_greg_weight_rules_prune_every_kernel_of_a_traced_resnet_at_its_stage(stage_pr):
    """With ``greg_granularity="weight"`` GReg prunes, on a residual network, each kernel of a
    block at the block's stage ratio, the stem at the first entry of the stage list, fc at the
    last (a kernel at ratio 0 is not pruned); one ratio prunes every kernel at it."""
    model = resnet20_groups()
    config = get_config("greg1")
    config.model, config.greg_granularity, config.stage_pr = "resnet20", "weight", stage_pr
    config.pretrain_epochs = 0
    method = create_method("greg1", config, RunInfo(num_train=100))
    ratios = [stage_pr] * 5 if isinstance(stage_pr, float) else list(
        json.loads(stage_pr) if isinstance(stage_pr, str) else stage_pr)
    expected = {}
    for layer in model.layers:
        block = layer.name.split(".")[1] if layer.name.startswith("blocks.") else None
        ratio = {"stem": ratios[0], "fc": ratios[-1]}.get(layer.name) if block is None \
            else ratios[1 + int(block) // 3]
        if ratio:  # a layer at ratio 0 is not pruned
            expected[layer.name] = (
                ratio, greg_pruned_count(ratio, math.prod(layer.kernel_shape)), layer.kernel_shape)
    assert {p.name: (p.ratio, p.count, p.group_shape)
            for p in method.pruned_layers(model)} == expected


def test_a_stage_list_of_the_wrong_length_for_a_traced_residual_network_says_why():
    stages = traced_layer_stages(model := resnet20_groups())
    with pytest.raises(ConfigError, match=r"whose blocks have 3 stages \(by output resolution"):
        layer_ratios(model.layers, [0.1, 0.2, 0.3, 0.4], stages)


def test_gmp_by_units_prunes_every_group_of_a_traced_resnet_outside_its_streams():
    """``gmp_structure="unit"`` prunes every layer's output units but the classifier's and the
    members of residual streams, each with all its units: ResNet-20's conv1 channels."""
    model = resnet20_groups()
    config = get_config("gmp")
    config.model, config.gmp_structure = "resnet20", "unit"
    method = create_method("gmp", config, RunInfo(num_train=100))
    slots = {slot.name: slot for slot in model.gate_slots}
    assert {slots[n].layer: slots[n].shape[0] for n in method.pruned_layers(model)} == {
        f"blocks.{i}.conv1": RESNET20_WIDTHS[i // 3] for i in range(9)
    }


def test_a_stage_list_that_does_not_fit_a_traced_residual_network_says_why():
    assert traced_stages(build_zoo_model("lenet5", rngs=nnx.Rngs(params=0))) is None
    model = resnet20_groups()
    layers, stages = [layer.name for layer in model.layers], traced_stages(model)
    with pytest.raises(ConfigError, match=r"whose blocks have 3 stages \(by output resolution"):
        traced_slot_ratios(model.gate_slots, (0, 0.5, 0.5, 0), layers, stages)
    with pytest.raises(ConfigError, match="the stem and fc ratios must be 0"):
        traced_slot_ratios(model.gate_slots, (0.1, 0.5, 0.5, 0.5, 0), layers, stages)


@pytest.mark.parametrize("closed, counted, widths", [
    ({"blocks.0.heads": [0, 1, 1, 0], "blocks.1.heads": [1, 0, 1, 1]},
     {"blocks.1.heads": [1, 1, 1, 1]}, [32, 32, 64, 32]),
    ({"blocks.0.heads": [1, 1, 0, 1], "blocks.1.heads": [0, 1, 0, 0]},
     {"blocks.0.heads": [1, 1, 1, 1], "blocks.1.kv_groups": [0, 1]}, [64, 32, 16, 16]),
    ({"blocks.1.heads": [0, 0, 0, 0]}, {"blocks.1.kv_groups": [0, 0]}, [64, 32, None, None]),
])
def test_the_lm_slims_query_heads_closed_unevenly_across_its_key_value_groups(
    closed, counted, widths
):
    """``lm_tiny`` at 2 blocks (4 query heads h = m G + g in 2 key/value groups): every group
    keeps as many query heads as the fullest one. First: in block 0 each group keeps one live
    head (group 0's second one), so one per group goes; in block 1 one head closes and stays
    as a filler (its output rows zero). Second: block 0 keeps a filler; block 1 keeps one head,
    of group 1, so group 0 goes whole, its keys and values too. Third: block 1 keeps no head,
    and its attention is not stored. Query and key widths per block (None: not stored), the
    counts with the fillers kept and the empty groups closed (``counted``), and the gated
    logits."""
    model = build_zoo_model("lm_tiny", rngs=nnx.Rngs(params=0), num_classes=10,
                            input_shape=(16,), dim=64, depth=2, head_dim=16, ffn_hidden=96,
                            gate_factory=scale_gates)
    values = {slot.name: np.ones(slot.shape, np.float32) for slot in model.gate_slots}
    values[HIDDEN][::5] = 0.0
    values |= {name: np.asarray(z, np.float32) for name, z in closed.items()}
    for name, gate in model.gates.items():
        gate.value[...] = jnp.asarray(values[name])
    x = np.asarray(jax.random.randint(jax.random.key(0), (4, 16), 0, 10))
    slim = slim_traced_model(model, x)
    stored = {path: value.shape for path, value in slim.params.items()}
    assert [stored.get(f"blocks.{i}.attn.{name}.kernel", (None, None))[1]
            for i in (0, 1) for name in "qk"] == widths
    counted = values | {name: np.asarray(z, np.float32) for name, z in counted.items()}
    kept = count_network(model.layers, counted, model.activation_products)
    assert slim.report.params_after == pytest.approx(float(kept["params"]))
    assert slim.report.flops_after == pytest.approx(float(kept["flops"]))
    assert slim.report.max_logit_difference < 1e-5


def test_a_closed_placed_input_selection_removes_its_rows_from_the_count():
    """LeNet-5's 800 fc1 gates sit on the flattened conv2 map: closing the 16 inputs of one
    conv2 channel there keeps the channel (conv1 -> conv2 unchanged) and removes 16 rows."""
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(params=0))
    open_ = {s.name: np.ones(s.shape, np.float32) for s in model.gate_slots}
    fc1 = open_["fc1"].copy()
    fc1[np.arange(16) * 50 + 7] = 0  # channel 7 at each of the 16 positions (channel fastest)
    dense = float(count_network(model.layers, open_)["params"])
    assert float(count_network(model.layers, open_ | {"fc1": fc1})["params"]) == dense - 16 * 500


def test_placements_that_cannot_hold_say_what_is_wrong():
    net = build_model("resnet20", rngs=nnx.Rngs(params=0))

    def build(*placed_gates, granularity="unit"):
        return TracedModel(net, rngs=nnx.Rngs(params=0), input_shape=CIFAR,
                           num_classes=10, placements=placed_gates, granularity=granularity)

    with pytest.raises(ConfigError, match=r"'stem': the outputs of layer 'stem' are not a "
                       r"removable unit group \(padding along a unit dimension \(pad at "
                       r".+\)\); place the gates on the inputs"):
        build(GatePlacement("stem", "stem", "output"))
    with pytest.raises(ConfigError, match=r"no layer 'nowhere'; its layers are stem, "):
        build(GatePlacement("a", "nowhere", "output"))
    with pytest.raises(ConfigError, match="side must be 'input' or 'output', got 'outputs'"):
        build(GatePlacement("a", "stem", "outputs"))
    with pytest.raises(ConfigError, match="slot name a placed twice"):
        build(GatePlacement("a", "blocks.0.conv1", "output"),
              GatePlacement("a", "blocks.1.conv1", "output"))
    with pytest.raises(ConfigError, match=r"traced group \d+ placed twice"):
        build(GatePlacement("a", "blocks.0.conv1", "output"),
              GatePlacement("b", "blocks.0.conv1", "output"))
    with pytest.raises(ConfigError, match="the inputs of layer 'fc' placed twice"):
        build(GatePlacement("a", "fc", "input"), GatePlacement("b", "fc", "input"))
    with pytest.raises(ConfigError, match=r"norm 'blocks.3.bn1' must have a scale and a "
                       r"bias of shape \(16,\), the outputs of layer 'stem'; it has "
                       r"\{'scale': \(32,\), 'bias': \(32,\)\}"):
        build(GatePlacement("a", "stem", "output", norm="blocks.3.bn1"))
    with pytest.raises(ConfigError, match=r"the readers \['nowhere'\] are not traced layers"):
        build(GatePlacement("a", "stem", "output", norm="stem_bn",
                            readers=("nowhere",)))
    with pytest.raises(ConfigError, match=r"reader 'fc' must read the 16 outputs of 'stem_bn' "
                       r"on one kernel axis; its kernel of shape \(64, 10\) has input axes \[0\]"):
        build(GatePlacement("a", "stem", "output", norm="stem_bn", readers=("fc",)))
    with pytest.raises(ConfigError, match=r"the outputs of layer 'blocks.0.conv1' are a "
                       r"removable group, which its gates remove with every reader; leave"):
        build(GatePlacement("a", "blocks.0.conv1", "output", norm="blocks.0.bn1",
                            readers=("blocks.0.conv2",)))
    with pytest.raises(ConfigError, match="readers are for a normaliser's output; give norm"):
        build(GatePlacement("a", "stem", "output", readers=("blocks.0.conv1",)))
    with pytest.raises(ConfigError, match="norm gates a layer's output; use side='output'"):
        build(GatePlacement("a", "stem", "input", norm="stem_bn"))
    with pytest.raises(ConfigError, match="the outputs of 'stem_bn' placed twice"):
        build(GatePlacement("a", "stem", "output", norm="stem_bn"),
              GatePlacement("b", "stem", "output", norm="stem_bn"))
    with pytest.raises(ConfigError, match="at weight granularity every kernel entry"):
        build(GatePlacement("a", "blocks.0.conv1", "output"), granularity="weight")


def test_head_placements_that_cannot_hold_say_what_is_wrong():
    net = plain_vit()

    def build(*placed_gates):
        return TracedModel(net, rngs=nnx.Rngs(params=0), input_shape=MNIST,
                           num_classes=10, placements=placed_gates)

    q, v, up = "blocks.0.attn.q", "blocks.0.attn.v", "blocks.0.ffn.up"
    with pytest.raises(ConfigError, match=r"'h': the outputs of layer 'blocks.0.attn.q' "
                       r"\(64 units\) are not split into 8 heads; the trace splits them into 4 "
                       r"heads"):
        build(GatePlacement("h", q, "output", heads=8))
    with pytest.raises(ConfigError, match=r"outputs of layer 'blocks.0.ffn.up' \(128 units\) "
                       r"are not split into 4 heads; no product of two activations splits "
                       "them into heads"):
        build(GatePlacement("h", up, "output", heads=4))
    with pytest.raises(ConfigError, match="heads split a layer's output units; use "
                       "side='output'"):
        build(GatePlacement("h", "blocks.0.attn.o", "input", heads=4))
    with pytest.raises(ConfigError, match="heads must be a positive whole number, got -1"):
        build(GatePlacement("h", q, "output", heads=-1))
    with pytest.raises(ConfigError, match="slot name h placed twice"):
        build(GatePlacement("h", q, "output", heads=4),
              GatePlacement("h", v, "output", 0.3, heads=4))
    with pytest.raises(ConfigError, match="slot name h placed twice"):
        build(GatePlacement("h", q, "output", heads=4), GatePlacement("h", v, "output"))
    with pytest.raises(ConfigError, match=r"whole_unit counts a traced group's units; the outputs "
                       r"of layer 'blocks.0.attn.q' here are heads"):
        build(GatePlacement("h", q, "output", heads=4, whole_unit=True))
    with pytest.raises(ConfigError, match=r"the inputs of layer 'head' here are no traced "
                       "group"):
        build(GatePlacement("h", "head", "input", whole_unit=True))


def test_branch_placements_that_cannot_hold_say_what_is_wrong():
    net = plain_vit()

    def build(*placed_gates):
        return TracedModel(net, rngs=nnx.Rngs(params=0), input_shape=MNIST,
                           num_classes=10, placements=placed_gates)

    attn = "blocks.0.attn"
    o, qkv = f"{attn}.o", tuple(f"{attn}.{name}" for name in "qkv")
    for wrong in ({"side": "input"}, {"heads": 4}, {"whole_unit": True},
                  {"norm": "blocks.0.attn_norm"}, {"readers": (f"{attn}.q",)}):
        with pytest.raises(ConfigError, match="'b': a branch gate is one gate on a layer's whole "
                           "output; use side='output' without heads, norm, readers or "
                           "whole_unit"):
            build(GatePlacement("b", o, **{"side": "output", **wrong}, branch=qkv))
    with pytest.raises(ConfigError, match=r"the branch layers \['blocks.0.attn.x'\] are not "
                       "traced layers"):
        build(GatePlacement("b", o, "output", branch=(*qkv, f"{attn}.x")))
    with pytest.raises(ConfigError, match=r"layer 'blocks.0.attn.v' of the branch also feeds "
                       r"\['blocks.0.attn.o'\]; a branch holds the layers that only feed "
                       "layer 'blocks.0.ffn.down'"):
        build(GatePlacement("b", "blocks.0.ffn.down", "output", branch=(f"{attn}.v",)))
    with pytest.raises(ConfigError, match="the branch of layer 'blocks.0.attn.o' placed twice"):
        build(GatePlacement("a", o, "output", branch=qkv),
              GatePlacement("b", o, "output", branch=qkv))


class ResidualMLP(nnx.Module):
    """Two pre-norm residual MLP blocks, ``h + down(relu(up(norm(h))))``, written plainly."""

    def __init__(self, rngs: nnx.Rngs, dim: int = 12, hidden: int = 20):
        self.stem = nnx.Linear(28 * 28, dim, rngs=rngs)
        self.norms = nnx.List([nnx.LayerNorm(dim, rngs=rngs) for _ in range(2)])
        self.ups = nnx.List([nnx.Linear(dim, hidden, rngs=rngs) for _ in range(2)])
        self.downs = nnx.List([nnx.Linear(hidden, dim, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(dim, 10, rngs=rngs)

    def __call__(self, x):
        h = self.stem(x.reshape(x.shape[0], -1))
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            h = h + down(nnx.relu(up(norm(h))))
        return self.head(h)


def test_a_closed_branch_gate_removes_its_whole_branch_in_the_counts_and_the_slim_network(
    tmp_path
):
    """One gate per residual branch (on its down projection, with its up projection as the
    branch): |g| and the members are both layers' kernels and biases; closing block 0's gate
    removes both layers from the counts and, with its normaliser, from the slim network, whose
    logits are the gated model's, saved and loaded."""
    method = L0HardConcrete(get_config().lock(), RunInfo(100))
    model = TracedModel(ResidualMLP(nnx.Rngs(params=0)), rngs=nnx.Rngs(params=1),
                        input_shape=MNIST, num_classes=10, gate_factory=method.make_gates,
                        placements=[GatePlacement(f"b{i}", f"downs.{i}", "output",
                                                  branch=(f"ups.{i}",)) for i in range(2)])
    branch_params = (12 * 20 + 20) + (20 * 12 + 12)
    assert [(s.name, s.shape, s.group_size) for s in model.gate_slots] == [
        ("b0", (1,), branch_params), ("b1", (1,), branch_params)]
    assert {m.path for m in model.slot_members(model.gate_slots[0])} == {
        "ups.0.kernel", "ups.0.bias", "downs.0.kernel", "downs.0.bias"}
    dense = count_network(model.layers, {}, model.activation_products)
    closed = count_network(model.layers, {"b0": np.zeros(1), "b1": np.ones(1)})
    half = count_network(model.layers, {"b0": np.full(1, 0.5), "b1": np.ones(1)})
    assert float(dense["params"] - closed["params"]) == branch_params
    assert float(dense["params"] - half["params"]) == pytest.approx(branch_params / 2)
    model.gates["b0"].log_alpha[...] = jnp.full((1,), -10.0)
    model.gates["b1"].log_alpha[...] = jnp.full((1,), 3.0)
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, *MNIST)))
    slim = slim_traced_model(model, x)
    assert not {path for path in slim.params if path.endswith(".0.kernel")
                or path.endswith(".0.bias") or path.endswith(".0.scale")}
    assert slim.report.params_after == pytest.approx(float(closed["params"]))
    assert slim.report.max_logit_difference < 1e-5
    slim.save(str(tmp_path / "slim.npz"))
    np.testing.assert_array_equal(load_slim_function(str(tmp_path / "slim.npz"))(x), slim(x))


def test_a_head_closes_its_query_key_and_value_units_and_scales_only_its_output():
    """One head slot over the query and value projections: a closed head counts its query,
    key and value columns and output-projection rows as removed; its gate multiplies the
    output projection's rows alone, so the scores (queries and keys) are not scaled. Its
    members are those slices, each entry with its head, and scaling a head by 0 (GReg,
    gmp) zeroes every one of them."""
    net = plain_vit()
    q, v = "blocks.0.attn.q", "blocks.0.attn.v"
    model = TracedModel(net, rngs=nnx.Rngs(params=0), input_shape=MNIST, num_classes=10,
                        placements=[GatePlacement("h", q, "output", heads=4),
                                    GatePlacement("h", v, "output", heads=4)])
    (slot,) = model.gate_slots
    assert (slot.shape, slot.layer, slot.axis) == ((4,), "blocks.0.attn.o", 0)
    assert slot.group_params == 3 * (64 * 16 + 16) + 16 * 64  # q, k, v columns; o rows
    dense = float(count_network(model.layers, {})["params"])
    closed = float(count_network(model.layers, {"h": np.array([1, 0, 1, 1.0])})["params"])
    assert dense - closed == slot.group_params
    (acting,) = dict(model.gated)["h"]
    assert (acting.path, acting.axis) == ("blocks.0.attn.o.kernel", 0)
    assert acting.units == tuple(np.arange(64) % 4)  # column d * 4 + h of head h
    head_1 = np.arange(64) % 4 == 1
    members = {m.path: (m.axis, m.units) for m in model.slot_members(slot)}
    projections = [f"{path}.{name}" for path in (q, "blocks.0.attn.k", v)
                   for name in ("kernel", "bias")]
    assert sorted(members) == sorted([*projections, "blocks.0.attn.o.kernel"])
    assert all(np.array_equal(np.asarray(units) == 1, head_1) for _, units in members.values())
    model.scale_units(slot, jnp.array([1.0, 0.0, 1.0, 1.0]))  # zeroes head 1 everywhere
    attention = net.blocks[0].attn
    for name in ("q", "k", "v"):
        kernel = np.asarray(getattr(attention, name).kernel[...])
        assert not kernel[:, head_1].any() and kernel[:, ~head_1].all(), name
    output_rows = np.asarray(attention.o.kernel[...])
    assert not output_rows[head_1].any() and output_rows[~head_1].all()


class FactoredAttention(nnx.Module):
    """``nnx.MultiHeadAttention``, whose ``(dim, heads, head_dim)`` kernels make the heads a
    traced group of their own."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Linear(49, 16, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=4, in_features=16, qkv_features=16, decode=False, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x.reshape(x.shape[0], 16, 49))
        return self.head((h + self.attention(h)).mean(axis=1))


def test_heads_placed_on_a_factored_attention_are_its_heads_group():
    """The same placements as on flat projections (query and value, ``heads=4``) pick the
    kernels' heads axis, whose group the default slots gate too: one slot of 4 gates with the
    same slices, counts and logits as the default slot of the heads group."""
    net = FactoredAttention(rngs=nnx.Rngs(0))
    default = TracedModel(net, rngs=nnx.Rngs(1), input_shape=MNIST, num_classes=10)
    model = TracedModel(net, rngs=nnx.Rngs(1), input_shape=MNIST, num_classes=10, placements=[
        GatePlacement("heads", f"attention.{name}", "output", heads=4)
        for name in ("query", "value")])
    (slot,) = model.gate_slots
    twin = "attention.query.axis1"
    assert (slot.shape, slot.layer, slot.axis) == ((4,), "attention.out", 0)
    assert dict(model.gated)["heads"] == dict(default.gated)[twin]
    values = np.array([1.0, 0.0, 0.5, 1.0])
    placed = count_network(model.layers, {"heads": values}, model.activation_products)
    found = count_network(default.layers, {twin: values}, default.activation_products)
    assert {k: float(v) for k, v in placed.items()} == {k: float(v) for k, v in found.items()}
    x = jax.random.normal(jax.random.key(0), (2, *MNIST))
    z = jnp.asarray(values, jnp.float32)
    np.testing.assert_array_equal(model.forward(x, {"heads": z}, train=False),
                                  default.forward(x, {twin: z}, train=False))


def test_a_branch_gate_on_a_factored_attention_removes_the_whole_sublayer():
    """``nnx.MultiHeadAttention``'s output projection, ``(heads, head_dim, dim)``, with its
    query, key and value projections as branch: |g| is every kernel and bias of the four;
    closed, the counts lose them and the attention products, and the slim network stores none
    of them, with the gated logits."""
    method = L0HardConcrete(get_config().lock(), RunInfo(100))
    projections = tuple(f"attention.{name}" for name in ("query", "key", "value"))
    model = TracedModel(FactoredAttention(rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), input_shape=MNIST,
                        num_classes=10, gate_factory=method.make_gates, placements=[
                            GatePlacement("attn", "attention.out", "output", branch=projections)])
    sublayer = 4 * (16 * 16 + 16)
    assert [(s.name, s.shape, s.group_size) for s in model.gate_slots] == [
        ("attn", (1,), sublayer)]
    dense = count_network(model.layers, {}, model.activation_products)
    closed = count_network(model.layers, {"attn": np.zeros(1)}, model.activation_products)
    assert float(dense["params"] - closed["params"]) == sublayer
    assert float(closed["flops"]) == 16 * 49 * 16 + 16 * 10  # the embedding and the head
    model.gates["attn"].log_alpha[...] = jnp.full((1,), -10.0)
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, *MNIST)))
    slim = slim_traced_model(model, x)
    assert sorted(slim.params) == ["embed.bias", "embed.kernel", "head.bias", "head.kernel"]
    assert slim.report.params_after == pytest.approx(float(closed["params"]))
    assert slim.report.max_logit_difference < 1e-5


class Tokens(nnx.Module):
    """A test attention of :mod:`test_trace` on 28 x 28 images read as 4 tokens of 196."""

    def __init__(self, attention: type[nnx.Module], *, rngs: nnx.Rngs):
        self.embed = nnx.Linear(196, 6, rngs=rngs)
        self.attention = attention(rngs=rngs)

    def __call__(self, x):
        return self.attention(self.embed(x.reshape(x.shape[0], 4, 196)))


@pytest.mark.parametrize("attention, layers, heads, per_head", [
    (FusedAttention, ("attention.qkv",), 2, 3 * (6 * 2 + 2) + 2 * 6),
    (GroupedQueryAttention, ("attention.q", "attention.v"), 2,
     2 * (6 * 2 + 2) + 2 * (6 * 2 + 2) + 4 * 6),
])
def test_heads_are_placed_on_a_fused_projection_and_on_grouped_query_attention(
    attention, layers, heads, per_head
):
    """A fused projection's one group, and grouped-query attention's key/value groups (placed
    on the queries, two columns per unit), take one gate per head: ``|g|`` is the query, key
    and value columns and output rows of a head (of a key/value group's query heads), and
    closing one removes that from the count."""
    net = Tokens(attention, rngs=nnx.Rngs(0))
    model = TracedModel(net, rngs=nnx.Rngs(1), input_shape=MNIST, num_classes=3, placements=[
        GatePlacement("heads", layer, "output", heads=heads) for layer in layers])
    (slot,) = model.gate_slots
    assert slot.shape == (heads,) and slot.group_params == per_head
    dense = float(count_network(model.layers, {})["params"])
    closed = float(count_network(model.layers, {"heads": np.array([0.0, 1.0])})["params"])
    assert dense - closed == per_head


def test_query_heads_inside_key_value_groups_are_gated_counted_and_slimmed():
    """``heads=4`` on the queries and values of 4 query heads in 2 key/value groups: one gate
    per query head (found by its tags), ``|g|`` its query columns, bias and output rows. The
    head's gate scales its output rows; with (g0, m0) and (g1, m1) closed, each group keeps one
    live head, so the slim network keeps one query head per group (group 0's live head moved
    to the first place), with the gated model's logits and the count's params."""
    net = Tokens(GroupedQueryAttention, rngs=nnx.Rngs(0))
    method = L0HardConcrete(get_config().lock(), RunInfo(100))
    model = TracedModel(net, rngs=nnx.Rngs(1), input_shape=MNIST, num_classes=3,
                        gate_factory=method.make_gates, placements=[
                            GatePlacement("heads", layer, "output", heads=4)
                            for layer in ("attention.q", "attention.v")])
    (slot,) = model.gate_slots
    assert (slot.shape, slot.layer, slot.axis, slot.group_params) == (
        (4,), "attention.o", 0, 2 * 6 + 2 + 2 * 6)
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, *MNIST)))
    rows = np.asarray(net.attention.o.kernel[...]).copy()
    closed = np.array([0.0, 1.0, 1.0, 0.0])  # heads in the order of the output rows: (g, m)
    z = {"heads": jnp.asarray(closed)}
    net.attention.o.kernel[...] = jnp.asarray(rows * np.repeat(closed, 2)[:, None])
    expected = np.asarray(net(x))
    net.attention.o.kernel[...] = jnp.asarray(rows)
    np.testing.assert_allclose(model.forward(x, z, train=False), expected, rtol=1e-5, atol=1e-6)
    per_example = jnp.broadcast_to(jnp.asarray(closed), (4, 4))
    np.testing.assert_allclose(model.forward(x, {"heads": per_example}, train=False), expected,
                               rtol=1e-5, atol=1e-6)
    dense = count_network(model.layers, {}, model.activation_products)
    two = count_network(model.layers, z, model.activation_products)
    assert float(dense["params"] - two["params"]) == 2 * slot.group_params
    assert float(dense["flops"] - two["flops"]) == 2 * (4 * 24 + 2 * 4 * 4 * 2)
    model.gates["heads"].log_alpha[...] = jnp.asarray(np.where(closed > 0, 10.0, -10.0))
    slim = slim_traced_model(model, x)
    assert slim.params["attention.q.kernel"].shape == (6, 4)
    assert slim.params["attention.o.kernel"].shape == (4, 6)
    assert slim.params["attention.k.kernel"].shape == (6, 4)
    assert slim.report.params_after == pytest.approx(float(two["params"]))
    assert slim.report.flops_after == pytest.approx(float(two["flops"]))
    assert slim.report.max_logit_difference < 1e-5
