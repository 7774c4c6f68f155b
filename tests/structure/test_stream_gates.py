"""Gates on a residual stream that normalisers read (``GatePlacement(stream=...)``), on a
pre-norm model written here with Flax's own LayerNorm and RMSNorm: a closed unit is the
network without it, per-example gates are the shared gates of each example, and the slim
network keeps exactly the open units."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.errors import ConfigError
from sparsejax.methods.base import RunInfo
from sparsejax.methods.l0_hc import L0HardConcrete
from sparsejax.slim import folding
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure.accounting import count_network
from sparsejax.structure.traced_model import GatePlacement, TracedModel

TOKENS, FEATURES, CLASSES, HIDDEN = 5, 6, 4, 12
NORMS = ("norm1", "norm2", "final")


class PreNorm(nnx.Module):
    """Features per token -> a projection plus position embeddings -> two pre-norm residual
    MLP blocks (LayerNorm, then RMSNorm) -> LayerNorm -> the mean over tokens -> logits.
    ``statistic`` replaces the final LayerNorm by another normaliser of the stream."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, statistic=None):
        self.embed = nnx.Linear(FEATURES, dim, rngs=rngs)
        self.positions = nnx.Param(jax.random.normal(rngs.params(), (1, TOKENS, dim)))
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.up1 = nnx.Linear(dim, HIDDEN, rngs=rngs)
        self.down1 = nnx.Linear(HIDDEN, dim, rngs=rngs)
        self.norm2 = nnx.RMSNorm(dim, rngs=rngs)
        self.up2 = nnx.Linear(dim, HIDDEN, rngs=rngs)
        self.down2 = nnx.Linear(HIDDEN, dim, rngs=rngs)
        self.final = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, CLASSES, rngs=rngs)
        self.statistic = statistic

    def __call__(self, x):
        h = self.embed(x) + self.positions[...]
        h = h + self.down1(nnx.gelu(self.up1(self.norm1(h))))
        h = h + self.down2(nnx.relu(self.up2(self.norm2(h))))
        final = self.final(h) if self.statistic is None else self.statistic(self, h)
        return self.head(jnp.mean(final, axis=1))


def randomized(net: PreNorm, seed: int = 0) -> PreNorm:
    """Every parameter drawn N(0, 1) (biases, scales and shifts away from 0 and 1)."""
    rng = np.random.default_rng(seed)
    for _, variable in nnx.to_flat_state(nnx.state(net, nnx.Param)):
        variable.set_value(jnp.asarray(rng.normal(size=variable.shape), jnp.float32))
    return net


def gated(net: PreNorm, **kwargs) -> TracedModel:
    placement = GatePlacement("hidden", "embed", "output", stream=NORMS)
    return TracedModel(net, rngs=nnx.Rngs(params=1), input_shape=(TOKENS, FEATURES),
                       num_classes=CLASSES, placements=[placement], **kwargs)


def narrowed(net: PreNorm, z: np.ndarray) -> PreNorm:
    """The network built with the open units of ``z`` alone, their gates multiplied into every
    write into the stream (the projections' columns and biases, the position embeddings)."""
    kept = np.flatnonzero(z)
    scale = z[kept]
    small = PreNorm(len(kept), rngs=nnx.Rngs(params=0))
    writes = {"embed.kernel": 1, "embed.bias": 0, "positions": 2, "down1.kernel": 1,
              "down1.bias": 0, "down2.kernel": 1, "down2.bias": 0}
    reads = {"up1.kernel": 0, "up2.kernel": 0, "head.kernel": 0}
    norms = {f"{n}.{p}": 0 for n in NORMS for p in ("scale", "bias")}
    values = {".".join(map(str, path)): v[...]
              for path, v in nnx.to_flat_state(nnx.state(net, nnx.Param))}
    for path, variable in nnx.to_flat_state(nnx.state(small, nnx.Param)):
        name = ".".join(map(str, path))
        value = values[name]
        axis = {**writes, **reads, **norms}.get(name)
        if axis is not None:
            value = jnp.take(value, kept, axis=axis)
        if name in writes:
            shape = [1] * value.ndim
            shape[writes[name]] = -1
            value = value * scale.reshape(shape)
        variable.set_value(value)
    return small


