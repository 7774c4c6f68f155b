"""sparsify: gating NNX models the package has never seen, from their traced structure."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax
from sparsejax.data.idx import read_idx

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
OPEN, CLOSED = 30.0, -30.0  # log_alpha at which train draws and test gates are exactly 1 / 0
SHIFT = (2.0 / 3.0) * np.log(11.0)  # -beta * log(-gamma / zeta) at the paper's constants


class MLP(nnx.Module):
    def __init__(self, sizes, *, rngs):
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
        )

    def __call__(self, x):
        x = jax.nn.relu(self.layers[0](x))
        for layer in self.layers[1:-1]:
            x = jax.nn.sigmoid(layer(x))  # f(0) = 1/2: a zeroed pre-activation is not removal
        return self.layers[-1](x)


class BranchCNN(nnx.Module):
    """Stem, two summed branches (3x3 conv and 1x1 projection, both BN'd), an identity residual
    block on the stream, global pooling, a dense head."""

    def __init__(self, *, rngs):
        def conv(i, o, k):
            return nnx.Conv(i, o, (k, k), use_bias=False, rngs=rngs)

        def bn(c):
            return nnx.BatchNorm(c, rngs=rngs)

        self.stem, self.bn_stem = conv(1, 4, 3), bn(4)
        self.conv_a, self.bn_a = conv(4, 6, 3), bn(6)
        self.proj, self.bn_proj = conv(4, 6, 1), bn(6)
        self.conv_c, self.bn_c = conv(6, 6, 3), bn(6)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn_stem(self.stem(x)))
        x = jax.nn.relu(self.bn_a(self.conv_a(x)) + self.bn_proj(self.proj(x)))
        x = x + jax.nn.relu(self.bn_c(self.conv_c(x)))
        return self.head(x.mean(axis=(1, 2)))


def set_gates(gated, closed):
    """Every gate open except the units ``closed[group position] = [units]``."""
    for k, gate in enumerate(gated.gates):
        values = np.full(gate.shape, OPEN, np.float32)
        values[list(closed.get(k, []))] = CLOSED
        gate.log_alpha.set_value(jnp.asarray(values))


def randomize_batch_norm(model, key):
    """Non-trivial BN scales, biases and running statistics, so that zeros are not by chance."""
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and var[...].ndim == 1 and "bn" in str(path[0]):
            key, sub = jax.random.split(key)
            var.set_value(jax.random.uniform(sub, var[...].shape, minval=0.5, maxval=1.5))


def test_closed_gates_equal_the_mlp_with_the_units_removed():
    model = MLP([20, 16, 12, 3], rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 20))
    gated = sparsejax.sparsify(model, x)
    assert [g.size for g in gated.report().groups] == [16, 12]
    set_gates(gated, {0: [3, 7], 1: [5]})
    gated.eval()
    logits = gated(x)

    keep1 = np.setdiff1d(np.arange(16), [3, 7])
    keep2 = np.setdiff1d(np.arange(12), [5])
    small = MLP([20, 14, 11, 3], rngs=nnx.Rngs(0))
    big = model.layers
    small.layers[0].kernel[...] = big[0].kernel[...][:, keep1]
    small.layers[0].bias[...] = big[0].bias[...][keep1]
    small.layers[1].kernel[...] = big[1].kernel[...][keep1][:, keep2]
    small.layers[1].bias[...] = big[1].bias[...][keep2]
    small.layers[2].kernel[...] = big[2].kernel[...][keep2]
    small.layers[2].bias[...] = big[2].bias[...]
    np.testing.assert_allclose(logits, small(x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits, model(x), atol=1e-3)  # the closed units mattered
    # the wrapped model's own parameters are untouched by the gated forward pass
    np.testing.assert_array_equal(model.layers[1].kernel[...], big[1].kernel[...])

    report = gated.report()
    assert [g.kept for g in report.groups] == [14, 11]
    assert report.architecture == "14-11"
    assert report.total_params == 20 * 16 + 16 + 16 * 12 + 12 + 12 * 3 + 3
    assert report.params == 20 * 14 + 14 + 14 * 11 + 11 + 11 * 3 + 3
    assert report.flops == 20 * 14 + 14 * 11 + 11 * 3


@pytest.mark.parametrize("train", [False, True])
def test_closed_stream_and_stem_gates_equal_zeroed_channels_through_batch_norm(train):
    model = BranchCNN(rngs=nnx.Rngs(0))
    randomize_batch_norm(model, jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
    gated = sparsejax.sparsify(model, x, apply=lambda m, x: m(x))
    producers = [[p for p, _ in g.producers] for g in gated.report().groups]
    assert producers == [["stem.kernel"], ["conv_a.kernel", "proj.kernel", "conv_c.kernel"]]
    set_gates(gated, {0: [1], 1: [2, 4]})
    gated.train() if train else gated.eval()
    logits = gated(x, rngs=nnx.Rngs(gates=0))

    # The same channels removed by hand: zero the BN scale and bias of every producer of the
    # stream (and of the stem), so the channel is 0 wherever it is read.
    reference = BranchCNN(rngs=nnx.Rngs(0))
    nnx.update(reference, nnx.state(model))
    for bn, channels in (("bn_stem", [1]), ("bn_a", [2, 4]), ("bn_proj", [2, 4]),
                         ("bn_c", [2, 4])):
        for name in ("scale", "bias"):
            var = getattr(getattr(reference, bn), name)
            var[jnp.array(channels)] = 0.0
    reference.train() if train else reference.eval()
    np.testing.assert_allclose(logits, reference(x), rtol=1e-5, atol=1e-5)
    model.train() if train else model.eval()
    assert not np.allclose(logits, model(x), atol=1e-3)  # the closed channels mattered
    assert gated.report().architecture == "3-4"


def test_penalty_at_init_is_the_group_size_weighted_expected_l0():
    model = MLP([20, 16, 12, 3], rngs=nnx.Rngs(0))
    x = jnp.zeros((2, 20))
    gated = sparsejax.sparsify(model, x, rngs=nnx.Rngs(params=4), droprate_init=0.3)
    la = [np.asarray(g.log_alpha[...], np.float64) for g in gated.gates]
    assert abs(la[0].mean() - np.log(0.7 / 0.3)) < 0.02
    prob = [1.0 / (1.0 + np.exp(-(a + SHIFT))) for a in la]
    # a unit of layer 1 removes its kernel column (20), bias (1) and layer 2's row (12)
    expected = (20 + 1 + 12) * prob[0].sum() + (16 + 1 + 3) * prob[1].sum()
    np.testing.assert_allclose(float(gated.penalty()), expected, rtol=1e-5)
    flops = sparsejax.sparsify(model, x, cost="flops", rngs=nnx.Rngs(params=4),
                               droprate_init=0.3)
    np.testing.assert_allclose(float(flops.penalty()),
                               (20 + 12) * prob[0].sum() + (16 + 3) * prob[1].sum(), rtol=1e-5)


def test_gradients_reach_every_gate_through_loss_and_penalty():
    model = BranchCNN(rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
    y = jnp.array([0, 1, 2, 1])
    gated = sparsejax.sparsify(model, x)

    def loss_fn(gated, key):
        logits = gated(x, rngs=nnx.Rngs(gates=key))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    total = nnx.grad(lambda g: loss_fn(g, jax.random.key(5)) + 1e-3 * g.penalty())(gated)
    penalty = nnx.grad(lambda g: 1e-3 * g.penalty())(gated)
    assert np.count_nonzero(total["model"]["conv_a"]["kernel"][...]) > 0
    for name, gate in total["gates"].items():
        g = np.asarray(gate["log_alpha"][...])
        assert np.all(np.isfinite(g)) and np.count_nonzero(g) == g.size
        # the loss's part: zero for a draw saturated at 0 or 1, not for all of them
        from_loss = g - np.asarray(penalty["gates"][name]["log_alpha"][...])
        assert np.count_nonzero(np.abs(from_loss) > 1e-7) > 0
    # the same key draws the same gates; another key other gates
    a, b = loss_fn(gated, jax.random.key(5)), loss_fn(gated, jax.random.key(5))
    assert a == b and a != loss_fn(gated, jax.random.key(6))
    with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
        gated(x)


def test_unprunable_groups_get_no_gate_and_bad_arguments_are_refused():
    class Sorted(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(6, 5, rngs=rngs), nnx.Linear(5, 4, rngs=rngs)
            self.c = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.c(jax.nn.relu(self.b(jnp.sort(self.a(x), axis=-1))))

    gated = sparsejax.sparsify(Sorted(nnx.Rngs(0)), jnp.zeros((2, 6)))
    assert [g.producers for g in gated.report().groups] == [(("b.kernel", 1),)]

    class Normed(nnx.Module):
        def __init__(self, rngs):
            self.a, self.norm = nnx.Linear(6, 5, rngs=rngs), nnx.LayerNorm(5, rngs=rngs)
            self.b, self.c = nnx.Linear(5, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.c(jax.nn.relu(self.b(jax.nn.relu(self.norm(self.a(x))))))

    report = sparsejax.sparsify(Normed(nnx.Rngs(0)), jnp.zeros((2, 6))).report()
    assert [g.producers for g in report.groups] == [(("b.kernel", 1),)]
    # a's units feed LayerNorm's statistics: slimming could not remove them, so no gate
    normed, logits = report.ungated
    assert normed.producers == (("a.kernel", 1),) and normed.size == 5
    assert normed.reason.startswith("reduction over units (reduce_sum at ")
    assert "test_sparsify.py" in normed.reason
    assert logits.producers == (("c.kernel", 1),) and "output" in logits.reason
    with pytest.raises(ValueError, match="unknown method 'dep_l0'"):
        sparsejax.sparsify(Sorted(nnx.Rngs(0)), jnp.zeros((2, 6)), method="dep_l0")
    with pytest.raises(ValueError, match="unknown granularity"):
        sparsejax.sparsify(Sorted(nnx.Rngs(0)), jnp.zeros((2, 6)), granularity="weight")


def fashion_slice(split, count):
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")[:count]
    labels = read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")[:count]
    return images.reshape(count, -1).astype(np.float32) / 255.0, labels.astype(np.int32)


@pytest.mark.skipif(not FASHION.exists(), reason="Fashion-MNIST is not installed")
def test_an_optax_loop_on_fashion_mnist_closes_gates_and_the_report_shrinks():
    x_train, y_train = fashion_slice("train", 2048)
    x_test, y_test = fashion_slice("test", 512)
    model = MLP([784, 64, 32, 10], rngs=nnx.Rngs(0))
    gated = sparsejax.sparsify(model, x_train[:1])
    optimizer = nnx.Optimizer(gated, optax.adam(2e-2), wrt=nnx.Param)
    lam = 5e-5

    @nnx.jit
    def step(gated, optimizer, x, y, key):
        def loss_fn(gated):
            logits = gated(x, rngs=nnx.Rngs(gates=key))
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce + lam * gated.penalty()

        loss, grads = nnx.value_and_grad(loss_fn)(gated)
        optimizer.update(gated, grads)
        return loss

    key = jax.random.key(0)
    for i in range(150):
        key, sub = jax.random.split(key)
        rows = np.arange(i * 128, (i + 1) * 128) % len(x_train)
        step(gated, optimizer, x_train[rows], y_train[rows], sub)
    gated.eval()
    accuracy = float((gated(x_test).argmax(-1) == y_test).mean())
    report = gated.report()
    assert accuracy > 0.5  # chance is 0.1
    assert report.groups[0].kept < 64
    assert report.params < 0.8 * report.total_params
    assert report.flops_fraction < 0.8


def readme_block():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Any NNX model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]


def test_the_readme_example_is_the_example_file():
    """tests/test_readme.py runs the block; here it must be the program in examples/."""
    example = (ROOT / "examples" / "sparsify_any_model.py").read_text()
    block = readme_block()
    assert "sparsejax.sparsify(" in block and "gated.penalty()" in block
    assert block.strip() in example

class Attention(nnx.Module):
    def __init__(self, *, rngs):
        self.embed = nnx.Linear(5, 8, rngs=rngs)
        self.att = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                          decode=False, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        return self.head((h + self.att(h)).mean(axis=1))


def test_attention_heads_and_query_key_dims_closed_equal_them_removed_by_hand():
    model = Attention(rngs=nnx.Rngs(0))
    for k, bias in enumerate((model.att.query.bias, model.att.key.bias)):
        bias[...] = jax.random.normal(jax.random.key(10 + k), bias[...].shape)
    x = jax.random.normal(jax.random.key(0), (2, 4, 5))
    gated = sparsejax.sparsify(model, x)
    producers = [tuple(p for p, _ in g.producers) for g in gated.report().groups]
    heads = producers.index(("att.query.kernel", "att.key.kernel", "att.value.kernel"))
    query_key = producers.index(("att.query.kernel", "att.key.kernel"))
    set_gates(gated, {heads: [1], query_key: [2]})
    gated.eval()
    logits = gated(x)

    # by hand: head 1 no longer reaches the output projection; dimension 2 of every head's
    # keys is zero (the gate acts on the queries: the score q.k loses the same term)
    reference = Attention(rngs=nnx.Rngs(0))
    nnx.update(reference, nnx.state(model))
    reference.att.out.kernel[1] = 0.0
    reference.att.key.kernel[:, :, 2] = 0.0
    reference.att.key.bias[:, 2] = 0.0
    np.testing.assert_allclose(logits, reference(x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits, model(x), atol=1e-4)


def test_l0_arm_gradients_are_unbiased_for_the_exact_expectation_over_all_gates():
    model = MLP([3, 2, 2, 1], rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 3))
    gated = sparsejax.sparsify(model, x, method="l0_arm")
    phis = [jnp.array([0.1, -0.08]), jnp.array([-0.05, 0.12])]
    for gate, phi in zip(gated.gates, phis):
        gate.phi[...] = phi

    def f(logits):
        return jnp.mean((logits - 1.0) ** 2)

    def exact(gated):
        pis = [gate.probability() for gate in gated.gates]
        total = 0.0
        for bits in np.ndindex(2, 2, 2, 2):
            z = [jnp.array(bits[:2], jnp.float32), jnp.array(bits[2:], jnp.float32)]
            weight = jnp.prod(jnp.stack([jnp.prod(jnp.where(zi > 0, p, 1 - p))
                                         for zi, p in zip(z, pis)]))
            total = total + weight * f(gated(x, gates=z))
        return total

    true = nnx.grad(exact)(gated)["gates"]
    true = np.concatenate([true[i]["phi"][...] for i in range(2)])

    @nnx.jit
    def arm(gated, key):
        grads = nnx.grad(lambda g: g.expected(f, x, rngs=nnx.Rngs(gates=key)))(gated)["gates"]
        return jnp.concatenate([grads[i]["phi"][...] for i in range(2)])

    draws = np.stack([arm(gated, jax.random.key(i)) for i in range(600)])
    error = np.abs(draws.mean(0) - true)
    assert np.all(error < 5 * draws.std(0) / np.sqrt(len(draws)) + 1e-6), (draws.mean(0), true)
    assert np.all(np.abs(true) > 1e-4)
    # the penalty is the expected L0 with P(z != 0) = sigmoid(7 phi)
    probs = [1 / (1 + np.exp(-7 * np.asarray(p))) for p in phis]
    np.testing.assert_allclose(float(gated.penalty()),
                               (3 + 1 + 2) * probs[0].sum() + (2 + 1 + 1) * probs[1].sum(),
                               rtol=1e-5)
    gated.gates[0].phi[...] = jnp.array([10.0, -10.0])  # test gate 1[sigmoid(7 phi) >= 1/2]
    gated.gates[1].phi[...] = jnp.array([10.0, 10.0])
    gated.eval()
    closed = [jnp.array([1.0, 0.0]), jnp.ones(2)]
    np.testing.assert_array_equal(gated(x), gated(x, gates=closed))
    with pytest.raises(ValueError, match="1 gate vectors given for 2 gated groups"):
        gated(x, gates=closed[:1])
    assert gated.report().architecture == "1-2"


class DepthwiseSeparable(nnx.Module):
    def __init__(self, *, rngs):
        self.expand = nnx.Conv(3, 6, (1, 1), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(6, rngs=rngs)
        self.dw = nnx.Conv(6, 6, (3, 3), feature_group_count=6, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(6, rngs=rngs)
        self.project = nnx.Conv(6, 4, (1, 1), rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu6(self.bn1(self.expand(x)))
        x = jax.nn.relu6(self.bn2(self.dw(x)))
        return self.head(jax.nn.relu(self.project(x)).mean(axis=(1, 2)))


def test_a_closed_depthwise_channel_in_training_equals_it_zeroed_after_the_last_batch_norm():
    model = DepthwiseSeparable(rngs=nnx.Rngs(0))
    randomize_batch_norm(model, jax.random.key(7))
    x = jax.random.normal(jax.random.key(8), (3, 6, 6, 3))
    gated = sparsejax.sparsify(model, x)
    # the expand and depthwise outputs are one group, gated once: at the projection's input
    assert [g.producers for g in gated.report().groups][0] == (("expand.kernel", 3),
                                                               ("dw.kernel", 3))
    assert [s.path for s in gated.slices[0]] == ["project.kernel"]
    set_gates(gated, {0: [0, 3]})
    logits = gated(x, rngs=nnx.Rngs(gates=1))  # training mode: BN uses batch statistics

    reference = DepthwiseSeparable(rngs=nnx.Rngs(0))
    nnx.update(reference, nnx.state(model))
    reference.bn2.scale[jnp.array([0, 3])] = 0.0
    reference.bn2.bias[jnp.array([0, 3])] = 0.0
    np.testing.assert_allclose(logits, reference(x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits, model(x), atol=1e-4)
