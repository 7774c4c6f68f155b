"""Plain NNX models the package has never seen, gated, counted and trained from their trace
(:class:`sparsejax.structure.traced_model.TracedModel`).

For each model: the traced layers count the params and FLOPs computed by hand, with every unit
kept and with some removed (attention products included for the ViT on
``nnx.MultiHeadAttention``); closing gates gives the logits of the physically narrower model
(parameters sliced along the trace's members); gates drawn per example gate each example as if
it were alone; the engine trains it on a slice of Fashion-MNIST. The zoo's LeNet-5, ResNet-20
and ViT, traced as plain modules, count and gate like their declarations.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.errors import ConfigError
from sparsejax.methods.base import RunInfo
from sparsejax.methods.l0_hc import L0HardConcrete
from sparsejax.models.batch_chunks import fixed_chunks
from sparsejax.models.registry import build_model
from sparsejax.structure.accounting import count_network
from sparsejax.structure.example_gates import run_with_example_gates
from sparsejax.structure.nodes import layer_kernels, node_report
from sparsejax.structure.slim_trace.unread import read_units
from sparsejax.structure.sparsify import GatedSlice, slice_factors
from sparsejax.structure.traced_model import (
    GatePlacement,
    TracedModel,
    build_any_model,
    build_zoo_model,
    load_factory,
)
from sparsejax.train import train_and_evaluate

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST.exists(), reason="needs apt-get install dataset-fashion-mnist"
)
MNIST_SHAPE = (28, 28, 1)
THIS_MODULE = Path(__file__).stem


# ---------------------------------------------------------------- the models, never seen before


class BranchCNN(nnx.Module):
    """stem (BN) -> [3x3 left | 1x1 right] concatenated -> 3x3/2 mix + 1x1/2 projection summed
    (a projected residual) -> global mean -> dense head."""

    def __init__(self, *, rngs, num_classes, stem=6, left=4, right=5, mix=8):
        self.stem = nnx.Conv(1, stem, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(stem, rngs=rngs)
        self.left = nnx.Conv(stem, left, (3, 3), rngs=rngs)
        self.right = nnx.Conv(stem, right, (1, 1), rngs=rngs)
        self.mix = nnx.Conv(left + right, mix, (3, 3), strides=2, rngs=rngs)
        self.proj = nnx.Conv(left + right, mix, (1, 1), strides=2, rngs=rngs)
        self.head = nnx.Linear(mix, num_classes, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.stem(x)))
        h = jnp.concatenate([nnx.relu(self.left(h)), jax.nn.sigmoid(self.right(h))], axis=-1)
        h = nnx.relu(self.mix(h) + self.proj(h))
        return self.head(h.mean(axis=(1, 2)))


def branch_cnn_counts(stem=6, left=4, right=5, mix=8, classes=10):
    cat = left + right
    params = (9 * stem + stem) + (9 * stem * left + left) + (stem * right + right) \
        + (9 * cat * mix + mix) + (cat * mix + mix) + (mix * classes + classes)
    flops = 784 * (9 * stem + 9 * stem * left + stem * right) + 196 * (9 * cat * mix + cat * mix) \
        + mix * classes
    return params, flops


class DepthwiseSeparable(nnx.Module):
    """stem 3x3/2 -> expand 1x1 (BN, relu6) -> depthwise 3x3 (BN, relu6) -> project 1x1 (BN)
    -> global mean -> dense head."""

    def __init__(self, *, rngs, num_classes, stem=4, expand=12, project=6):
        self.stem = nnx.Conv(1, stem, (3, 3), strides=2, rngs=rngs)
        self.expand = nnx.Conv(stem, expand, (1, 1), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(expand, rngs=rngs)
        self.depthwise = nnx.Conv(
            expand, expand, (3, 3), feature_group_count=expand, use_bias=False, rngs=rngs
        )
        self.bn2 = nnx.BatchNorm(expand, rngs=rngs)
        self.project = nnx.Conv(expand, project, (1, 1), use_bias=False, rngs=rngs)
        self.bn3 = nnx.BatchNorm(project, rngs=rngs)
        self.head = nnx.Linear(project, num_classes, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.stem(x))
        h = jax.nn.relu6(self.bn1(self.expand(h)))
        h = jax.nn.relu6(self.bn2(self.depthwise(h)))
        h = self.bn3(self.project(h))
        return self.head(h.mean(axis=(1, 2)))


def depthwise_counts(stem=4, expand=12, project=6, classes=10):
    params = (9 * stem + stem) + stem * expand + 9 * expand + expand * project \
        + (project * classes + classes)
    flops = 196 * (9 * stem + stem * expand + 9 * expand + expand * project) + project * classes
    return params, flops


class Mixer(nnx.Module):
    """MLP-Mixer: 7x7 patches (16 tokens) -> [LN, token MLP over the transposed tokens,
    residual; LN, channel MLP, residual] -> LN -> mean over tokens -> dense head."""

    def __init__(self, *, rngs, num_classes, channels=8, token_hidden=6, channel_hidden=10):
        tokens = 16
        self.patch = nnx.Conv(1, channels, (7, 7), strides=7, padding="VALID", rngs=rngs)
        self.norm1 = nnx.LayerNorm(channels, rngs=rngs)
        self.token1 = nnx.Linear(tokens, token_hidden, rngs=rngs)
        self.token2 = nnx.Linear(token_hidden, tokens, rngs=rngs)
        self.norm2 = nnx.LayerNorm(channels, rngs=rngs)
        self.channel1 = nnx.Linear(channels, channel_hidden, rngs=rngs)
        self.channel2 = nnx.Linear(channel_hidden, channels, rngs=rngs)
        self.norm3 = nnx.LayerNorm(channels, rngs=rngs)
        self.head = nnx.Linear(channels, num_classes, rngs=rngs)

    def __call__(self, x):
        h = self.patch(x)
        h = h.reshape(h.shape[0], -1, h.shape[-1])  # (batch, tokens, channels)
        y = jnp.swapaxes(self.norm1(h), 1, 2)
        y = self.token2(nnx.gelu(self.token1(y)))
        h = h + jnp.swapaxes(y, 1, 2)
        h = h + self.channel2(nnx.gelu(self.channel1(self.norm2(h))))
        return self.head(self.norm3(h).mean(axis=1))


def mixer_counts(channels=8, token_hidden=6, channel_hidden=10, classes=10, tokens=16):
    params = (49 * channels + channels) + (tokens * token_hidden + token_hidden) \
        + (token_hidden * tokens + tokens) + (channels * channel_hidden + channel_hidden) \
        + (channel_hidden * channels + channels) + (channels * classes + classes)
    flops = tokens * 49 * channels + 2 * channels * tokens * token_hidden \
        + 2 * tokens * channels * channel_hidden + channels * classes
    return params, flops


class ViT(nnx.Module):
    """A one-block vision transformer on Flax's own attention: 7x7 patches (16 tokens) ->
    dense embedding -> [LN, nnx.MultiHeadAttention, residual; LN, GELU MLP, residual] -> mean
    over tokens -> dense head. Its projections are nnx.LinearGeneral kernels with a heads axis:
    (dim, heads, head_dim) and (heads, head_dim, dim)."""

    def __init__(self, *, rngs, num_classes, dim=16, heads=4, head_dim=4, mlp=24):
        self.embed = nnx.Linear(49, dim, rngs=rngs)
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=heads, in_features=dim, qkv_features=heads * head_dim, decode=False,
            rngs=rngs,
        )
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, mlp, rngs=rngs)
        self.down = nnx.Linear(mlp, dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, x):
        patches = x.reshape(x.shape[0], 4, 7, 4, 7).transpose(0, 1, 3, 2, 4)
        h = self.embed(patches.reshape(x.shape[0], 16, 49))
        h = h + self.attention(self.norm1(h))
        h = h + self.down(nnx.gelu(self.up(self.norm2(h))))
        return self.head(h.mean(axis=1))


def vit_counts(dim=16, heads=4, head_dim=4, mlp=24, classes=10, tokens=16):
    inner = heads * head_dim
    params = (49 * dim + dim) + 3 * (dim * inner + inner) + (inner * dim + dim) \
        + (dim * mlp + mlp) + (mlp * dim + dim) + (dim * classes + classes)
    attention = 2 * inner * tokens * tokens  # Q K^T and A V
    flops = tokens * (49 * dim + 4 * dim * inner + 2 * dim * mlp) + attention + dim * classes
    return params, flops


class SortedCNN(nnx.Module):
    """conv1 -> conv2 -> a sort over conv2's channels (an op the tracer has no rule for) ->
    global mean -> dense head."""

    def __init__(self, *, rngs, num_classes, first=5, second=7):
        self.conv1 = nnx.Conv(1, first, (3, 3), strides=2, rngs=rngs)
        self.conv2 = nnx.Conv(first, second, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(second, num_classes, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.head(jnp.sort(h, axis=-1).mean(axis=(1, 2)))


def sorted_counts(first=5, second=7, classes=10):
    params = (9 * first + first) + (9 * first * second + second) + (second * classes + classes)
    flops = 196 * 9 * first + 49 * 9 * first * second + second * classes
    return params, flops


def branch_cnn(*, rngs, num_classes):
    return BranchCNN(rngs=rngs, num_classes=num_classes)


def depthwise_separable(*, rngs, num_classes):
    return DepthwiseSeparable(rngs=rngs, num_classes=num_classes)


def mixer(*, rngs, num_classes):
    return Mixer(rngs=rngs, num_classes=num_classes)


def sorted_cnn(*, rngs, num_classes):
    return SortedCNN(rngs=rngs, num_classes=num_classes)


def vit(*, rngs, num_classes):
    return ViT(rngs=rngs, num_classes=num_classes)


@dataclasses.dataclass(frozen=True)
class Case:
    """A test model: its class and factory, its hand counts, its expected gate slots (name:
    units), the units to close per slot with the narrower widths they leave, and the layers
    whose outputs are residual streams."""

    cls: type
    factory: str
    counts: object
    slots: dict
    closed: dict
    narrow: dict
    streams: frozenset = frozenset()


CASES = {
    "branch_cnn": Case(
        BranchCNN, "branch_cnn", branch_cnn_counts,
        {"stem": 6, "left": 4, "right": 5, "mix": 8},
        {"stem": (0, 4), "left": (2,), "right": (1, 3), "mix": (5,)},
        {"stem": 4, "left": 3, "right": 3, "mix": 7},
        frozenset({"mix"}),
    ),
    "depthwise_separable": Case(
        DepthwiseSeparable, "depthwise_separable", depthwise_counts,
        {"stem": 4, "expand": 12, "project": 6},
        {"stem": (1,), "expand": (0, 5, 11), "project": (2, 3)},
        {"stem": 3, "expand": 9, "project": 4},
    ),
    "mixer": Case(
        Mixer, "mixer", mixer_counts,
        {"token1": 6, "channel1": 10},
        {"token1": (1, 4), "channel1": (0, 3, 9)},
        {"token_hidden": 4, "channel_hidden": 7},
        frozenset({"patch"}),
    ),
    "sorted_cnn": Case(
        SortedCNN, "sorted_cnn", sorted_counts, {"conv1": 5}, {"conv1": (2,)}, {"first": 4}
    ),
    "vit": Case(  # a head (its query, key, value and output rows) and MLP units
        ViT, "vit", vit_counts,
        {"attention.query.axis1": 4, "attention.query.axis2": 4, "attention.value": 4, "up": 24},
        {"attention.query.axis1": (2,), "up": (0, 7, 23)},
        {"heads": 3, "mlp": 21},
        frozenset({"embed"}),
    ),
}


def traced(case: Case, seed: int = 0, **options) -> TracedModel:
    net = case.cls(rngs=nnx.Rngs(params=seed), num_classes=10)
    return TracedModel(net, rngs=nnx.Rngs(params=seed), input_shape=MNIST_SHAPE, num_classes=10,
                       **options)


@pytest.mark.parametrize("name", list(CASES))
def test_the_trace_marks_the_groups_a_residual_addition_joins_as_streams(name):
    """A stream is a group whose units a sum of two activations joins (the projected residual,
    a mixer's and a transformer's hidden dimension), not one whose producers a product ties
    (a head's queries, keys and values), a normaliser centres or a bias is added to."""
    groups = traced(CASES[name]).structure.groups
    found = {g.producers[0][0].removesuffix(".kernel") for g in groups if g.stream}
    assert found == CASES[name].streams


def randomized(module: nnx.Module, seed: int) -> None:
    """Every float state array (biases, BatchNorm statistics and scales included) drawn at
    random (variances positive), so that a parameter left out of the gating shows in the
    logits."""
    keys = iter(jax.random.split(jax.random.key(seed), 100))
    for path, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Variable) and jnp.issubdtype(variable.dtype, jnp.floating):
            value = 0.3 * jax.random.normal(next(keys), variable.shape)
            variable.set_value(jnp.abs(value) + 0.5 if path[-1] == "var" else value)


