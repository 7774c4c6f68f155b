"""Slimming from the trace on models the package has never seen: the slim function computes the
gated model's evaluation outputs, its arrays shrink as the gates say, it is saved and loaded
without the model's class, and ``round_to`` gives multiples."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.models import LeNet5
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure.slim_trace import load_slim_function, slim_traced
from sparsejax.structure.slim_trace.zeros import read_rows
from sparsejax.structure.sparsify import sparsify
from sparsejax.structure.trace import trace_structure
from sparsejax.structure.traced_model import TracedModel
from tests.commands import command_env
from tests.structure.test_trace import (
    EmbeddedMLP,
    FusedAttention,
    GroupedQueryAttention,
    Reparametrised,
    RotaryAttention,
)


class BranchCNN(nnx.Module):
    """A BN'd stem, two branches concatenated (6 + 4 channels), a residual block with a 1x1
    projection shortcut, global average pooling and a dense head."""

    def __init__(self, rngs: nnx.Rngs):
        conv = lambda i, o, k: nnx.Conv(i, o, (k, k), rngs=rngs)  # noqa: E731
        bn = lambda c: nnx.BatchNorm(c, rngs=rngs)  # noqa: E731
        self.stem, self.stem_bn = conv(3, 8, 3), bn(8)
        self.a, self.a_bn = conv(8, 6, 3), bn(6)
        self.b, self.b_bn = conv(8, 4, 1), bn(4)
        self.c1, self.c1_bn = conv(10, 12, 3), bn(12)
        self.c2, self.c2_bn = conv(12, 12, 3), bn(12)
        self.proj, self.proj_bn = conv(10, 12, 1), bn(12)
        self.head = nnx.Linear(12, 5, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.stem_bn(self.stem(x)))
        h = nnx.relu(jnp.concatenate([self.a_bn(self.a(h)), self.b_bn(self.b(h))], axis=-1))
        r = nnx.relu(self.c1_bn(self.c1(h)))
        h = nnx.relu(self.c2_bn(self.c2(r)) + self.proj_bn(self.proj(h)))
        return self.head(h.mean(axis=(1, 2)))


class DepthwiseSeparable(nnx.Module):
    """Expand 1x1 (BN, relu6), depthwise 3x3 (BN, relu6), project 1x1 (BN), pool, dense."""

    def __init__(self, rngs: nnx.Rngs):
        self.expand = nnx.Conv(4, 12, (1, 1), rngs=rngs)
        self.bn1 = nnx.BatchNorm(12, rngs=rngs)
        self.depthwise = nnx.Conv(12, 12, (3, 3), feature_group_count=12, rngs=rngs)
        self.bn2 = nnx.BatchNorm(12, rngs=rngs)
        self.project = nnx.Conv(12, 6, (1, 1), rngs=rngs)
        self.bn3 = nnx.BatchNorm(6, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu6(self.bn1(self.expand(x)))
        h = nnx.relu6(self.bn2(self.depthwise(h)))
        return self.head(self.bn3(self.project(h)).mean(axis=(1, 2)))


class Mixer(nnx.Module):
    """MLP-Mixer: 4x4 patches of an 8x8 image (4 tokens of 8 channels) reshaped to tokens,
    one block of token mixing (hidden 10) and channel mixing (hidden 12), LayerNorms, mean over
    tokens, dense head."""

    def __init__(self, rngs: nnx.Rngs):
        self.patch = nnx.Conv(3, 8, (4, 4), strides=(4, 4), rngs=rngs)
        self.norm1, self.norm2, self.norm3 = (nnx.LayerNorm(8, rngs=rngs) for _ in range(3))
        self.token1, self.token2 = nnx.Linear(4, 10, rngs=rngs), nnx.Linear(10, 4, rngs=rngs)
        self.channel1, self.channel2 = nnx.Linear(8, 12, rngs=rngs), nnx.Linear(12, 8, rngs=rngs)
        self.head = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        h = self.patch(x)
        h = h.reshape(h.shape[0], -1, h.shape[-1])
        t = jnp.swapaxes(self.norm1(h), 1, 2)
        h = h + jnp.swapaxes(self.token2(nnx.gelu(self.token1(t))), 1, 2)
        h = h + self.channel2(nnx.gelu(self.channel1(self.norm2(h))))
        return self.head(self.norm3(h).mean(axis=1))


class SortMLP(nnx.Module):
    """An MLP whose first hidden layer goes through ``jnp.sort`` (an op without a rule)."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1, self.l2 = nnx.Linear(6, 8, rngs=rngs), nnx.Linear(8, 7, rngs=rngs)
        self.l3 = nnx.Linear(7, 3, rngs=rngs)

    def __call__(self, x):
        h = jnp.sort(nnx.relu(self.l1(x)), axis=-1)
        return self.l3(nnx.tanh(self.l2(h)))