def stream_gates(dim: int, seed: int, *batch: int) -> np.ndarray:
    """Gate values in (0, 1], every third unit closed."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.2, 1.0, (*batch, dim)).astype(np.float32)
    z[..., ::3] = 0.0
    return z


def inputs(batch: int) -> jax.Array:
    return jax.random.normal(jax.random.key(3), (batch, TOKENS, FEATURES))


def test_closed_stream_units_give_the_network_without_them():
    """Writes scaled by the gates, normaliser statistics over the open units, closed units
    read by no kernel: the logits of the narrower network, and its layer params and FLOPs."""
    net = randomized(PreNorm(10, rngs=nnx.Rngs(params=0)))
    model = gated(net)
    z = stream_gates(10, 0)
    small = narrowed(net, z)
    x = inputs(3)
    for train in (False, True):
        np.testing.assert_allclose(model.forward(x, {"hidden": jnp.asarray(z)}, train=train),
                                   small(x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(model.forward(x, {}, train=False), small(x), atol=1e-2)
    counted = count_network(model.layers, {"hidden": (z > 0).astype(np.float32)},
                            model.activation_products)
    narrow = gated(PreNorm(int(np.sum(z > 0)), rngs=nnx.Rngs(params=0)))
    whole = count_network(narrow.layers, {}, narrow.activation_products)
    for what in ("params", "flops"):
        assert float(counted[what]) == pytest.approx(float(whole[what]), rel=1e-6)


def test_stream_gates_drawn_per_example_are_each_examples_shared_gates():
    net = randomized(PreNorm(9, rngs=nnx.Rngs(params=0)), seed=1)
    model = gated(net)
    z = stream_gates(9, 1, 3)
    z[1, 1] = 0.0  # examples with different open counts
    x = inputs(3)
    together = model.forward(x, {"hidden": jnp.asarray(z)}, train=False)
    for b in range(3):
        alone = model.forward(x[b:b + 1], {"hidden": jnp.asarray(z[b])}, train=False)
        np.testing.assert_allclose(together[b:b + 1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("round_to", [1, 4])
def test_the_slim_network_keeps_exactly_the_open_stream_units(round_to):
    """At every ``round_to``: a unit added back would change the count the sums are scaled by,
    so the stream keeps its open units; the slim logits are the gated model's."""
    net = randomized(PreNorm(10, rngs=nnx.Rngs(params=0)), seed=2)
    method = L0HardConcrete(get_config().lock(), RunInfo(100))
    model = gated(net, gate_factory=method.make_gates)
    log_alpha = np.linspace(-3.0, 3.0, 10)
    log_alpha[::3] = -10.0
    model.gates["hidden"].log_alpha[...] = jnp.asarray(log_alpha, jnp.float32)
    open_units = int(np.sum(folding.test_gate_values(model)["hidden"] > 0))
    assert 0 < open_units < 10
    x = np.asarray(inputs(8))
    slim = slim_traced_model(model, x, round_to=round_to)
    (stream,) = [g for g in slim.report.groups if "embed.kernel:1" in g.producers]
    assert (stream.open, stream.width, stream.status) == (open_units, open_units, "slimmed")
    assert slim.params["norm2.scale"].shape == (open_units,)
    assert slim.report.max_logit_difference < 1e-5


def test_stream_placements_that_cannot_hold_say_what_is_wrong():
    def build(statistic=None, **placement):
        net = PreNorm(8, rngs=nnx.Rngs(params=0), statistic=statistic)
        options = {"slot": "hidden", "layer": "embed", "side": "output", "stream": NORMS,
                   **placement}
        return TracedModel(net, rngs=nnx.Rngs(params=1), input_shape=(TOKENS, FEATURES),
                           num_classes=CLASSES, placements=[GatePlacement(**options)])

    with pytest.raises(ConfigError, match=r"\['norm3'\] have no parameter on the stream"):
        build(stream=("norm1", "norm3"))
    with pytest.raises(ConfigError, match="the inputs of layer 'embed' are no prunable stream"):
        build(side="input")
    with pytest.raises(ConfigError, match="leave out heads, norm and whole_unit"):
        build(whole_unit=True)

    def by_max(net, h):
        return h / jnp.max(jnp.abs(h), axis=-1, keepdims=True)

    with pytest.raises(ConfigError, match="reduced by reduce_max"):
        build(statistic=by_max, stream=("norm1", "norm2"))

    @jax.custom_jvp
    def rms(h):
        return h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + 1e-6)

    rms.defjvp(lambda primals, tangents: jax.jvp(rms.fun, primals, tangents))
    model = build(statistic=lambda net, h: rms(h), stream=("norm1", "norm2"))
    with pytest.raises(ConfigError, match="inside custom_jvp_call"):
        model.forward(inputs(2), {"hidden": jnp.ones(8)}, train=False)