def removed(net: nnx.Module, model: TracedModel, closed: dict) -> dict:
    """The state of ``net`` with the closed units of each slot cut out of every member of its
    traced group (along the member's axis), as a flat ``{path: array}``."""
    sliced = {".".join(map(str, path)): np.asarray(v.get_value())
              for path, v in nnx.to_flat_state(nnx.state(net))}
    group_of = {name: group for group, name in model.group_slots}
    drops: dict[tuple[str, int], list[int]] = {}
    for name, units in closed.items():
        for member in model.structure.groups[group_of[name]].members:
            drop = [i for i, u in zip(member.indices, member.units) if u in units]
            drops.setdefault((member.path, member.axis), []).extend(drop)
    for (path, axis), drop in drops.items():  # indices of the full parameter, cut at once
        sliced[path] = np.delete(sliced[path], drop, axis=axis)
    return sliced


# ---------------------------------------------------------------- structure and counts


@pytest.mark.parametrize("name", list(CASES))
def test_the_traced_model_counts_and_gates_as_computed_by_hand(name):
    case = CASES[name]
    model = traced(case)
    slots = {slot.name: slot.shape[0] for slot in model.gate_slots}
    assert slots == case.slots
    assert set(model.gates) == set()  # no gate factory: ungated, counted dense
    params, flops = case.counts()
    dense = count_network(model.layers, {}, model.activation_products)
    assert (float(dense["params"]), float(dense["flops"])) == (params, flops)
    masks = {slot: np.isin(np.arange(slots[slot]), units, invert=True).astype(np.float32)
             for slot, units in case.closed.items()}
    narrow_params, narrow_flops = case.counts(**case.narrow)
    pruned = count_network(model.layers, masks, model.activation_products)
    assert (float(pruned["params"]), float(pruned["flops"])) == (narrow_params, narrow_flops)