class ScanMLP(nnx.Module):
    """A dense layer, then three stacked 6x6 layers run by ``lax.scan``, then a dense head."""

    def __init__(self, rngs: nnx.Rngs):
        self.inp = nnx.Linear(5, 6, rngs=rngs)
        self.stack = nnx.Param(0.5 * jax.random.normal(rngs.params(), (3, 6, 6)))
        self.out = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        step = lambda h, w: (jnp.tanh(h @ w), None)  # noqa: E731
        h, _ = jax.lax.scan(step, self.inp(x), self.stack[...])
        return self.out(h)


class SliceMLP(nnx.Module):
    """A hidden layer cut by a slice (5 + 3 features, each read by its own layer) and one
    cut by ``jnp.split`` (two halves, summed after their own layers)."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1, self.l2 = nnx.Linear(6, 8, rngs=rngs), nnx.Linear(6, 10, rngs=rngs)
        self.a, self.b = nnx.Linear(5, 3, rngs=rngs), nnx.Linear(3, 3, rngs=rngs)
        self.c, self.d = nnx.Linear(5, 3, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.l1(x))
        first, second = jnp.split(nnx.tanh(self.l2(x)), 2, axis=-1)
        return self.a(h[:, :5]) + self.b(h[:, 5:]) + self.c(first) + self.d(second)


MODELS = {
    "branch_cnn": (BranchCNN, (2, 8, 8, 3)),
    "depthwise": (DepthwiseSeparable, (2, 6, 6, 4)),
    "mixer": (Mixer, (2, 8, 8, 3)),
    "sort_mlp": (SortMLP, (2, 6)),
    "scan_mlp": (ScanMLP, (3, 5)),
    "slice_mlp": (SliceMLP, (2, 6)),
}


def _randomise(model: nnx.Module, key: jax.Array) -> None:
    """Non-trivial running statistics, normaliser scales and biases, so that slicing any of
    them wrongly shows."""
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable) or path[-1] not in ("mean", "var", "scale", "bias"):
            continue
        key, sub = jax.random.split(key)
        shape = var[...].shape
        if path[-1] in ("var", "scale"):
            var.set_value(jax.random.uniform(sub, shape, minval=0.5, maxval=1.5))
        else:
            var.set_value(0.3 * jax.random.normal(sub, shape))


@functools.cache
def _gated(name: str, seed: int = 0):
    """The model gated by ``sparsify``, with random gates: log_alpha in [-3, 3] gives test
    gates of 0 (closed), in (0, 1), and 1; returns it with a random input batch (built once:
    slimming changes neither)."""
    cls, shape = MODELS[name]
    model = cls(nnx.Rngs(seed))
    _randomise(model, jax.random.key(seed + 1))
    x = jax.random.normal(jax.random.key(seed + 2), shape)
    gated = sparsify(model, x, rngs=seed)
    key = jax.random.key(seed + 3)
    for gate in gated.gates:
        key, sub = jax.random.split(key)
        gate.log_alpha.set_value(jax.random.uniform(sub, gate.log_alpha[...].shape, minval=-3,
                                                    maxval=3))
    return gated, x


def _reference(gated, x, apply=lambda m, x: m(x)):
    """The gated model's evaluation outputs (on a copy: the cached model keeps its mode)."""
    graphdef, state = nnx.split(gated)
    evaluated = nnx.merge(graphdef, state)
    evaluated.eval()
    return nnx.jit(apply)(evaluated, x)