VOCAB, CONTEXT = 11, 6


class TiedLM(nnx.Module):
    """Tokens -> ``nnx.Embed`` -> a pre-norm residual MLP block (RMSNorm) -> RMSNorm -> logits
    from the embedding table (tied: ``Embed.attend``) or from a head matrix of its own."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, tied: bool = True):
        self.embed = nnx.Embed(VOCAB, dim, rngs=rngs)
        self.norm = nnx.RMSNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, dim, rngs=rngs)
        self.final = nnx.RMSNorm(dim, rngs=rngs)
        self.head = None if tied else nnx.Param(jnp.zeros((VOCAB, dim)))

    def __call__(self, tokens):
        h = self.embed(tokens)
        h = h + self.down(nnx.gelu(self.up(self.norm(h))))
        h = self.final(h)
        return self.embed.attend(h) if self.head is None else h @ self.head[...].T


def tied_model(net: TiedLM, **kwargs) -> TracedModel:
    """The stream on the tied head's inputs, or on the untied table's lookup outputs."""
    side = "input" if net.head is None else "output"
    placement = GatePlacement("hidden", "embed", side, stream=("norm", "final"))
    return TracedModel(net, rngs=nnx.Rngs(params=1), input_shape=(CONTEXT,),
                       num_classes=VOCAB, input_dtype=jnp.int32, placements=[placement],
                       **kwargs)


def tokens(batch: int) -> jax.Array:
    return jax.random.randint(jax.random.key(4), (batch, CONTEXT), 0, VOCAB)


@pytest.mark.parametrize("tied", [True, False])
def test_an_embedding_is_gated_where_it_is_looked_up_and_a_tied_one_masked_where_it_is_read(
    tied,
):
    """The table's lookup writes the stream (its rows times the gates); tied, as the head it
    reads the stream (its rows times the open mask): the network without the closed units, its
    lookup table scaled and its head not. Per-example gates are each example's own."""
    net = randomized(TiedLM(10, rngs=nnx.Rngs(params=0), tied=tied), seed=3)
    model = tied_model(net)
    z = stream_gates(10, 3)
    kept = np.flatnonzero(z)
    table = net.embed.embedding[...]
    small = TiedLM(len(kept), rngs=nnx.Rngs(params=0), tied=False)
    small.embed.embedding[...] = table[:, kept] * z[kept]
    small.head[...] = (table if tied else net.head[...])[:, kept]
    small.down.kernel[...] = net.down.kernel[...][:, kept] * z[kept]
    small.down.bias[...] = net.down.bias[...][kept] * z[kept]
    small.up.kernel[...] = net.up.kernel[...][kept]
    small.up.bias[...] = net.up.bias[...]
    for norm in ("norm", "final"):
        getattr(small, norm).scale[...] = getattr(net, norm).scale[...][kept]
    x = tokens(3)
    gated = model.forward(x, {"hidden": jnp.asarray(z)}, train=False)
    np.testing.assert_allclose(gated, small(x), rtol=1e-5, atol=1e-5)
    drawn = np.stack([z, np.where(np.arange(10) == 1, 0.0, z), z]).astype(np.float32)
    per_example = model.forward(x, {"hidden": jnp.asarray(drawn)}, train=False)
    np.testing.assert_allclose(per_example[0], gated[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(per_example[1], gated[1], atol=1e-3)


def test_a_tied_embedding_slims_to_the_gated_logits():
    net = randomized(TiedLM(10, rngs=nnx.Rngs(params=0)), seed=4)
    method = L0HardConcrete(get_config().lock(), RunInfo(100))
    model = tied_model(net, gate_factory=method.make_gates)
    log_alpha = np.linspace(-1.0, 1.0, 10)  # test-time gates in (0, 1), not only 0 and 1
    log_alpha[::3] = -10.0
    model.gates["hidden"].log_alpha[...] = jnp.asarray(log_alpha, jnp.float32)
    values = folding.test_gate_values(model)["hidden"]
    assert np.any((values > 0) & (values < 1))
    slim = slim_traced_model(model, np.asarray(tokens(8)))
    assert slim.params["embed.embedding"].shape == (VOCAB, int(np.sum(values > 0)))
    assert slim.report.max_logit_difference < 1e-5