def test_the_gate_slots_weigh_a_unit_by_every_parameter_it_takes_along():
    model = traced(CASES["branch_cnn"])
    group_params = {slot.name: slot.group_size for slot in model.gate_slots}
    # stem: its 3x3x1 kernel slice and bias, the rows of left (3x3x4) and right (1x1x5)
    assert group_params["stem"] == 9 + 1 + 9 * 4 + 5
    # mix: the stream of mix and proj (two kernel slices, two biases) and the head's row
    assert group_params["mix"] == 9 * 9 + 1 + 9 + 1 + 10
    assert [(c.layers, c.fixed) for c in model.channel_couplings] == [(("mix", "proj"), False)]


def test_an_op_without_a_rule_leaves_its_groups_ungated_and_says_where():
    model = traced(CASES["sorted_cnn"])
    blocked = [g for g in model.structure.groups if g.producers[0][0] == "conv2.kernel"][0]
    assert not blocked.prunable
    assert any(b.primitive == "sort" and "test_traced_model.py" in b.source
               for b in blocked.blockers)
    assert [slot.name for slot in model.gate_slots] == ["conv1"]


def test_the_mixer_gates_neither_its_layer_normed_stream_nor_its_token_outputs():
    model = traced(CASES["mixer"])
    groups = {g.producers[0][0]: g for g in model.structure.groups}
    stream = groups["patch.kernel"]
    assert stream.producers == (("patch.kernel", 3), ("channel2.kernel", 1))
    # LayerNorm's statistics read the stream: slimming keeps it whole, so it gets no gate
    assert stream.prunable and {c.primitive for c in stream.caveats} == {"reduce_sum"}
    assert not stream.removable
    couplings = [(c.layers, c.fixed) for c in model.channel_couplings]
    assert (("patch", "channel2"), True) in couplings
    # token2's outputs are added to token positions of the image, which no unit removes
    tokens = groups["token2.kernel"]
    assert [b.reason for b in tokens.blockers][:1] == ["summed with values of no unit"]
    assert [slot.name for slot in model.gate_slots] == ["token1", "channel1"]
    # a run shows both, with the operation and its line; the logits are left out
    stream_note, tokens_note = model.notes()
    assert stream_note.startswith("kept whole: patch, channel2 (8 units): reduction over units "
                                  "(reduce_sum at ")
    assert tokens_note.startswith("kept whole: token2 (16 units): summed with values of no unit")
    assert all("test_traced_model.py:" in note for note in model.notes())
    assert traced(CASES["mixer"], granularity="weight").notes() == ()


