"""Structure by tracing on small models written here: groups, members, blockers and counts.

Every expected count below is worked out by hand from the model's shapes with the accounting
conventions (kernel weights + layer biases; MACs per example, one per kernel weight per output
position).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.structure.trace import TracedStructure, UnitGroup, trace_structure
from sparsejax.structure.trace.walk import scan_sizes


def build(model_class, **kwargs):
    """An abstract instance: tracing reads shapes only, so nothing is initialised."""
    return nnx.eval_shape(lambda: model_class(rngs=nnx.Rngs(0), **kwargs))


def trace(model, shape, **kwargs) -> TracedStructure:
    return trace_structure(model, jax.ShapeDtypeStruct(shape, jnp.float32), **kwargs)


def group_of(structure: TracedStructure, path: str, axis: int) -> UnitGroup:
    (index,) = structure.groups_of(path, axis)
    return structure.groups[index]


def slices(group: UnitGroup) -> dict[tuple[str, int], tuple[int, ...]]:
    return {(m.path, m.axis): m.indices for m in group.members}


def full(*entries: tuple[str, int, int]) -> dict[tuple[str, int], tuple[int, ...]]:
    """Members that are a whole axis: (path, axis, size)."""
    return {(path, axis): tuple(range(size)) for path, axis, size in entries}


def keep_all_but(group: UnitGroup, removed: list[int]) -> np.ndarray:
    keep = np.ones(group.size)
    keep[removed] = 0.0
    return keep


def assert_counts(structure, keep, weights, biases, flops):
    counts = structure.count(keep)
    assert (counts.weights, counts.biases, counts.flops) == (weights, biases, flops)
    assert counts.params == weights + biases


class MLP(nnx.Module):
    """6-5-4-3 with a rematerialised activation (a sub-jaxpr of another kind)."""

    def __init__(self, *, rngs):
        self.fc1 = nnx.Linear(6, 5, rngs=rngs)
        self.fc2 = nnx.Linear(5, 4, rngs=rngs)
        self.fc3 = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        h = jax.checkpoint(nnx.relu)(self.fc1(x))
        return self.fc3(nnx.relu(self.fc2(h)))


def test_mlp_groups_are_the_hidden_neurons_and_the_logits_are_blocked():
    s = trace(build(MLP), (2, 6))
    assert [g.size for g in s.groups] == [5, 4, 3]
    assert [g.producers for g in s.groups] == [(("fc1.kernel", 1),), (("fc2.kernel", 1),),
                                               (("fc3.kernel", 1),)]
    assert slices(s.groups[0]) == full(("fc1.kernel", 1, 5), ("fc1.bias", 0, 5),
                                       ("fc2.kernel", 0, 5))
    assert slices(s.groups[1]) == full(("fc2.kernel", 1, 4), ("fc2.bias", 0, 4),
                                       ("fc3.kernel", 0, 4))
    assert [g.prunable for g in s.groups] == [True, True, False]
    assert s.groups[2].blockers[0].primitive == "output"
    assert s.groups_of("fc1.kernel", 0) == ()  # the input pixels are no group
    assert [(l.kernel, l.bias) for l in s.layers] == [
        ("fc1.kernel", "fc1.bias"), ("fc2.kernel", "fc2.bias"), ("fc3.kernel", "fc3.bias")]


def test_mlp_counts_dense_pruned_and_expected():
    s = trace(build(MLP), (2, 6))
    assert_counts(s, None, 6 * 5 + 5 * 4 + 4 * 3, 5 + 4 + 3, 6 * 5 + 5 * 4 + 4 * 3)
    two_fewer = keep_all_but(s.groups[0], [1, 3])
    assert_counts(s, {0: two_fewer}, 6 * 3 + 3 * 4 + 4 * 3, 3 + 4 + 3, 6 * 3 + 3 * 4 + 4 * 3)
    half = s.count({1: np.full(4, 0.5)})
    assert half.weights == 6 * 5 + 5 * 2 + 2 * 3
    assert half.biases == 5 + 2 + 3
    per_layer = s.layer_counts({0: two_fewer})
    assert [(c.kernel, c.weights, c.biases, c.macs) for c in per_layer] == [
        ("fc1.kernel", 18, 3, 18), ("fc2.kernel", 12, 4, 12), ("fc3.kernel", 12, 3, 12)]


class BranchCNN(nnx.Module):
    """stem conv-BN-ReLU read by two branches (3x3 and 1x1) that are summed, pooled, classified."""

    def __init__(self, *, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.wide = nnx.Conv(8, 6, (3, 3), rngs=rngs)
        self.narrow = nnx.Conv(8, 6, (1, 1), rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.stem(x)))
        h = nnx.relu(self.wide(h) + self.narrow(h))
        return self.head(jnp.mean(h, axis=(1, 2)))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_branches_read_the_stem_and_their_sum_couples_them(mode):
    model = build(BranchCNN)
    model.eval() if mode == "eval" else model.train()
    s = trace(model, (2, 8, 8, 3))
    stem, branches, head = s.groups
    assert stem.producers == (("stem.kernel", 3),)
    assert slices(stem) == full(
        ("stem.kernel", 3, 8), ("stem.bias", 0, 8), ("bn.scale", 0, 8), ("bn.bias", 0, 8),
        ("bn.mean", 0, 8), ("bn.var", 0, 8), ("wide.kernel", 2, 8), ("narrow.kernel", 2, 8))
    assert set(branches.producers) == {("wide.kernel", 3), ("narrow.kernel", 3)}
    assert slices(branches) == full(("wide.kernel", 3, 6), ("wide.bias", 0, 6),
                                    ("narrow.kernel", 3, 6), ("narrow.bias", 0, 6),
                                    ("head.kernel", 0, 6))
    # channel c of one branch is added to channel c of the other: the same unit
    assert branches.member("wide.kernel", 3).units == branches.member("narrow.kernel", 3).units
    assert stem.prunable and branches.prunable and not head.prunable


def test_branch_cnn_counts():
    s = trace(build(BranchCNN), (2, 8, 8, 3))
    stem, wide, narrow, head = 3 * 3 * 3 * 8, 3 * 3 * 8 * 6, 8 * 6, 6 * 3
    counts = s.count()
    assert counts.other_params == 2 * 8  # BatchNorm scale and bias
    assert_counts(s, None, stem + wide + narrow + head, 8 + 6 + 6 + 3,
                  (stem + wide + narrow) * 64 + head)
    stem, wide, narrow = 3 * 3 * 3 * 5, 3 * 3 * 5 * 6, 5 * 6
    assert_counts(s, {0: keep_all_but(s.groups[0], [0, 2, 7])}, stem + wide + narrow + head,
                  5 + 6 + 6 + 3, (stem + wide + narrow) * 64 + head)


class FlattenCNN(nnx.Module):
    """conv(3 -> 2) - max pool 2x2 - flatten (2 x 2 x 2) - dense 8 -> 3."""

    def __init__(self, *, rngs):
        self.conv = nnx.Conv(3, 2, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.max_pool(nnx.relu(self.conv(x)), (2, 2), strides=(2, 2))
        return self.fc(h.reshape(h.shape[0], -1))


def test_a_flattened_channel_is_a_block_of_dense_inputs():
    s = trace(build(FlattenCNN), (1, 4, 4, 3))
    conv = group_of(s, "conv.kernel", 3)
    assert conv.size == 2 and conv.prunable
    rows = conv.member("fc.kernel", 0)
    assert rows.indices == tuple(range(8))
    assert rows.units == (0, 1) * 4  # NHWC flattening puts the channel fastest
    assert_counts(s, None, 3 * 3 * 3 * 2 + 8 * 3, 2 + 3, 3 * 3 * 3 * 2 * 16 + 8 * 3)
    assert_counts(s, {conv.index: np.array([1.0, 0.0])}, 3 * 3 * 3 + 4 * 3, 1 + 3,
                  3 * 3 * 3 * 16 + 4 * 3)


class ResidualCNN(nnx.Module):
    """stem, an identity block and a block with a 1x1 projection shortcut (4 -> 6 channels)."""

    def __init__(self, *, rngs, sorted_branch: bool = False):
        conv = lambda i, o, k=3: nnx.Conv(i, o, (k, k), rngs=rngs)  # noqa: E731
        self.stem = conv(3, 4)
        self.a1, self.a2 = conv(4, 4), conv(4, 4)
        self.b1, self.b2, self.proj = conv(4, 6), conv(6, 6), conv(4, 6, 1)
        self.head = nnx.Linear(6, 2, rngs=rngs)
        self.sorted_branch = sorted_branch

    def __call__(self, x):
        h = self.stem(x)
        branch = self.a2(nnx.relu(self.a1(h)))
        if self.sorted_branch:
            branch = jnp.sort(branch, axis=-1)
        h = nnx.relu(h + branch)
        h = nnx.relu(self.proj(h) + self.b2(nnx.relu(self.b1(h))))
        return self.head(jnp.mean(h, axis=(1, 2)))


def test_residual_streams_couple_their_producers_and_readers():
    s = trace(build(ResidualCNN), (1, 6, 6, 3))
    first = group_of(s, "stem.kernel", 3)
    assert set(first.producers) == {("stem.kernel", 3), ("a2.kernel", 3)}
    assert set(slices(first)) == {
        ("stem.kernel", 3), ("stem.bias", 0), ("a2.kernel", 3), ("a2.bias", 0),
        ("a1.kernel", 2), ("b1.kernel", 2), ("proj.kernel", 2)}
    second = group_of(s, "proj.kernel", 3)
    assert set(second.producers) == {("proj.kernel", 3), ("b2.kernel", 3)}
    assert ("head.kernel", 0) in slices(second)
    assert [g.size for g in (first, second)] == [4, 6]
    assert group_of(s, "a1.kernel", 3).size == 4 and group_of(s, "b1.kernel", 3).size == 6
    assert len(s.groups) == 5 and sum(g.prunable for g in s.groups) == 4


def test_residual_counts_with_a_stream_channel_removed():
    s = trace(build(ResidualCNN), (1, 6, 6, 3))
    convs = [3 * 3 * 3 * 4, 3 * 3 * 4 * 4, 3 * 3 * 4 * 4, 3 * 3 * 4 * 6, 3 * 3 * 6 * 6, 4 * 6]
    assert_counts(s, None, sum(convs) + 12, 4 + 4 + 4 + 6 + 6 + 6 + 2, sum(convs) * 36 + 12)
    first = group_of(s, "stem.kernel", 3)
    convs = [3 * 3 * 3 * 3, 3 * 3 * 3 * 4, 3 * 3 * 4 * 3, 3 * 3 * 3 * 6, 3 * 3 * 6 * 6, 3 * 6]
    assert_counts(s, {first.index: keep_all_but(first, [2])}, sum(convs) + 12,
                  3 + 4 + 3 + 6 + 6 + 6 + 2, sum(convs) * 36 + 12)


class DenseBlock(nnx.Module):
    """stem (4 channels) and two layers of growth 2, each reading the concatenation so far."""

    def __init__(self, *, rngs):
        self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.layer1 = nnx.Conv(4, 2, (3, 3), rngs=rngs)
        self.layer2 = nnx.Conv(6, 2, (3, 3), rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        h = self.stem(x)
        h = jnp.concatenate([h, nnx.relu(self.layer1(h))], axis=-1)
        h = jnp.concatenate([h, nnx.relu(self.layer2(h))], axis=-1)
        return self.head(jnp.mean(h, axis=(1, 2)))


def test_concatenation_puts_each_producer_at_its_offset():
    s = trace(build(DenseBlock), (1, 5, 5, 3))
    stem, layer1, layer2, head = s.groups
    assert [g.size for g in s.groups] == [4, 2, 2, 3]
    assert slices(stem) == {
        ("stem.kernel", 3): (0, 1, 2, 3), ("stem.bias", 0): (0, 1, 2, 3),
        ("layer1.kernel", 2): (0, 1, 2, 3), ("layer2.kernel", 2): (0, 1, 2, 3),
        ("head.kernel", 0): (0, 1, 2, 3)}
    assert slices(layer1) == {
        ("layer1.kernel", 3): (0, 1), ("layer1.bias", 0): (0, 1),
        ("layer2.kernel", 2): (4, 5), ("head.kernel", 0): (4, 5)}
    assert slices(layer2) == {
        ("layer2.kernel", 3): (0, 1), ("layer2.bias", 0): (0, 1), ("head.kernel", 0): (6, 7)}
    assert s.groups_of("layer2.kernel", 2) == (0, 1)
    assert stem.prunable and layer1.prunable and layer2.prunable


def test_dense_block_counts():
    s = trace(build(DenseBlock), (1, 5, 5, 3))
    convs = [3 * 3 * 3 * 4, 3 * 3 * 4 * 2, 3 * 3 * 6 * 2]
    assert_counts(s, None, sum(convs) + 8 * 3, 4 + 2 + 2 + 3, sum(convs) * 25 + 8 * 3)
    convs = [3 * 3 * 3 * 4, 3 * 3 * 4 * 1, 3 * 3 * 5 * 2]
    assert_counts(s, {1: np.array([0.0, 1.0])}, sum(convs) + 7 * 3, 4 + 1 + 2 + 3,
                  sum(convs) * 25 + 7 * 3)


class Separable(nnx.Module):
    """stem - depthwise 3x3 - pointwise 1x1 - pool - dense; ``groups`` of the middle conv."""

    def __init__(self, *, rngs, groups: int = 4):
        self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.depthwise = nnx.Conv(4, 4, (3, 3), feature_group_count=groups, rngs=rngs)
        self.pointwise = nnx.Conv(4, 5, (1, 1), rngs=rngs)
        self.head = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.depthwise(nnx.relu(self.stem(x))))
        return self.head(jnp.mean(self.pointwise(h), axis=(1, 2)))


def test_depthwise_convolution_ties_input_and_output_channels():
    s = trace(build(Separable), (1, 6, 6, 3))
    tied = group_of(s, "stem.kernel", 3)
    assert set(tied.producers) == {("stem.kernel", 3), ("depthwise.kernel", 3)}
    assert slices(tied) == full(("stem.kernel", 3, 4), ("stem.bias", 0, 4),
                                ("depthwise.kernel", 3, 4), ("depthwise.bias", 0, 4),
                                ("pointwise.kernel", 2, 4))
    assert tied.member("stem.kernel", 3).units == tied.member("depthwise.kernel", 3).units
    assert tied.prunable
    convs = [3 * 3 * 3 * 4, 3 * 3 * 1 * 4, 4 * 5]
    assert_counts(s, None, sum(convs) + 10, 4 + 4 + 5 + 2, sum(convs) * 36 + 10)
    convs = [3 * 3 * 3 * 2, 3 * 3 * 1 * 2, 2 * 5]
    assert_counts(s, {tied.index: keep_all_but(tied, [0, 3])}, sum(convs) + 10, 2 + 2 + 5 + 2,
                  sum(convs) * 36 + 10)


def test_grouped_convolution_with_several_channels_per_group_is_blocked():
    s = trace(build(Separable, groups=2), (1, 6, 6, 3))
    for path in ("stem.kernel", "depthwise.kernel"):
        group = group_of(s, path, 3)
        assert not group.prunable
        assert group.blockers[0].primitive == "conv_general_dilated"
        assert "grouped" in group.blockers[0].reason
    assert group_of(s, "pointwise.kernel", 3).size == 5


class Attention(nnx.Module):
    """Single-block self-attention: 2 heads of 2 features, output projection, mean over tokens."""

    heads = 2

    def __init__(self, *, rngs):
        self.q, self.k, self.v = (nnx.Linear(6, 4, rngs=rngs) for _ in range(3))
        self.o = nnx.Linear(4, 6, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        batch, tokens, _ = x.shape
        split = lambda h: h.reshape(batch, tokens, self.heads, -1)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(2.0)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        h = self.o(mixed.reshape(batch, tokens, -1))
        return self.head(jnp.mean(h, axis=1))


def test_heads_tie_query_and_key_features_and_carry_value_features():
    s = trace(build(Attention), (1, 5, 6))
    qk = group_of(s, "q.kernel", 1)
    assert set(qk.producers) == {("q.kernel", 1), ("k.kernel", 1)}
    assert slices(qk) == full(("q.kernel", 1, 4), ("q.bias", 0, 4), ("k.kernel", 1, 4),
                              ("k.bias", 0, 4))
    # feature j of the queries is contracted with feature j of the keys, head by head
    assert qk.member("q.kernel", 1).units == qk.member("k.kernel", 1).units
    values = group_of(s, "v.kernel", 1)
    assert slices(values) == full(("v.kernel", 1, 4), ("v.bias", 0, 4), ("o.kernel", 0, 4))
    assert values.member("v.kernel", 1).units == values.member("o.kernel", 0).units
    assert group_of(s, "o.kernel", 1).member("head.kernel", 0) is not None
    assert qk.prunable and values.prunable


class HeadMinorAttention(Attention):
    """The same attention with each projection's features split ``(head_dim, heads)``: head h
    owns features d * heads + h (the zoo's layout)."""

    def __call__(self, x):
        batch, tokens, _ = x.shape
        split = lambda h: h.reshape(batch, tokens, -1, self.heads)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = jnp.einsum("bqdh,bkdh->bhqk", q, k)
        mixed = jnp.einsum("bhqk,bkdh->bqdh", jax.nn.softmax(scores, axis=-1), v)
        return self.head(jnp.mean(self.o(mixed.reshape(batch, tokens, -1)), axis=1))


@pytest.mark.parametrize("model, heads", [(Attention, [0, 0, 1, 1]),
                                          (HeadMinorAttention, [0, 1, 0, 1])])
def test_the_products_split_a_flat_projection_into_its_heads(model, heads):
    """The scores' and the mixing's batch dimension over heads splits the query/key and the
    value groups, in either layout, into the heads each feature belongs to; no other group is
    split, and a factored kernel's heads, a group of their own, record no split."""
    s = trace(build(model), (1, 5, 6))
    for path in ("q.kernel", "v.kernel"):
        group = group_of(s, path, 1)
        member = group.member(path, 1)
        (split,) = s.heads(group.index)
        assert split[np.asarray(member.units)].tolist() == heads
    assert s.heads(group_of(s, "o.kernel", 1).index) == ()
    factored = trace(build(FlaxAttention), (1, 5, 6))
    assert all(factored.heads(g.index) == () for g in factored.groups)


class GroupedQueryAttention(nnx.Module):
    """4 query heads sharing 2 key/value heads (grouped-query attention, Ainslie et al. 2023),
    heads of 2 features: query feature (g, m, d) meets key feature (g, d)."""

    def __init__(self, *, rngs):
        self.q, self.o = nnx.Linear(6, 8, rngs=rngs), nnx.Linear(8, 6, rngs=rngs)
        self.k, self.v = nnx.Linear(6, 4, rngs=rngs), nnx.Linear(6, 4, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        batch, tokens, _ = x.shape
        q = self.q(x).reshape(batch, tokens, 2, 2, 2)
        k, v = (layer(x).reshape(batch, tokens, 2, 2) for layer in (self.k, self.v))
        weights = jax.nn.softmax(jnp.einsum("btgmd,bsgd->bgmts", q, k), axis=-1)
        mixed = jnp.einsum("bgmts,bsgd->btgmd", weights, v).reshape(batch, tokens, 8)
        return self.head(jnp.mean(self.o(mixed), axis=1))


def test_grouped_query_heads_tie_each_query_head_to_its_shared_key():
    """Every query head of a group reads the group's key features: query column (g, m, d) is
    key column (g, d)'s unit, whichever operand the product takes first; the key/value groups
    are the heads of both groups."""
    s = trace(build(GroupedQueryAttention), (1, 5, 6))
    qk = group_of(s, "k.kernel", 1)
    assert set(qk.producers) == {("q.kernel", 1), ("k.kernel", 1)} and qk.prunable
    assert qk.size == 4
    key_units = np.asarray(qk.member("k.kernel", 1).units).reshape(2, 1, 2)
    query_units = np.asarray(qk.member("q.kernel", 1).units).reshape(2, 2, 2)
    np.testing.assert_array_equal(query_units, np.broadcast_to(key_units, (2, 2, 2)))
    values = group_of(s, "v.kernel", 1)
    assert values.prunable and values.size == 4
    output_rows = np.asarray(values.member("o.kernel", 0).units).reshape(2, 2, 2)
    value_units = np.asarray(values.member("v.kernel", 1).units).reshape(2, 1, 2)
    np.testing.assert_array_equal(output_rows, np.broadcast_to(value_units, (2, 2, 2)))
    for group, units in ((qk, key_units), (values, value_units)):
        (split,) = s.heads(group.index)  # key/value column (g, d) is in head g
        assert split[units.reshape(2, 2)].tolist() == [[0, 0], [1, 1]]


def test_query_heads_inside_key_value_groups_are_tagged_and_counted_by_head():
    """A query head shares its group's key units, so it is no group; its tag marks its query
    columns and bias, its output-projection rows (the same (g, m) of both layouts) and its
    share of the attention products: closing one removes 2 query columns of 6 weights, 2
    biases and 2 output rows of 6 weights, and per token 12 + 12 MACs, with 5 x 5 x 2 MACs
    of its scores and as many of its mixed values."""
    s = trace(build(GroupedQueryAttention), (1, 5, 6))
    columns, rows = s.param_tags("q.kernel", 1), s.param_tags("o.kernel", 0)
    np.testing.assert_array_equal(columns, rows)
    np.testing.assert_array_equal(s.param_tags("q.bias", 0), columns)
    heads = columns.reshape(2, 2, 2)  # (g, m, d): one tag per query head, over its features
    assert len(set(columns.tolist())) == 4 and np.all(heads == heads[..., :1])
    assert s.param_tags("k.kernel", 1) is None and s.param_tags("v.kernel", 1) is None
    assert {path for path, _, _ in s.tagged_axes(set(columns.tolist()))} == {
        "q.kernel", "q.bias", "o.kernel"}
    dense, closed = s.count(), s.count(closed_tags={int(heads[0, 1, 0])})
    assert dense.params - closed.params == 2 * 6 + 2 + 2 * 6
    assert dense.flops - closed.flops == 5 * (12 + 12) + 2 * 5 * 5 * 2
    every = s.count(closed_tags=set(columns.tolist()))
    assert (dense.params - every.params, dense.flops - every.flops) == (4 * 26, 4 * 220)


class FusedAttention(Attention):
    """The same attention with one fused ``(6, 3 * 4)`` projection split into queries, keys
    and values."""

    def __init__(self, *, rngs):
        self.qkv = nnx.Linear(6, 12, rngs=rngs)
        self.o = nnx.Linear(4, 6, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, 2)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.head(jnp.mean(self.o(mixed.reshape(batch, tokens, -1)), axis=1))


def test_the_heads_of_a_fused_projection_join_its_query_key_and_value_splits():
    """A fused projection's queries/keys and values are one group; the scores split its
    query/key units and the mixing its value units, each into 2 heads, and the two join."""
    s = trace(build(FusedAttention), (1, 5, 6))
    group = group_of(s, "qkv.kernel", 1)
    member = group.member("qkv.kernel", 1)
    assert group.size == 8 and member.indices == tuple(range(12))
    (split,) = s.heads(group.index)
    heads_of_columns = split[np.asarray(member.units)].reshape(3, 2, 2)
    np.testing.assert_array_equal(heads_of_columns, np.broadcast_to([[0, 0], [1, 1]], (3, 2, 2)))


def rotary(x):
    """Rotary position embedding (Su et al. 2021, rotate-half pairing) of ``(batch, tokens,
    heads, features)``: feature i and i + features / 2 of each head turn together."""
    tokens, features = x.shape[1], x.shape[-1]
    angle = jnp.arange(tokens)[:, None] * 100.0 ** (-jnp.arange(features // 2) / features)
    cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
    first, second = x[..., : features // 2], x[..., features // 2:]
    return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


class RotaryAttention(nnx.Module):
    """2 heads of 4 features with rotary positions on the queries and keys."""

    def __init__(self, *, rngs):
        self.q, self.k, self.v = (nnx.Linear(6, 8, rngs=rngs) for _ in range(3))
        self.o, self.head = nnx.Linear(8, 6, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        batch, tokens, _ = x.shape
        q, k, v = (layer(x).reshape(batch, tokens, 2, 4) for layer in (self.q, self.k, self.v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", rotary(q), rotary(k))
        mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.head(jnp.mean(self.o(mixed.reshape(batch, tokens, -1)), axis=1))


def test_rotary_positions_tie_the_features_they_turn_together():
    """The two halves of each head's query and key features are rejoined along the features
    inside the (heads, features) field: feature i and i + 2 of a head become one unit, the
    heads stay apart, and the group stays prunable."""
    s = trace(build(RotaryAttention), (1, 5, 6))
    qk = group_of(s, "q.kernel", 1)
    assert set(qk.producers) == {("q.kernel", 1), ("k.kernel", 1)} and qk.prunable
    units = np.asarray(qk.member("q.kernel", 1).units).reshape(2, 2, 2)  # head, half, feature
    np.testing.assert_array_equal(units[:, 0], units[:, 1])
    assert len(np.unique(units)) == qk.size == 4
    (split,) = s.heads(qk.index)
    assert split[units[:, 0]].tolist() == [[0, 0], [1, 1]]


def test_attention_counts_include_the_products_of_activations():
    s = trace(build(Attention), (1, 5, 6))
    tokens, projections = 5, 4 * (6 * 4)
    mixing = 2 * tokens * tokens * 2  # heads x queries x keys x head_dim, twice
    assert_counts(s, None, projections + 6 * 3, 3 * 4 + 6 + 3,
                  projections * tokens + 2 * mixing + 6 * 3)
    qk = group_of(s, "q.kernel", 1)
    projections = 2 * (6 * 3) + 2 * (6 * 4)
    assert_counts(s, {qk.index: keep_all_but(qk, [1])}, projections + 6 * 3, 2 * 3 + 4 + 6 + 3,
                  projections * tokens + mixing * 3 // 4 + mixing + 6 * 3)


class StandardisedConv(nnx.Module):
    """A 3x3 convolution whose kernel is standardised per output channel before each use
    (weight standardisation, Qiao et al. 2019)."""

    def __init__(self, features_in, features_out, *, rngs):
        shape = (3, 3, features_in, features_out)
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape))
        self.bias = nnx.Param(jnp.zeros((features_out,)))

    def __call__(self, x):
        w = self.kernel[...]
        w = (w - w.mean(axis=(0, 1, 2))) / (w.std(axis=(0, 1, 2)) + 1e-5)
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + self.bias[...]


class NormalisedDense(nnx.Module):
    """A dense layer whose kernel is ``scale * v / |v|`` per output (weight normalisation,
    Salimans & Kingma 2016)."""

    def __init__(self, features_in, features_out, *, rngs):
        shape = (features_in, features_out)
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape))
        self.scale = nnx.Param(jnp.full((features_out,), 2.0))
        self.bias = nnx.Param(jnp.zeros((features_out,)))

    def __call__(self, x):
        v = self.kernel[...]
        return x @ (self.scale[...] * v / jnp.linalg.norm(v, axis=0)) + self.bias[...]


class Reparametrised(nnx.Module):
    """conv (1 -> 4) - ReLU - standardised conv (4 -> 5) - ReLU - mean over positions -
    normalised dense (5 -> 3) - ReLU - head (3 -> 2)."""

    def __init__(self, *, rngs):
        self.c1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.c2 = StandardisedConv(4, 5, rngs=rngs)
        self.fc = NormalisedDense(5, 3, rngs=rngs)
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.c2(nnx.relu(self.c1(x)))).mean(axis=(1, 2))
        return self.head(nnx.relu(self.fc(h)))


def test_a_kernel_computed_from_its_parameter_is_its_layer_with_its_units_kept_whole():
    """The standardised and the normalised kernels are layers of their parameters, counted as
    such (the normalisation's scale apart, as a normaliser's), and their units are kept: a
    gate scales a parameter, and the standardisation would undo it."""
    s = trace(build(Reparametrised), (2, 6, 6, 1))
    assert [(l.kernel, l.bias, l.reparametrised) for l in s.layers] == [
        ("c1.kernel", "c1.bias", False), ("c2.kernel", "c2.bias", True),
        ("fc.kernel", "fc.bias", True), ("head.kernel", "head.bias", False)]
    assert_counts(s, None, 9 * 4 + 9 * 4 * 5 + 5 * 3 + 3 * 2, 4 + 5 + 3 + 2,
                  36 * 9 * 4 + 36 * 9 * 4 * 5 + 5 * 3 + 3 * 2)
    assert s.count().other_params == 3
    for path, axis in (("c1.kernel", 3), ("c2.kernel", 3), ("fc.kernel", 1)):
        group = group_of(s, path, axis)
        assert group.producers == ((path, axis),) and not group.prunable
        assert "computed from its parameter" in group.blockers[0].reason


class ScannedStandardised(nnx.Module):
    """fc_in (6 -> 4), three stacked 4 x 4 kernels, each standardised over its rows inside the
    scan that applies them, fc_out (4 -> 2)."""

    def __init__(self, *, rngs):
        self.fc_in = nnx.Linear(6, 4, rngs=rngs)
        self.stack = nnx.Param(jnp.zeros((3, 4, 4)))
        self.fc_out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        def step(h, v):
            return nnx.relu(h @ ((v - v.mean(axis=0)) / (v.std(axis=0) + 1e-5))), None

        h, _ = jax.lax.scan(step, self.fc_in(x), self.stack[...])
        return self.fc_out(h)


def test_a_kernel_computed_inside_a_scan_from_its_stacked_parameter_is_its_layer():
    """Each iteration's standardised kernel is computed from its slice of the stack: the stack
    is a layer (counted as one, its layer axis apart), and the stream it reads and writes is kept
    whole, as for a kernel standardised outside a scan."""
    s = trace(build(ScannedStandardised), (2, 6))
    assert [(l.kernel, l.reparametrised) for l in s.layers] == [
        ("fc_in.kernel", False), ("stack", True), ("fc_out.kernel", False)]
    assert_counts(s, None, 6 * 4 + 3 * 4 * 4 + 4 * 2, 4 + 2, 6 * 4 + 3 * 4 * 4 + 4 * 2)
    assert s.count().other_params == 0
    stream = group_of(s, "fc_in.kernel", 1)
    assert stream.producers == (("fc_in.kernel", 1), ("stack", 2)) and not stream.prunable
    assert "computed from its parameter" in stream.blockers[0].reason


class ScaledByAStack(nnx.Module):
    """fc (6 -> 4), a 4 x 3 kernel scaled entrywise by the mean of a (2, 4, 3) stack, a head."""

    def __init__(self, *, rngs):
        self.fc = nnx.Linear(6, 4, rngs=rngs)
        self.q = nnx.Param(jnp.zeros((4, 3)))
        self.stack = nnx.Param(jnp.zeros((2, 4, 3)))
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.fc(x) @ (self.q[...] * self.stack[...].mean(axis=0))))


def test_a_kernel_computed_from_a_parameter_of_its_shape_and_a_stack_is_the_parameters():
    s = trace(build(ScaledByAStack), (2, 6))
    assert [(l.kernel, l.reparametrised) for l in s.layers] == [
        ("fc.kernel", False), ("q", True), ("head.kernel", False)]


class SortedMLP(nnx.Module):
    """6-5-4-3 with the hidden features of fc1 sorted, an op the analysis has no rule for."""

    def __init__(self, *, rngs):
        self.fc1 = nnx.Linear(6, 5, rngs=rngs)
        self.fc2 = nnx.Linear(5, 4, rngs=rngs)
        self.fc3 = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        h = jnp.sort(self.fc1(x), axis=-1)
        return self.fc3(nnx.relu(self.fc2(h)))


def test_an_unknown_op_blocks_the_groups_it_touches_and_is_named():
    s = trace(build(SortedMLP), (2, 6))
    sorted_group = group_of(s, "fc1.kernel", 1)
    assert not sorted_group.prunable
    (blocker,) = sorted_group.blockers
    assert blocker.primitive == "sort"
    assert __file__ in blocker.source and "__call__" in blocker.source
    assert group_of(s, "fc2.kernel", 1).prunable
    assert s.groups_of("fc2.kernel", 0) == ()  # its inputs are no longer fc1's units
    assert_counts(s, None, 6 * 5 + 5 * 4 + 4 * 3, 5 + 4 + 3, 6 * 5 + 5 * 4 + 4 * 3)


class EmbeddedMLP(nnx.Module):
    """Token ids -> an ``nnx.Embed`` lookup (a gather) -> a residual MLP block -> logits per
    token; ``picked``: the block's hidden features are read at indices (a gather along them)."""

    def __init__(self, *, rngs, picked=False):
        self.embed = nnx.Embed(50, 8, rngs=rngs)
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.down = nnx.Linear(16, 8, rngs=rngs)
        self.head = nnx.Linear(8, 50, rngs=rngs)
        self.picked = picked

    def __call__(self, ids):
        h = self.embed(ids)
        hidden = nnx.relu(self.up(h))
        if self.picked:
            hidden = jnp.take(hidden, jnp.arange(16)[::-1], axis=-1)
        return self.head(h + self.down(hidden))


def test_an_embedding_lookup_puts_the_table_columns_in_the_stream_it_starts():
    ids = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    s = trace_structure(build(EmbeddedMLP), ids)
    stream = group_of(s, "down.kernel", 1)
    assert stream.removable and slices(stream)[("embed.embedding", 1)] == tuple(range(8))
    assert s.groups_of("embed.embedding", 0) == ()  # the vocabulary: no producer, no group
    picked = group_of(trace_structure(build(EmbeddedMLP, picked=True), ids), "up.kernel", 1)
    assert [(b.primitive, b.reason) for b in picked.blockers] == [
        ("gather", "positions picked by a gather's indices")]


def test_an_unknown_op_on_one_member_blocks_the_whole_residual_stream():
    s = trace(build(ResidualCNN, sorted_branch=True), (1, 6, 6, 3))
    stream = group_of(s, "stem.kernel", 3)
    assert [b.primitive for b in stream.blockers] == ["sort"]
    assert group_of(s, "a1.kernel", 3).prunable
    assert group_of(s, "proj.kernel", 3).prunable


class LoopMLP(MLP):
    """The MLP with fc1's features halved until small, in a while loop (not walked)."""

    def __call__(self, x):
        h = jax.lax.while_loop(lambda h: jnp.max(h) > 1.0, lambda h: h / 2.0, self.fc1(x))
        return self.fc3(nnx.relu(self.fc2(h)))


def test_while_loops_are_not_walked_and_block_what_they_carry():
    s = trace(build(LoopMLP), (2, 6))
    assert [b.primitive for b in group_of(s, "fc1.kernel", 1).blockers] == ["while"]
    assert group_of(s, "fc2.kernel", 1).prunable


class ScannedLayers(nnx.Module):
    """fc_in (6 -> 4), three stacked 4 x 4 layers applied by a scan, fc_out (4 -> 2)."""

    def __init__(self, *, rngs):
        self.fc_in = nnx.Linear(6, 4, rngs=rngs)
        self.stack = nnx.Param(jnp.zeros((3, 4, 4)))
        self.fc_out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        step = lambda h, w: (nnx.relu(h @ w), None)  # noqa: E731
        h, _ = jax.lax.scan(step, self.fc_in(x), self.stack[...])
        return self.fc_out(h)


def test_a_scan_over_stacked_layers_is_one_stream_of_its_carry():
    s = trace(build(ScannedLayers), (2, 6))
    stream = group_of(s, "fc_in.kernel", 1)
    assert stream.prunable and stream.size == 4
    assert slices(stream) == full(("fc_in.kernel", 1, 4), ("fc_in.bias", 0, 4), ("stack", 1, 4),
                                  ("stack", 2, 4), ("fc_out.kernel", 0, 4))
    assert s.groups_of("stack", 0) == ()  # the layer axis is no unit
    assert_counts(s, None, 6 * 4 + 3 * 4 * 4 + 4 * 2, 4 + 2, 6 * 4 + 3 * 4 * 4 + 4 * 2)
    assert_counts(s, {stream.index: keep_all_but(stream, [0])}, 6 * 3 + 3 * 3 * 3 + 3 * 2, 3 + 2,
                  6 * 3 + 3 * 3 * 3 + 3 * 2)


class LSTMClassifier(nnx.Module):
    """An LSTM (3 inputs, 4 hidden units) over a sequence, its last state into a head (4 -> 2).
    Its state starts at zero and takes its units in the first step."""

    def __init__(self, *, rngs):
        self.rnn = nnx.RNN(nnx.LSTMCell(3, 4, rngs=rngs))
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.rnn(x)[:, -1])


def test_a_recurrent_state_is_one_group_with_the_rows_that_read_it_back():
    """The hidden units are the columns of the eight kernels of the gates and the rows of the
    four that read the state back at the next step: a closed unit leaves every one of them."""
    s = trace(build(LSTMClassifier), (2, 5, 3))
    hidden = group_of(s, "rnn.cell.hi.kernel", 1)
    assert hidden.prunable and hidden.size == 4
    cell = "rnn.cell"
    inputs = [f"{cell}.{name}.kernel" for name in ("ii", "if_", "ig", "io")]
    recurrent = [f"{cell}.{name}" for name in ("hi", "hf", "hg", "ho")]
    assert slices(hidden) == full(
        *((path, 1, 4) for path in inputs), *((f"{path}.kernel", 1, 4) for path in recurrent),
        *((f"{path}.kernel", 0, 4) for path in recurrent),
        *((f"{path}.bias", 0, 4) for path in recurrent), ("head.kernel", 0, 4))
    steps = 5
    assert_counts(s, None, 4 * 3 * 4 + 4 * 4 * 4 + 4 * 2, 4 * 4 + 2,
                  steps * (4 * 3 * 4 + 4 * 4 * 4) + 4 * 2)
    assert_counts(s, {hidden.index: keep_all_but(hidden, [1])}, 4 * 3 * 3 + 4 * 3 * 3 + 3 * 2,
                  4 * 3 + 2, steps * (4 * 3 * 3 + 4 * 3 * 3) + 3 * 2)


class TiedAutoencoder(nnx.Module):
    """x @ W, then the hidden features back through W transposed: one parameter read twice."""

    def __init__(self, *, rngs):
        self.w = nnx.Param(jnp.zeros((6, 4)))

    def __call__(self, x):
        return nnx.relu(x @ self.w[...]) @ self.w[...].T


def test_tied_weights_are_one_group_member_and_counted_once():
    s = trace(build(TiedAutoencoder), (2, 6))
    hidden = group_of(s, "w", 1)
    assert hidden.size == 4 and hidden.prunable
    assert slices(hidden) == full(("w", 1, 4))
    assert not group_of(s, "w", 0).prunable  # the reconstruction is the output
    assert [l.kernel for l in s.layers] == ["w", "w"]
    assert_counts(s, {hidden.index: keep_all_but(hidden, [0])}, 6 * 3, 0, 2 * 6 * 3)


class DropoutMLP(MLP):
    """The MLP with dropout on fc1's features (random bits drawn in train mode)."""

    def __init__(self, *, rngs):
        super().__init__(rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.fc3(nnx.relu(self.fc2(self.dropout(nnx.relu(self.fc1(x))))))


def test_dropout_in_train_mode_passes_the_units():
    model = build(DropoutMLP)
    model.train()
    s = trace(model, (2, 6))
    assert [(g.size, g.prunable) for g in s.groups] == [(5, True), (4, True), (3, False)]
    assert ("fc2.kernel", 0) in slices(s.groups[0])


class NormalizedMLP(MLP):
    """The MLP with LayerNorm on fc1's features and RMSNorm on fc2's."""

    def __init__(self, *, rngs):
        super().__init__(rngs=rngs)
        self.layer_norm = nnx.LayerNorm(5, rngs=rngs)
        self.rms_norm = nnx.RMSNorm(4, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.layer_norm(self.fc1(x)))
        return self.fc3(nnx.relu(self.rms_norm(self.fc2(h))))


def test_layer_norm_and_rms_norm_parameters_join_the_features_they_scale():
    s = trace(build(NormalizedMLP), (2, 6))
    assert slices(s.groups[0]) == full(("fc1.kernel", 1, 5), ("fc1.bias", 0, 5),
                                       ("layer_norm.scale", 0, 5), ("layer_norm.bias", 0, 5),
                                       ("fc2.kernel", 0, 5))
    assert slices(s.groups[1]) == full(("fc2.kernel", 1, 4), ("fc2.bias", 0, 4),
                                       ("rms_norm.scale", 0, 4), ("fc3.kernel", 0, 4))
    assert s.groups[0].prunable and s.groups[1].prunable
    assert s.count({0: keep_all_but(s.groups[0], [4])}).other_params == 2 * 4 + 4
    # their statistics are taken over the units: removing one changes them
    for group in s.groups[:2]:
        assert group.caveats and all(c.primitive.startswith("reduce") for c in group.caveats)
    assert all(not g.caveats for g in trace(build(MLP), (2, 6)).groups)


class ChannelsFirst(nnx.Module):
    """An NCHW convolution with an OIHW kernel, then a classifier whose kernel is the left
    operand of its product (``w @ h`` as an einsum)."""

    def __init__(self, *, rngs):
        self.kernel = nnx.Param(jnp.zeros((4, 3, 3, 3)))  # O, I, H, W
        self.classifier = nnx.Param(jnp.zeros((2, 4)))  # classes, channels

    def __call__(self, x):
        h = jax.lax.conv_general_dilated(x, self.kernel[...], (1, 1), "SAME",
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        h = jnp.mean(nnx.relu(h), axis=(2, 3))
        return jnp.einsum("oc,bc->bo", self.classifier[...], h)


def test_dimension_numbers_and_a_kernel_on_the_left():
    s = trace(build(ChannelsFirst), (1, 3, 5, 5))
    channels = group_of(s, "kernel", 0)
    assert channels.producers == (("kernel", 0),)
    assert slices(channels) == full(("kernel", 0, 4), ("classifier", 1, 4))
    assert channels.prunable
    assert group_of(s, "classifier", 0).producers == (("classifier", 0),)
    assert_counts(s, {channels.index: keep_all_but(channels, [3])}, 3 * 3 * 3 * 3 + 2 * 3, 0,
                  3 * 3 * 3 * 3 * 25 + 2 * 3)


class SharedHeadKernel(nnx.Module):
    """Features reshaped into 2 heads of 2, each head through one shared (2, 3) kernel."""

    def __init__(self, *, rngs):
        self.fc = nnx.Linear(6, 4, rngs=rngs)
        self.shared = nnx.Param(jnp.zeros((2, 3)))
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h = self.fc(x).reshape(x.shape[0], 2, 2)
        h = jnp.einsum("bhd,de->bhe", h, self.shared[...])
        return self.head(h.reshape(x.shape[0], -1))


def test_a_kernel_shared_by_heads_ties_the_same_feature_of_every_head():
    s = trace(build(SharedHeadKernel), (1, 6))
    features = group_of(s, "fc.kernel", 1)
    assert features.size == 2 and features.prunable
    assert features.member("fc.kernel", 1).units == (0, 1, 0, 1)
    assert features.member("shared", 0).units == (0, 1)
    outputs = group_of(s, "shared", 1)
    assert outputs.member("head.kernel", 0).units == (0, 1, 2) * 2
    assert_counts(s, None, 6 * 4 + 2 * 3 + 6 * 3, 4 + 3, 6 * 4 + 2 * 2 * 3 + 6 * 3)
    assert_counts(s, {features.index: np.array([1.0, 0.0])}, 6 * 2 + 1 * 3 + 6 * 3, 2 + 3,
                  6 * 2 + 2 * 1 * 3 + 6 * 3)


class FlaxAttention(nnx.Module):
    """Flax's own multi-head attention (2 heads of 4; kernels (in, heads, head_dim) and
    (heads, head_dim, out)), mean over tokens, classifier."""

    def __init__(self, *, rngs):
        self.att = nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=8,
                                          out_features=6, decode=False, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.mean(self.att(x), axis=1))


def test_heads_of_a_factored_kernel_are_their_own_group_across_query_key_value():
    s = trace(build(FlaxAttention), (1, 5, 6))
    heads = group_of(s, "att.query.kernel", 1)
    assert heads.size == 2 and heads.prunable
    assert set(heads.producers) == {("att.query.kernel", 1), ("att.key.kernel", 1),
                                    ("att.value.kernel", 1)}
    assert ("att.out.kernel", 0) in slices(heads)
    query_key = group_of(s, "att.query.kernel", 2)
    assert set(slices(query_key)) == {("att.query.kernel", 2), ("att.query.bias", 1),
                                      ("att.key.kernel", 2), ("att.key.bias", 1)}
    value = group_of(s, "att.value.kernel", 2)
    assert set(slices(value)) == {("att.value.kernel", 2), ("att.value.bias", 1),
                                  ("att.out.kernel", 1)}
    tokens, projection, mixing = 5, 6 * 2 * 4, 2 * 5 * 5 * 4
    assert_counts(s, None, 4 * projection + 6 * 3, 3 * 8 + 6 + 3,
                  4 * projection * tokens + 2 * mixing + 6 * 3)
    assert_counts(s, {heads.index: np.array([0.0, 1.0])}, 4 * projection // 2 + 6 * 3,
                  3 * 4 + 6 + 3, 4 * projection // 2 * tokens + mixing + 6 * 3)


def test_a_scans_constants_and_carries_are_counted_on_this_jax():
    # jax 0.12 moved the counts from num_consts / num_carry into the ft_in tree.
    def scanned(w, v, xs):
        def body(carry, x):
            a, b = carry
            return (jnp.tanh(a @ w + x), b @ v), a
        return jax.lax.scan(body, (jnp.zeros(3), jnp.zeros(3)), xs)

    jaxpr = jax.make_jaxpr(scanned)(jnp.ones((3, 3)), jnp.ones((3, 3)), jnp.ones((4, 3))).jaxpr
    (scan,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]
    assert scan_sizes(scan) == (2, 2)
    assert len(scan.invars) == 2 + 2 + 1