def _relative(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _open(gated) -> dict[int, np.ndarray]:
    return {i: np.asarray(g.test_gate()) > 0 for i, g in zip(gated.group_indices, gated.gates)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_slim_equals_gated_eval_and_shrinks(name):
    gated, x = _gated(name)
    reference = _reference(gated, x)
    slim = gated.slim(x, check=x)
    assert _relative(slim(x), reference) < 1e-5
    assert slim.report.max_logit_difference == pytest.approx(
        float(jnp.max(jnp.abs(slim(x) - reference))))
    # A bigger batch than traced: the batch size is free.
    big = jnp.concatenate([x, x + 1.0], axis=0)
    assert _relative(slim(big), _reference(gated, big)) < 1e-5

    opened = _open(gated)
    structure = gated.structure
    shapes = {".".join(map(str, path)): v[...].shape
              for path, v in nnx.to_flat_state(nnx.state(gated.model))}
    assert any(not m.all() for m in opened.values()), "the random gates close some units"
    by_index = {g.index: g for g in slim.report.groups}
    for group in structure.groups:
        report = by_index[group.index]
        expected = int(opened[group.index].sum()) if group.removable else group.size
        assert report.width == expected, (group.producers, report)
        if not group.removable:
            continue
        for member in group.members:  # every slice of the group lost the closed units
            kept = np.isin(np.arange(group.size), np.flatnonzero(opened[group.index]))
            removed = sum(not kept[u] for u in member.units)
            original = shapes[member.path][member.axis]
            assert slim.params[member.path].shape[member.axis] == original - removed
    kept = {i: m.astype(float) for i, m in opened.items()}  # the gated groups are removable
    assert slim.report.params_after == structure.count(kept).params
    assert slim.report.flops_after == structure.count(kept).flops
    assert slim.report.params_before == structure.count().params


def test_slim_traced_folds_gate_values_given_per_group():
    """``slim_traced(..., gates=...)`` on the plain model, without ``sparsify``'s slimming: the
    units of zero gates go and the others' values are folded, to the gated outputs."""
    gated, x = _gated("branch_cnn")
    values = {i: gate.test_gate() for i, gate in zip(gated.group_indices, gated.gates)}
    slim = slim_traced(gated.model, x, structure=gated.structure, gates=values)
    assert _relative(slim(x), _reference(gated, x)) < 1e-5
    widths = {g.index: g.width for g in slim.report.groups}
    for index, opened in _open(gated).items():
        assert widths[index] == opened.sum()


def test_groups_of_unknown_ops_and_normalisers_stay_whole():
    gated, x = _gated("sort_mlp")
    slim = gated.slim(x)
    first = next(g for g in slim.report.groups if g.producers == ("l1.kernel:1",))
    assert first.width == first.size == 8 and "sort" in first.status
    assert slim.params["l1.kernel"].shape == (6, 8)

    gated, x = _gated("mixer")
    slim = gated.slim(x)
    channels = next(g for g in slim.report.groups if "patch.kernel:3" in g.producers)
    assert channels.width == channels.size == 8 and "reduction over units" in channels.status
    hidden = [g for g in slim.report.groups if g.producers in (("token1.kernel:1",),
                                                               ("channel1.kernel:1",))]
    assert len(hidden) == 2 and all(g.status == "slimmed" for g in hidden)


@pytest.mark.parametrize("name", ["branch_cnn", "mixer"])
def test_round_to_gives_multiples_and_same_outputs(name):
    gated, x = _gated(name)
    slim = gated.slim(x, round_to=4)
    assert _relative(slim(x), _reference(gated, x)) < 1e-5
    opened = _open(gated)
    for group in slim.report.groups:
        if group.status == "slimmed":
            assert group.width % 4 == 0 or group.width == group.size, group
            assert group.width >= int(opened[group.index].sum())
            assert group.width == min(group.size, -(-int(opened[group.index].sum()) // 4) * 4)
    assert slim.report.round_to == 4


def test_round_to_adds_the_most_likely_units():
    model = SortMLP(nnx.Rngs(0))
    x = jnp.ones((2, 6))
    structure = trace_structure(model, x)
    (index,) = structure.groups_of("l2.kernel", 1)
    keep = {index: np.array([1, 0, 0, 0, 0, 0, 1], bool)}
    scores = {index: np.array([0, 0.1, 0.9, 0.2, 0.8, 0.3, 0])}
    slim = slim_traced(model, x, keep=keep, scores=scores, round_to=4)
    # Kept units 0, 6 and the two most likely closed ones, 2 and 4, in their original order.
    expected = np.asarray(model.l2.kernel[...])[:, [0, 2, 4, 6]]
    np.testing.assert_array_equal(slim.params["l2.kernel"], expected)
    with pytest.raises(ConfigError, match="round_to"):
        slim_traced(model, x, keep=keep, round_to=0)
    with pytest.raises(ConfigError, match="group 7"):
        slim_traced(model, x, keep={7: np.ones(3, bool)})
    with pytest.raises(ConfigError, match="one value per unit"):
        slim_traced(model, x, keep={index: np.ones(3, bool)})


def test_save_and_load_without_the_model_classes(tmp_path):
    inputs, outputs = {}, {}
    for name in sorted(MODELS):
        gated, x = _gated(name)
        slim = gated.slim(x, round_to=2, check=x)
        slim.save(str(tmp_path / f"{name}.npz"))
        x3 = jnp.concatenate([x, x[:1] * 2.0], axis=0)  # a batch size never traced
        np.save(tmp_path / f"{name}_x.npy", np.asarray(x3))
        inputs[name], outputs[name] = x3, slim(x3)
    script = (
        "import json, sys, numpy as np\n"
        "from sparsejax.structure.slim_trace import load_slim_function\n"
        "d = sys.argv[1]\n"
        "for name in sys.argv[2:]:\n"
        "    slim = load_slim_function(f'{d}/{name}.npz')\n"
        "    np.save(f'{d}/{name}_out.npy', np.asarray(slim(np.load(f'{d}/{name}_x.npy'))))\n"
        "    json.dump(slim.report.to_dict(), open(f'{d}/{name}.json', 'w'))\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", script, str(tmp_path), *sorted(MODELS)], check=True,
                   cwd=root, env=command_env(str(root)))
    for name in sorted(MODELS):
        loaded = np.load(tmp_path / f"{name}_out.npy")
        np.testing.assert_allclose(loaded, outputs[name], rtol=1e-5, atol=1e-6)
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["round_to"] == 2 and report["max_logit_difference"] is not None


def test_lenet5_from_the_zoo():
    model = LeNet5(rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    gated = sparsify(model, x, rngs=0)
    key = jax.random.key(1)
    for gate in gated.gates:
        key, sub = jax.random.split(key)
        gate.log_alpha.set_value(jax.random.uniform(sub, gate.log_alpha[...].shape, minval=-3,
                                                    maxval=3))
    slim = gated.slim(x, check=x)
    assert _relative(slim(x), _reference(gated, x)) < 1e-5
    widths = {g.producers: g.width for g in slim.report.groups}
    opened = _open(gated)
    conv2 = gated.structure.groups_of("conv2.kernel", 3)[0]
    assert widths[("conv2.kernel:3",)] == int(opened[conv2].sum()) < 50
    # fc1 reads conv2's kept channels at 16 positions each.
    assert slim.params["fc1.kernel"].shape[0] == 16 * int(opened[conv2].sum())


class Attention(nnx.Module):
    """Flax multi-head self-attention (2 heads of 4) in a residual stream, LayerNorm, mean over
    tokens, dense head."""

    def __init__(self, rngs: nnx.Rngs):
        self.inp = nnx.Linear(5, 8, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        h = self.inp(x)
        h = h + self.attention(h)
        return self.out(self.norm(h).mean(axis=1))


def test_attention_loses_a_head_and_head_dims():
    model = Attention(nnx.Rngs(0))
    _randomise(model, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (2, 4, 5))
    gated = sparsify(model, x)
    closed = {  # producers -> the units to close; the others are set in (0, 1]
        ("attention.query.kernel", 1): [1],  # head 1 (with its value and output rows)
        ("attention.query.kernel", 2): [0],  # query/key dimension 0 of every head
        ("attention.value.kernel", 2): [2, 3],  # value dimensions 2 and 3
    }
    for index, gate in zip(gated.group_indices, gated.gates):
        producers = gated.structure.groups[index].producers
        log_alpha = jnp.linspace(0.0, 3.0, gate.log_alpha[...].size)
        shut = next((units for p, units in closed.items() if p in producers), [])
        gate.log_alpha.set_value(log_alpha.at[jnp.asarray(shut, int)].set(-10.0))
    slim = gated.slim(x)
    assert _relative(slim(x), _reference(gated, x)) < 1e-5
    assert slim.params["attention.query.kernel"].shape == (8, 1, 3)
    assert slim.params["attention.key.bias"].shape == (1, 3)
    assert slim.params["attention.value.kernel"].shape == (8, 1, 2)
    assert slim.params["attention.out.kernel"].shape == (1, 2, 8)


class FlatAttention(nnx.Module):
    """Attention as it is often written by hand: flat ``(dim, heads * head_dim)`` projections
    reshaped into 2 heads of 4, head-major, so that a head is no traced group of its own."""

    def __init__(self, rngs: nnx.Rngs):
        self.q, self.k, self.v, self.o = (nnx.Linear(8, 8, rngs=rngs) for _ in range(4))
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        batch, length, _ = x.shape
        q, k, v = (layer(x).reshape(batch, length, 2, 4) for layer in (self.q, self.k, self.v))
        weights = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / 2.0, axis=-1)
        heads = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(batch, length, 8)
        return self.out((x + self.o(heads)).mean(axis=1))


@pytest.mark.parametrize("closed", [("q",), ("v",), ("q", "v")])
def test_a_flat_attention_loses_a_whole_head(closed):
    """Closing every query/key or value column of head 1 removes the head from the projections
    (the product's head dimension, which no unit labels, gets the removed head back as zeros
    where the gated network has zero scores), with the same outputs."""
    model = FlatAttention(nnx.Rngs(0))
    _randomise(model, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (2, 5, 8))
    gated = sparsify(model, x)
    for index, gate in zip(gated.group_indices, gated.gates):
        layer = gated.structure.groups[index].producers[0][0].split(".")[0]
        log_alpha = jnp.full(gate.log_alpha[...].shape, 3.0)
        if layer in closed:
            log_alpha = log_alpha.at[4:].set(-10.0)
        gate.log_alpha.set_value(log_alpha)
    slim = gated.slim(x)
    assert _relative(slim(x), _reference(gated, x)) < 1e-5
    widths = {name: 4 if name in closed or (name == "k" and "q" in closed) else 8
              for name in ("q", "k", "v")}
    widths["o"] = widths["v"]
    for name, width in widths.items():
        axis = 0 if name == "o" else 1
        assert slim.params[f"{name}.kernel"].shape[axis] == width, name


def _slim_with_heads_closed(model: nnx.Module, closed_heads: tuple[int, ...]):
    """The slim function of ``model`` (inputs of 6 features) under ``sparsify``'s gates with
    every unit of ``closed_heads`` (by :meth:`TracedStructure.heads`) closed and the others
    open, checked to give the gated logits."""
    _randomise(model, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (2, 5, 6))
    gated = sparsify(model, x)
    for index, gate in zip(gated.group_indices, gated.gates):
        heads = (gated.structure.heads(index) or (np.full(gate.log_alpha.shape, -1),))[0]
        gate.log_alpha.set_value(jnp.where(np.isin(heads, closed_heads), -10.0, 3.0))
    slim = gated.slim(x)
    assert _relative(slim(x), _reference(gated, x)) < 1e-5
    return slim


def _kernel_shapes(slim, names=("q", "k", "v", "o")) -> dict[str, tuple[int, ...]]:
    return {name: slim.params[f"{name}.kernel"].shape for name in names}


def test_grouped_query_attention_loses_a_key_value_group():
    """Closing key/value group 1 (its key and value columns) removes its two query heads'
    columns and output-projection rows with it."""
    slim = _slim_with_heads_closed(GroupedQueryAttention(rngs=nnx.Rngs(0)), (1,))
    assert _kernel_shapes(slim) == {"q": (6, 4), "k": (6, 2), "v": (6, 2), "o": (4, 6)}


def test_grouped_query_attention_loses_every_key_value_group():
    """With both groups closed every query, key and value column goes (the query heads of a
    group share its units: their axis is no unit's to narrow), and what is left is constant,
    folded into the head's bias, with the gated logits."""
    slim = _slim_with_heads_closed(GroupedQueryAttention(rngs=nnx.Rngs(0)), (0, 1))
    assert set(slim.params) == {"head.bias"}


@pytest.mark.parametrize("closed_heads", [(), (1,)])
def test_a_fused_attention_keeps_its_open_queries_and_loses_a_closed_head(closed_heads):
    """One group holds a fused projection's queries/keys (read by the scores alone) and values
    (read by the output projection): the gates of the queries and keys act on their query
    columns, so open ones stay; a closed head leaves all three parts of the projection."""
    slim = _slim_with_heads_closed(FusedAttention(rngs=nnx.Rngs(0)), closed_heads)
    width = 12 - 6 * len(closed_heads)
    assert _kernel_shapes(slim, ("qkv", "o")) == {"qkv": (6, width), "o": (width // 3, 6)}


def test_a_rotary_attention_loses_a_whole_head():
    """Head 1 closed (its query/key units, tied in rotary pairs, and its value units) leaves
    every projection; the logits stay."""
    slim = _slim_with_heads_closed(RotaryAttention(rngs=nnx.Rngs(0)), (1,))
    assert _kernel_shapes(slim) == {"q": (6, 4), "k": (6, 4), "v": (6, 4), "o": (4, 6)}


def test_save_and_load_keep_bfloat16_parameters(tmp_path):
    model = nnx.Linear(6, 3, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    x = jnp.arange(12, dtype=jnp.bfloat16).reshape(2, 6)
    slim = slim_traced(model, x)
    slim.save(str(tmp_path / "bf16.npz"))
    loaded = load_slim_function(str(tmp_path / "bf16.npz"))
    assert loaded.params["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded.params["kernel"], model.kernel[...])
    np.testing.assert_array_equal(loaded(x), model(x))


class SharedStem(nnx.Module):
    """A stem on the flattened input, read by two heads: one through its own BatchNorm and
    ReLU (a pre-activation layer, as in DenseNet), one directly."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Linear(6, 10, rngs=rngs)
        self.bn = nnx.BatchNorm(10, rngs=rngs)
        self.own = nnx.Linear(10, 4, rngs=rngs)
        self.other = nnx.Linear(10, 4, rngs=rngs)

    def __call__(self, x):
        h = self.stem(x.reshape(x.shape[0], -1))
        return self.own(nnx.relu(self.bn(h))) + self.other(h)


def _zero_rows(kernel: nnx.Variable, keep: np.ndarray) -> None:
    kernel.set_value(kernel[...] * jnp.asarray(keep, kernel[...].dtype)[:, None])


def test_dropped_rows_leave_their_products_and_the_chain_only_they_read():
    """Rows of units that stay (the input's pixels; stem outputs another head reads whole)
    go from their kernel; the pixels are gathered before the stem, and the head's own
    BatchNorm loses the same entries, while the stem and the other head keep all ten."""
    model = SharedStem(nnx.Rngs(0))
    _randomise(model, jax.random.key(1))
    pixels = np.array([1, 0, 1, 1, 0, 1], bool)
    own = np.array([1, 1, 0, 1, 1, 0, 1, 0, 1, 1], bool)
    _zero_rows(model.stem.kernel, pixels)
    _zero_rows(model.own.kernel, own)
    x = jax.random.normal(jax.random.key(2), (5, 2, 3))
    model.eval()
    reference = model(x)
    model.train()
    slim = slim_traced(model, x, rows={"stem.kernel": (0, pixels), "own.kernel": (0, own)})
    np.testing.assert_allclose(slim(x), reference, rtol=1e-6, atol=1e-6)
    shapes = {path: tuple(value.shape) for path, value in slim.params.items()}
    assert shapes["stem.kernel"] == (4, 10)
    assert shapes["own.kernel"] == (7, 4)
    assert shapes["other.kernel"] == (10, 4)
    for name in ("scale", "bias", "mean", "var"):
        assert shapes[f"bn.{name}"] == (7,)
    report = slim.report
    assert report.rows == {"stem.kernel": [4, 6], "own.kernel": [7, 10]}
    assert report.params_before - report.params_after == 2 * 10 + 3 * 4
    assert report.flops_before - report.flops_after == 2 * 10 + 3 * 4


class ReadTwice(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.dense(x) + jnp.sum(self.dense.kernel[...])


def test_rows_that_cannot_be_dropped_say_why():
    model = ReadTwice(nnx.Rngs(0))
    x = jnp.ones((2, 6))
    keep = np.array([1, 1, 0, 1, 1, 1], bool)
    with pytest.raises(ConfigError, match="reduce_sum reads a kernel whose rows are dropped"):
        slim_traced(model, x, rows={"dense.kernel": (0, keep)})
    with pytest.raises(ConfigError, match="one boolean per index of that axis"):
        slim_traced(model, x, rows={"dense.kernel": (1, keep)})
    with pytest.raises(ConfigError, match="give a floating state array"):
        slim_traced(model, x, rows={"dense.weights": (0, keep)})
    with pytest.raises(ConfigError, match="replaced names 'dense.bias', which is no floating"):
        slim_traced(model, x, replaced={"dense.bias": np.zeros(4)})


class DeadUnits(nnx.Module):
    """conv (6, BatchNorm, ReLU) - max pool - flatten - fc1 (8, sigmoid or ReLU) - fc2."""

    def __init__(self, rngs: nnx.Rngs, activation=nnx.relu):
        self.conv = nnx.Conv(1, 6, (3, 3), padding="VALID", rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.fc1 = nnx.Linear(6 * 4 * 4, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 3, rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        h = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), (2, 2))
        return self.fc2(self.activation(self.fc1(h.reshape(h.shape[0], -1))))


def _killed(activation=nnx.relu) -> DeadUnits:
    """Channel 2 dead from its filter and bias (BatchNorm mean 0 and bias 0 keep it 0), channel
    4 through its BatchNorm's scale and bias; channels 1 and 3 dead from their filters but
    shifted by a running mean of 0.5 and -0.5: after ReLU, 1 is 0 and 3 the constant 0.5 (up to
    the BatchNorm's epsilon); hidden unit 5 dead from its inputs and bias, so the constant
    ``activation(0)``."""
    model = DeadUnits(nnx.Rngs(0), activation)
    conv, bn, fc1 = model.conv, model.bn, model.fc1
    conv.kernel.set_value(conv.kernel[...].at[..., (1, 2, 3)].set(0.0))
    conv.bias.set_value(conv.bias[...].at[jnp.array([1, 2, 3])].set(0.0))
    bn.mean.set_value(bn.mean[...].at[jnp.array([1, 3])].set(jnp.array([0.5, -0.5])))
    bn.scale.set_value(bn.scale[...].at[4].set(0.0))
    bn.bias.set_value(bn.bias[...].at[4].set(0.0))
    fc1.kernel.set_value(fc1.kernel[...].at[:, 5].set(0.0))
    fc1.bias.set_value(fc1.bias[...].at[5].set(0.0))
    return model


def test_rows_that_only_ever_meet_zeros_or_one_constant_are_found_through_the_network():
    reads = read_rows(_killed(), jnp.ones((1, 10, 10, 1)))
    channel = np.arange(96) % 6
    np.testing.assert_array_equal(reads.met[("fc1.kernel", 0)], np.isin(channel, (0, 3, 5)))
    np.testing.assert_array_equal(reads.met[("fc2.kernel", 0)], np.arange(8) != 5)
    assert reads.met[("conv.kernel", 2)].all()
    constant, values = reads.constant[("fc1.kernel", 0)]
    np.testing.assert_array_equal(constant, np.isin(channel, (1, 2, 3, 4)))
    np.testing.assert_allclose(values[channel == 3], 0.5, rtol=1e-5)
    assert not values[np.isin(channel, (1, 2, 4))].any()
    assert ("conv.kernel", 2) not in reads.constant  # a convolution absorbs nothing
    sigmoid = read_rows(_killed(nnx.sigmoid), jnp.ones((1, 10, 10, 1)))
    assert sigmoid.met[("fc2.kernel", 0)].all()  # sigmoid(0) = 1/2: unit 5 still reaches fc2
    constant, values = sigmoid.constant[("fc2.kernel", 0)]
    np.testing.assert_array_equal(constant, np.arange(8) == 5)
    assert values[5] == 0.5


@pytest.mark.parametrize("path", ["traced_model", "sparsify"])
@pytest.mark.parametrize("activation", [nnx.relu, nnx.sigmoid])
def test_units_that_only_output_zeros_or_a_constant_slim_away_with_the_same_logits(
    activation, path
):
    """Dead units whose readers' rows are not zero: slimming removes them exactly, a constant
    channel by folding it into the dense reader's bias, and so the hidden unit whose
    sigmoid(0) = 1/2 reaches fc2; a ``--model`` run's slimming and ``Sparsified.slim`` alike
    (the latter's gates all open at their initial test-time value)."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, 10, 10, 1)))
    if path == "sparsify":
        gated = sparsify(_killed(activation), x, rngs=1)
        slim = gated.slim(x, check=x)
        model = gated.model
    else:
        model = TracedModel(_killed(activation), rngs=nnx.Rngs(1), input_shape=(10, 10, 1),
                            num_classes=3)
        slim = slim_traced_model(model, x)
        model = model.net
    assert slim.params["conv.kernel"].shape == (3, 3, 1, 2)
    assert slim.params["bn.mean"].shape == (2,)
    assert slim.params["fc1.kernel"].shape == (32, 7)
    assert slim.params["fc2.kernel"].shape == (7, 3)
    assert slim.report.max_logit_difference < 1e-5
    np.testing.assert_array_equal(model.fc1.bias[...], _killed(activation).fc1.bias[...])


class HalfPrecision(nnx.Module):
    """Two bfloat16 dense layers with Python scalars between them."""

    def __init__(self, rngs: nnx.Rngs):
        kinds = {"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16}
        self.first = nnx.Linear(6, 5, rngs=rngs, **kinds)
        self.second = nnx.Linear(5, 3, rngs=rngs, **kinds)

    def __call__(self, x):
        return self.second(nnx.relu(self.first(x) * 2.0 + 1.0))


def test_a_bfloat16_model_is_read_in_its_own_dtype():
    """The abstract run evaluates the bfloat16 program as it is, Python scalars included:
    unit 1, its filter and bias zero, outputs relu(0 * 2 + 1) = 1 for every input."""
    model = HalfPrecision(nnx.Rngs(0))
    model.first.kernel.set_value(model.first.kernel[...].at[:, 1].set(0))
    model.first.bias.set_value(model.first.bias[...].at[1].set(0))
    reads = read_rows(model, jnp.ones((1, 6), jnp.bfloat16))
    constant, values = reads.constant[("second.kernel", 0)]
    np.testing.assert_array_equal(constant, np.arange(5) == 1)
    assert values[1] == 1.0 and reads.met[("second.kernel", 0)].all()


class ConstantReaders(nnx.Module):
    """conv1 (4) - ReLU - conv2 (3, SAME) and a dense layer without bias, both reading conv1's
    channels; the mean over positions into a head."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(4, 3, (3, 3), rngs=rngs)
        self.plain = nnx.Linear(4, 3, use_bias=False, rngs=rngs)
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.conv1(x))
        return self.head(self.conv2(h).mean(axis=(1, 2)) + self.plain(h).mean(axis=(1, 2)))


def test_a_constant_read_by_a_convolution_or_a_dense_layer_without_bias_stays():
    """A convolution's zero padding makes a constant input channel's contribution vary at the
    borders, and a layer without bias has nowhere to put it: the channel stays."""
    model = ConstantReaders(nnx.Rngs(0))
    conv1 = model.conv1
    conv1.kernel.set_value(conv1.kernel[...].at[..., 1].set(0.0))
    conv1.bias.set_value(conv1.bias[...].at[1].set(0.7))
    reads = read_rows(model, jnp.ones((1, 6, 6, 1)))
    constant, values = reads.constant[("plain.kernel", 0)]
    np.testing.assert_array_equal(constant, np.arange(4) == 1)
    traced = TracedModel(model, rngs=nnx.Rngs(1), input_shape=(6, 6, 1), num_classes=2)
    slim = slim_traced_model(traced, np.asarray(jax.random.normal(jax.random.key(0),
                                                                  (3, 6, 6, 1))))
    assert slim.params["conv1.kernel"].shape == (3, 3, 1, 4)
    assert slim.report.max_logit_difference < 1e-5


def test_an_embedded_stream_loses_its_closed_columns_from_the_table():
    """Closed stream units go from the embedding table's columns too: the lookup takes what is
    left of each row."""
    ids = jax.random.randint(jax.random.key(0), (6, 5), 0, 50)
    gated = sparsify(EmbeddedMLP(rngs=nnx.Rngs(0)), ids)
    for gate in gated.gates:
        gate.log_alpha[...] = gate.log_alpha[...].at[::3].set(-10.0)
    slim = gated.slim(ids, check=ids)
    assert slim.params["embed.embedding"].shape == (50, 5)
    assert slim.params["head.kernel"].shape == (5, 50)
    assert slim.report.max_logit_difference < 1e-5


class TwoOutputs(nnx.Module):
    """An MLP that returns its logits and its first hidden layer's features (an auxiliary
    output): the features reach the output, so only the second hidden layer is prunable."""

    def __init__(self, rngs: nnx.Rngs):
        self.first = nnx.Linear(6, 8, rngs=rngs)
        self.second = nnx.Linear(8, 5, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        features = nnx.relu(self.first(x))
        return self.head(nnx.relu(self.second(features))), features


def test_a_model_with_several_outputs_slims_and_checks_every_one(tmp_path):
    """The check takes the largest difference over all outputs; saving and loading keep
    them as the model returns them."""
    x = jax.random.normal(jax.random.key(0), (4, 6))
    gated = sparsify(TwoOutputs(rngs=nnx.Rngs(0)), x)
    assert [g.size for g in gated.report().groups] == [5]
    gated.gates[0].log_alpha[...] = gated.gates[0].log_alpha[...].at[1].set(-10.0)
    slim = gated.slim(x, check=x)
    assert slim.params["second.kernel"].shape == (8, 4)
    gated.eval()
    outputs, expected = slim(x), gated(x)
    assert [o.shape for o in outputs] == [(4, 3), (4, 8)]
    largest = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(outputs, expected))
    assert slim.report.max_logit_difference == largest < 1e-5
    shifted = (expected[0], expected[1] + 0.5)  # a difference in the second output alone
    assert slim.check(shifted, x) == pytest.approx(0.5, abs=1e-5)
    slim.save(str(tmp_path / "two.npz"))
    loaded = load_slim_function(str(tmp_path / "two.npz"))(x)
    for got, want in zip(loaded, outputs):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_kernels_computed_from_their_parameters_take_no_gates_and_slim_unchanged():
    """sparsify reports the standardised and normalised layers' units as kept, with why; at
    weight granularity only the plain kernels take gates (a gate on the parameter of a
    standardised kernel would not zero its entry); slimming keeps the arrays and the outputs."""
    x = jax.random.normal(jax.random.key(0), (3, 6, 6, 1))
    gated = sparsify(Reparametrised(rngs=nnx.Rngs(0)), x)
    report = gated.report()
    assert len(gated.gates) == 0 and report.total_params == 237 + 14
    kept = {u.producers[0][0] for u in report.ungated if "computed from" in u.reason}
    assert kept == {"c1.kernel", "c2.kernel", "fc.kernel"}
    weights = TracedModel(Reparametrised(rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1),
                          input_shape=(6, 6, 1), num_classes=2, granularity="weight")
    assert [slot.name for slot in weights.gate_slots] == ["c1", "head"]
    slim = slim_traced_model(weights, np.asarray(x))
    assert slim.params["c2.kernel"].shape == (3, 3, 4, 5)
    assert slim.report.max_logit_difference < 1e-5