def test_a_placement_on_the_outputs_of_a_layer_normed_stream_is_refused_with_its_reduction():
    """Output gates there would count producers' columns that slimming keeps; gates on one
    reader's inputs are an input selection of that reader's rows, which slimming removes."""
    with pytest.raises(ConfigError, match=r"the outputs of layer 'embed' are not a removable "
                       r"unit group \(reduction over units \(reduce_sum at .*test_traced_model"):
        traced(CASES["vit"], placements=[GatePlacement("stream", "embed", "output")])
    model = traced(CASES["vit"], placements=[GatePlacement("rows", "up", "input")])
    assert [(name, s.path, s.axis) for name, s in model.selections] == [("rows", "up.kernel", 0)]


def test_dead_units_are_found_through_the_readers_of_a_concatenation():
    model = traced(CASES["branch_cnn"])
    net = model.net
    for reader in (net.mix, net.proj):  # right's unit 1 sits at input 4 + 1 of both readers
        reader.kernel[...] = reader.kernel[...].at[:, :, 5].set(0.0)
    net.left.kernel[...] = net.left.kernel[...].at[..., 2].set(0.0)  # left's unit 2: no input
    report = node_report(model)
    assert report.alive_units == {"stem": 6, "left": 3, "right": 4, "mix": 8}
    narrow_params, narrow_flops = branch_cnn_counts(left=3, right=4)
    assert report.live_biases == 6 + 3 + 4 + 8 + 8 + 10
    assert report.kept_weights == narrow_params - report.live_biases
    assert report.kept_flops == narrow_flops


def test_weight_granularity_puts_one_gate_on_every_kernel_entry():
    case = CASES["branch_cnn"]
    method = L0HardConcrete(get_config().lock(), RunInfo(100))
    model = traced(case, granularity="weight", gate_factory=method.make_gates)
    kernels = {layer.name: layer.kernel_shape for layer in model.layers}
    assert {name: gate.shape for name, gate in model.gates.items()} == kernels
    x = jax.random.normal(jax.random.key(1), (2, *MNIST_SHAPE))
    closed = {name: jnp.zeros(shape) if name == "head" else jnp.ones(shape)
              for name, shape in kernels.items()}
    head_bias = model.net.head.bias[...]
    assert np.allclose(model(x, train=False, gates=closed), head_bias[None], atol=1e-6)
    masks = {name: np.asarray(value) for name, value in closed.items()}
    params, _ = case.counts()
    assert float(count_network(model.layers, masks)["params"]) == params - 8 * 10


# ---------------------------------------------------------------- closing gates removes units


@pytest.mark.parametrize(
    "name, train",
    [(name, False) for name in CASES] + [("branch_cnn", True), ("depthwise_separable", True)],
)
def test_closed_gates_give_the_logits_of_the_narrower_model(name, train):
    case = CASES[name]
    method = L0HardConcrete(get_config().lock(), RunInfo(100))
    model = traced(case, gate_factory=method.make_gates)
    randomized(model.net, seed=3)
    gates = {
        slot.name: jnp.asarray(
            np.isin(np.arange(slot.shape[0]), case.closed.get(slot.name, ()), invert=True),
            jnp.float32,
        )
        for slot in model.gate_slots
    }
    x = jax.random.normal(jax.random.key(2), (4, *MNIST_SHAPE))
    gated = model(x, train=train, gates=gates)

    narrow = case.cls(rngs=nnx.Rngs(params=1), num_classes=10, **case.narrow)
    state = nnx.state(narrow)
    sliced = removed(model.net, model, case.closed)
    for path, variable in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        assert variable.get_value().shape == sliced[key].shape, key
        variable.set_value(jnp.asarray(sliced[key]))
    nnx.update(narrow, state)
    narrow.train() if train else narrow.eval()
    expected = narrow(x)
    assert np.allclose(gated, expected, atol=1e-5), np.abs(gated - expected).max()
    full = model(x, train=train, gates={k: jnp.ones_like(v) for k, v in gates.items()})
    assert np.abs(full - expected).max() > 1e-3  # the closed units did matter


@pytest.mark.parametrize(
    "name, train",
    [(name, False) for name in CASES] + [("branch_cnn", True), ("depthwise_separable", True)],
)
def test_scaling_units_to_zero_removes_them_from_every_parameter_the_trace_ties_to_them(
    name, train
):
    """GReg's pruning mask (``scale_units``) on a traced model: the logits of the narrower
    model with every gate open, whatever the removed units' activations make of zero (the
    branch CNN's sigmoid), and slimming reads the units as gone."""
    case = CASES[name]
    model = traced(case)
    randomized(model.net, seed=3)
    narrow = case.cls(rngs=nnx.Rngs(params=1), num_classes=10, **case.narrow)
    state = nnx.state(narrow)
    sliced = removed(model.net, model, case.closed)
    for path, variable in nnx.to_flat_state(state):
        variable.set_value(jnp.asarray(sliced[".".join(map(str, path))]))
    nnx.update(narrow, state)
    narrow.train() if train else narrow.eval()
    x = jax.random.normal(jax.random.key(2), (4, *MNIST_SHAPE))
    expected = narrow(x)
    assert np.abs(model(x, train=train) - expected).max() > 1e-3  # the units did matter

    for slot in model.gate_slots:
        closed = case.closed.get(slot.name, ())
        model.scale_units(slot, jnp.asarray(np.isin(np.arange(slot.shape[0]), closed,
                                                    invert=True), jnp.float32))
    assert np.allclose(model(x, train=train), expected, atol=1e-5)
    read = read_units(model.net, model.structure)
    for group, slot in model.group_slots:
        assert not read[group][list(case.closed.get(slot, ()))].any(), slot


# ---------------------------------------------------------------- gates drawn per example


def drawn_gates(model: TracedModel, batch: int, seed: int) -> dict:
    """Per-example unit gates: each 0, 1 or 0.5 at random."""
    rng = np.random.default_rng(seed)
    return {slot.name: jnp.asarray(rng.choice([0.0, 0.5, 1.0], (batch, *slot.shape)),
                                   jnp.float32)
            for slot in model.gate_slots}


@pytest.mark.parametrize("name", list(CASES))
def test_gates_drawn_per_example_gate_each_example_as_a_batch_of_its_own(name):
    model = traced(CASES[name], gate_factory=L0HardConcrete(
        get_config().lock(), RunInfo(100)).make_gates)
    randomized(model.net, seed=3)
    x = jax.random.normal(jax.random.key(2), (3, *MNIST_SHAPE))
    gates = drawn_gates(model, 3, seed=4)
    together = model(x, train=False, gates=gates)
    for b in range(3):
        alone = model(x[b:b + 1], train=False, gates={k: v[b] for k, v in gates.items()})
        np.testing.assert_allclose(together[b], alone[0], atol=1e-5, rtol=1e-5)
    other = model(x, train=False, gates=drawn_gates(model, 3, seed=5))
    assert np.abs(other - together).max() > 1e-3  # the gates did act


@pytest.mark.parametrize("name", ["branch_cnn", "depthwise_separable"])
def test_gates_drawn_per_example_run_the_convolutions_on_slices_of_the_batch(name):
    """On a CPU a model's convolutions run on slices of the batch; with gates drawn per example
    they still do (three times as many convolutions for three slices), with the logits and
    gradients of the whole batch to float rounding."""
    model = traced(CASES[name], gate_factory=L0HardConcrete(
        get_config().lock(), RunInfo(100)).make_gates)
    randomized(model.net, seed=3)
    x = jax.random.normal(jax.random.key(2), (6, *MNIST_SHAPE))
    gates = drawn_gates(model, 6, seed=4)

    def loss(model, gates, x):
        return jnp.sum(model(x, train=False, gates=gates) ** 2)

    runs = {}
    for chunks in (1, 3):
        with fixed_chunks(chunks):
            step = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1, 2)))
            convolutions = step.lower(model, gates, x).as_text().count("convolution(")
            runs[chunks] = convolutions, *step(model, gates, x)
    (whole, whole_loss, whole_grads), (sliced, sliced_loss, sliced_grads) = runs[1], runs[3]
    assert sliced == 3 * whole > 0
    np.testing.assert_allclose(sliced_loss, whole_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sliced_grads), jax.tree.leaves(whole_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["branch_cnn", "depthwise_separable"])
def test_the_same_gate_for_every_example_trains_batch_norm_as_a_shared_gate(name):
    """Train mode: per-example gates equal across the batch give the logits and the BatchNorm
    statistics of the same gates shared (parameters scaled instead of activations)."""
    runs = []
    for drawn in (False, True):
        model = traced(CASES[name], gate_factory=L0HardConcrete(
            get_config().lock(), RunInfo(100)).make_gates)
        randomized(model.net, seed=3)
        shared = {k: v[0] for k, v in drawn_gates(model, 1, seed=4).items()}
        gates = {k: jnp.tile(v, (4, 1)) for k, v in shared.items()} if drawn else shared
        x = jax.random.normal(jax.random.key(2), (4, *MNIST_SHAPE))
        before = jax.tree.leaves(nnx.state(model.net, nnx.BatchStat))
        logits = model(x, train=True, gates=gates)
        after = jax.tree.leaves(nnx.state(model.net, nnx.BatchStat))
        assert after and all(np.abs(a - b).max() > 1e-4 for a, b in zip(after, before))
        runs.append((logits, after))
    (shared_logits, shared_stats), (drawn_logits, drawn_stats) = runs
    np.testing.assert_allclose(drawn_logits, shared_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(drawn_stats, shared_stats):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


class ScannedStack(nnx.Module):
    """Three stacked 6x6 layers run by ``lax.scan``: their kernel is read inside the scan."""

    def __init__(self, *, rngs):
        self.stack = nnx.Param(jax.random.normal(rngs.params(), (3, 6, 6)))

    def __call__(self, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, self.stack[...])
        return h


def test_a_gate_drawn_per_example_that_cannot_be_placed_is_refused_not_dropped():
    net = ScannedStack(rngs=nnx.Rngs(params=0))
    rows = GatedSlice("stack", 1, tuple(range(6)), tuple(range(6)))
    with pytest.raises(ConfigError, match=r"\['stack'\] were not met where they act"):
        run_with_example_gates(net, jnp.ones((4, 6)), [(rows, jnp.ones((4, 6)))])


@pytest.mark.parametrize(
    "indices, units",
    [
        (range(5), range(5)),  # the whole axis in order: the gates are their own factors
        (range(5), (4, 3, 2, 1, 0)),  # the whole axis, its gates reversed
        ((0, 2, 4), (0, 1, 2)),  # an input selection: the other entries keep factor 1
        ((1, 2, 3, 4), (0, 1, 2, 3)),
    ],
)
def test_gate_factors_put_each_gate_at_its_index_and_one_elsewhere(indices, units):
    z = jax.random.uniform(jax.random.key(0), (3, len(tuple(units))))  # gates per example
    factors = slice_factors(GatedSlice("w", 0, tuple(indices), tuple(units)), z, 5)
    expected = np.ones((3, 5), np.float32)
    for index, unit in zip(indices, units):
        expected[:, index] = z[:, unit]
    np.testing.assert_array_equal(np.asarray(factors), expected)


# ---------------------------------------------------------------- the zoo through the adapter


def test_the_zoo_vit_without_its_placements_gates_finer_groups_that_count_like_its_heads():
    """Without its placements (every removable group gated) the trace of vit_tiny gates finer
    groups than its head slots (one unit per query/key column and per value column): a head
    closed by its placement is its 16 query/key and 16 value columns closed there, and both
    count the same params and FLOPs, attention products included. The hidden stream, whose
    units the norms' statistics read, gets no gate without its stream placement."""
    placed = build_zoo_model("vit_tiny", rngs=nnx.Rngs(params=0), num_classes=10,
                             input_shape=MNIST_SHAPE)
    net = build_model("vit_tiny", rngs=nnx.Rngs(params=0), num_classes=10,
                      input_shape=MNIST_SHAPE)
    model = TracedModel(net, rngs=nnx.Rngs(params=0), input_shape=MNIST_SHAPE, num_classes=10)
    blocks = range(4)
    slots = {slot.name: slot.shape for slot in model.gate_slots}
    assert slots == {
        f"blocks.{i}.{name}": (size,)
        for i in blocks for name, size in (("attn.q", 64), ("attn.v", 64), ("ffn.up", 128))
    }
    stream = [g for g in model.structure.groups if g.producers[0][0] == "patch_embed.kernel"]
    assert [(g.size, g.prunable, g.removable) for g in stream] == [(64, True, False)]
    for what in ("params", "flops"):  # 134,602 and 7,884,416 (1,280,000 of it attention)
        assert float(count_network(model.layers, {}, model.activation_products)[what]) == float(
            count_network(placed.layers, {}, placed.activation_products)[what])
    rng = np.random.default_rng(0)
    for _ in range(3):
        heads = [(rng.random(4) < 0.6).astype(np.float32) for _ in blocks]
        ffn = [(rng.random(128) < 0.6).astype(np.float32) for _ in blocks]
        by_placement = {f"blocks.{i}.heads": heads[i] for i in blocks} | {
            f"blocks.{i}.ffn": ffn[i] for i in blocks}
        columns = [heads[i][np.arange(64) % 4] for i in blocks]
        by_group = {
            f"blocks.{i}.{name}": columns[i] for i in blocks for name in ("attn.q", "attn.v")
        } | {f"blocks.{i}.ffn.up": ffn[i] for i in blocks}
        group_counts = count_network(model.layers, by_group, model.activation_products)
        placed_counts = count_network(placed.layers, by_placement, placed.activation_products)
        for what in ("params", "flops"):
            assert float(group_counts[what]) == pytest.approx(float(placed_counts[what]),
                                                              rel=1e-6)


# ---------------------------------------------------------------- the engine and its methods


def fashion_config(method: str, factory: str, **overrides):
    config = get_config(method)
    config.update({
        "model": f"{THIS_MODULE}:{factory}", "dataset": "fashion_mnist",
        "data_dir": str(FASHION_MNIST), "num_train": 256, "num_test": 128, "batch_size": 64,
        "eval_batch_size": 128, "epochs": 1, "steps_per_epoch": 3, "log_every": 3, **overrides,
    })
    return config


@needs_fashion_mnist
@pytest.mark.parametrize("name", list(CASES))
def test_l0_hc_trains_each_unseen_model_through_the_engine(name, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    case = CASES[name]
    summary = train_and_evaluate(fashion_config("l0_hc", case.factory), tmp_path / "run")
    shown = capsys.readouterr().err
    assert all(note in shown for note in traced(case).notes())
    params, flops = case.counts()
    assert (summary["dense_params"], summary["dense_flops"]) == (params, flops)
    assert dict(zip(summary["gate_slots"], summary["dense_units"])) == case.slots
    assert summary["expected_l0"] < params and np.isfinite(summary["test_error"])


GMP = {"final_sparsity": 0.5, "prune_every": 1, "prune_end_epoch": 1.0}
GREG_WEIGHTS = {"greg_granularity": "weight", "pretrain_epochs": 0, "stage_pr": 0.5,
                "greg_stabilise_steps": 1, "greg_delta": 1.0, "fine_tune_epochs": 1,
                "lr_ft": "0:0.001"}


@needs_fashion_mnist
@pytest.mark.parametrize(
    "name, method, overrides",
    [
        ("branch_cnn", "l0_arm", {}),
        ("branch_cnn", "bounded_lp", {"filter_lambda": 1e-3}),
        ("branch_cnn", "dep_l0_arm", {}),
        ("branch_cnn", "dep_l0", {}),
        ("depthwise_separable", "l0_hc", {"per_example_gates": True}),
        ("branch_cnn", "gmp", GMP),
        ("branch_cnn", "gmp", {**GMP, "gmp_structure": "unit", "gmp_scope": "global"}),
        ("branch_cnn", "greg1", GREG_WEIGHTS),
        ("vit", "l0_hc", {"granularity": "weight"}),
        ("vit", "dep_l0", {}),
        ("vit", "bounded_lp", {"filter_lambda": 1e-3}),
        ("vit", "gmp", GMP),
        ("vit", "greg1", GREG_WEIGHTS),
        ("vit", "greg1", {**GREG_WEIGHTS, "greg_granularity": "filter"}),
    ],
)
def test_other_methods_train_the_branch_cnn_and_the_vit(
    name, method, overrides, tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    case = CASES[name]
    config = fashion_config(method, case.factory, **overrides)
    if method.startswith("greg"):
        config.epochs = None
    summary = train_and_evaluate(config, tmp_path / "run")
    params, flops = case.counts()
    assert (summary["dense_params"], summary["dense_flops"]) == (params, flops)
    assert np.isfinite(summary["test_error"])
    outside = {slot: size for slot, size in case.slots.items() if slot not in case.streams}
    if method == "gmp" and overrides.get("gmp_structure") == "unit":  # half the slots' units
        units = sum(outside.values())
        assert summary["gmp/overall_sparsity"] == round(0.5 * units) / units
        assert set(summary["gmp/sparsity"]) == set(outside)
        assert summary["params"] < 0.75 * params
    elif method == "gmp":
        assert summary["gmp/overall_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert summary["pruning_rate"] >= 49.5  # and the weights of units left dead
    if overrides.get("greg_granularity") == "filter":  # every slot loses ceil(half) its units
        assert summary["greg/widths"] == {
            slot: size - math.ceil(size / 2) for slot, size in outside.items()}
        assert summary["greg/params"] < params


@needs_fashion_mnist
@pytest.mark.parametrize(
    "name, method, overrides, message",
    [
        ("branch_cnn", "gmp", {"gmp_structure": "unit", "granularity": "weight"},
         "can still pass a constant on"),
        ("branch_cnn", "greg1", {"greg_granularity": "filter", "stage_pr": "stem:0.5,nope:0.5",
                                  "epochs": None},
         r"names the gate slots \['nope'\], which the model does not have \(valid: stem, "),
    ],
)
def test_methods_that_cannot_work_on_a_traced_model_say_why(
    name, method, overrides, message, tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    config = fashion_config(method, CASES[name].factory, **overrides)
    with pytest.raises(ConfigError, match=message):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


class PixelMLP(nnx.Module):
    """LeNet-300-100's gates on a plain MLP: one per pixel (an input selection) and one per
    hidden unit of each layer, read at the next layer's inputs, as its own ``gate_placements``
    say."""

    gate_placements = (
        GatePlacement("pixels", "fc1", "input", droprate_init=0.2),
        GatePlacement("hidden1", "fc2", "input"),
        GatePlacement("hidden2", "fc3", "input"),
    )

    def __init__(self, *, rngs, num_classes):
        self.fc1 = nnx.Linear(784, 30, rngs=rngs)
        self.fc2 = nnx.Linear(30, 10, rngs=rngs)
        self.fc3 = nnx.Linear(10, num_classes, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc3(nnx.relu(self.fc2(h)))


def pixel_mlp(*, rngs, num_classes):
    return PixelMLP(rngs=rngs, num_classes=num_classes)


@needs_fashion_mnist
def test_a_model_places_its_own_gates_for_the_command_line(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    model = build_any_model(f"{THIS_MODULE}:pixel_mlp", rngs=nnx.Rngs(0), num_classes=10,
                            input_shape=MNIST_SHAPE)
    assert [(s.name, s.shape, s.droprate_init, s.group_size) for s in model.gate_slots] == [
        ("pixels", (784,), 0.2, 30), ("hidden1", (30,), 0.5, 10), ("hidden2", (10,), 0.5, 10)]
    closed = {"pixels": np.zeros(784), "hidden1": np.ones(30), "hidden2": np.ones(10)}
    assert float(count_network(model.layers, closed)["params"]) == 30 + 30 * 10 + 10 + 100 + 10
    by_weight = build_any_model(f"{THIS_MODULE}:pixel_mlp", rngs=nnx.Rngs(0), num_classes=10,
                                input_shape=MNIST_SHAPE, granularity="weight")
    assert [s.shape for s in by_weight.gate_slots] == [(784, 30), (30, 10), (10, 10)]
    summary = train_and_evaluate(fashion_config("l0_hc", "pixel_mlp"), tmp_path / "run")
    assert summary["gate_slots"] == ["pixels", "hidden1", "hidden2"]
    assert summary["dense_units"] == [784, 30, 10]


@needs_fashion_mnist
def test_greg_and_gmp_prune_the_filters_of_a_model_with_its_own_placements(
    tmp_path, monkeypatch
):
    """GReg and gmp prune filters and units: the producers' outputs that the trace finds, not
    the pixels and inputs that the module's ``gate_placements`` give the L0 methods."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    config = fashion_config("greg1", "pixel_mlp", **{**GREG_WEIGHTS, "greg_granularity": "filter"})
    config.epochs = None
    summary = train_and_evaluate(config, tmp_path / "greg")
    assert summary["gate_slots"] == ["fc1", "fc2"]
    assert summary["greg/widths"] == {"fc1": 15, "fc2": 5}
    config = fashion_config("gmp", "pixel_mlp", **GMP, gmp_structure="unit")
    summary = train_and_evaluate(config, tmp_path / "gmp")
    assert set(summary["gmp/sparsity"]) == {"fc1", "fc2"}


def placements_as_text(*, rngs, num_classes):
    net = PixelMLP(rngs=rngs, num_classes=num_classes)
    net.gate_placements = ("fc1:input",)
    return net


def test_placements_that_are_not_gate_placements_are_one_line(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    with pytest.raises(ConfigError, match=r"gate_placements must be a tuple of "
                       r"sparsejax.GatePlacement\(slot, layer, side\), got \('fc1:input',\)"):
        build_any_model(f"{THIS_MODULE}:placements_as_text", rngs=nnx.Rngs(0), num_classes=10,
                        input_shape=MNIST_SHAPE)


# ---------------------------------------------------------------- specs and their errors


def test_a_spec_loads_the_factory_and_names_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "user_models.py").write_text(
        "from flax import nnx\n"
        "def positional(rngs, num_classes, width):\n    pass\n"
        "def to_features(*, rngs, num_classes):\n    return nnx.Linear(784, 32, rngs=rngs)\n"
        "def not_a_module(*, rngs, num_classes):\n    return 3\n"
        "def with_dropout(*, rngs, num_classes):\n    return nnx.Dropout(0.5, rngs=rngs)\n"
        "CONSTANT = 1\n"
    )
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert load_factory(f"{THIS_MODULE}:mixer").__name__ == "mixer"
    for spec, message in [
        ("no_such_module:f", "cannot import module 'no_such_module'"),
        ("user_models:missing", "has no attribute 'missing'"),
        ("user_models:CONSTANT", "has no callable 'CONSTANT'"),
        ("user_models:positional", "cannot be called as positional(*, rngs, num_classes)"),
        ("resnet21", "unknown model 'resnet21'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_any_model(spec, rngs=nnx.Rngs(0), num_classes=10, input_shape=MNIST_SHAPE)
    with pytest.raises(ConfigError, match=r"not logits of shape \(batch, 10\)"):
        build_any_model("user_models:to_features", rngs=nnx.Rngs(0), num_classes=10,
                        input_shape=(784,))
    with pytest.raises(ConfigError, match="fails on images of shape"):
        build_any_model("user_models:to_features", rngs=nnx.Rngs(0), num_classes=10,
                        input_shape=MNIST_SHAPE)
    with pytest.raises(ConfigError, match="keeps random-number state"):
        build_any_model("user_models:with_dropout", rngs=nnx.Rngs(0), num_classes=10,
                        input_shape=MNIST_SHAPE)
    with pytest.raises(ConfigError, match="returned an object of type int, not a Flax NNX module"):
        build_any_model("user_models:not_a_module", rngs=nnx.Rngs(0), num_classes=10,
                        input_shape=MNIST_SHAPE)


class TransposedKernels(nnx.Module):
    """Dense layers stored (out, in), as PyTorch stores them, applied as x @ W.T; with
    ``split``, the first stored (2, hidden / 2, in): outputs first on two axes."""

    def __init__(self, *, rngs, num_classes, hidden=12, split=False):
        shape = (2, hidden // 2, 784) if split else (hidden, 784)
        self.w1 = nnx.Param(jax.random.normal(rngs.params(), shape) / 28)
        self.w2 = nnx.Param(jax.random.normal(rngs.params(), (num_classes, hidden)))

    def __call__(self, x):
        flat = x.reshape(x.shape[0], -1)
        h = jnp.einsum("bi,...i->b...", flat, self.w1[...]).reshape(x.shape[0], -1)
        return nnx.relu(h) @ self.w2[...].T


def test_matrices_stored_outputs_first_are_layers_read_transposed():
    """Closing 4 of the 12 hidden units removes their rows of ``w1`` (stored first) and
    columns of ``w2`` in the counts, the dead-unit kernels and the logits."""
    net = TransposedKernels(rngs=nnx.Rngs(params=0), num_classes=10)
    model = TracedModel(net, rngs=nnx.Rngs(params=1), input_shape=MNIST_SHAPE, num_classes=10)
    assert [(l.name, l.kernel_shape, l.kernel_axes) for l in model.layers] == [
        ("w1", (784, 12), (1, 0)), ("w2", (12, 10), (1, 0))]
    keep = np.ones(12, np.float32)
    keep[[0, 3, 5, 11]] = 0.0
    counts = count_network(model.layers, {"w1": keep})
    assert float(counts["params"]) == 784 * 8 + 8 * 10
    np.testing.assert_array_equal(layer_kernels(model)["w1"], np.asarray(net.w1[...]).T)
    x = jax.random.normal(jax.random.key(0), (3, *MNIST_SHAPE))
    kept = np.flatnonzero(keep)
    narrow = TransposedKernels(rngs=nnx.Rngs(params=0), num_classes=10, hidden=8)
    narrow.w1[...], narrow.w2[...] = net.w1[...][kept], net.w2[...][:, kept]
    np.testing.assert_allclose(model.forward(x, {"w1": jnp.asarray(keep)}, train=False),
                               narrow(x), rtol=1e-5, atol=1e-5)


def test_a_kernel_stored_outputs_first_on_several_axes_is_refused_with_its_layout():
    net = TransposedKernels(rngs=nnx.Rngs(params=0), num_classes=10, split=True)
    with pytest.raises(ConfigError, match=r"layer 'w1' has a kernel of shape \(2, 6, 784\) whose "
                       r"outputs are on axes \[0, 1\]; .* laid out \(\.\.\., inputs, outputs\)"):
        TracedModel(net, rngs=nnx.Rngs(params=0), input_shape=MNIST_SHAPE, num_classes=10)


def test_a_product_over_more_unit_combinations_than_the_accounting_holds_is_refused(monkeypatch):
    import sparsejax.structure.traced_model as traced_model

    combinations = 4  # Q K^T spans the 4 heads by the 4 query/key dimensions: a (4, 4) layer
    monkeypatch.setattr(traced_model, "MAX_PRODUCT_UNITS", combinations - 1)
    with pytest.raises(ConfigError, match=rf"product 0 of two activations .* {combinations} unit "
                       "combinations\\) cannot be counted"):
        traced(CASES["vit"])
    monkeypatch.setattr(traced_model, "MAX_PRODUCT_UNITS", combinations)
    assert len(traced(CASES["vit"]).activation_products) == 2
