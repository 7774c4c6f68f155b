"""Language models the package has never seen, traced on token ids: embedding lookups and a head
tied to the embedding are layers of the accounting, gates close heads and MLP units, and the
slim network gives the gated logits.

The model: token embedding (V = 20, d = 8) -> one pre-norm decoder block on Flax's attention
(2 heads of 4, causal) with a ReLU MLP of 12 -> RMSNorm -> a head of its own, or the embedding
read transposed (``nnx.Embed.attend``).
"""

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
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure.accounting import count_network
from sparsejax.structure.nodes import layer_kernels
from sparsejax.structure.trace import trace_structure
from sparsejax.structure.traced_model import TracedModel

VOCAB, DIM, HEADS, MLP, T = 20, 8, 2, 12, 6


class TokenLM(nnx.Module):
    """Token ids ``(batch, T)`` -> next-token logits ``(batch, T, VOCAB)``."""

    def __init__(self, rngs: nnx.Rngs, *, tied: bool = False, pooled: bool = False):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.norm1, self.norm2 = nnx.RMSNorm(DIM, rngs=rngs), nnx.RMSNorm(DIM, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(HEADS, DIM, use_bias=False, decode=False,
                                                rngs=rngs)
        self.up, self.down = nnx.Linear(DIM, MLP, rngs=rngs), nnx.Linear(MLP, DIM, rngs=rngs)
        self.norm = nnx.RMSNorm(DIM, rngs=rngs)
        self.head = None if tied else nnx.Linear(DIM, VOCAB, use_bias=False, rngs=rngs)
        self.pooled = pooled

    def __call__(self, ids):
        h = self.embed(ids)
        h = h + self.attention(self.norm1(h), mask=nnx.make_causal_mask(ids))
        h = self.norm(h + self.down(nnx.relu(self.up(self.norm2(h)))))
        logits = self.embed.attend(h) if self.head is None else self.head(h)
        return logits.mean(axis=1) if self.pooled else logits


def traced(tied: bool, granularity: str = "unit") -> TracedModel:
    method = L0HardConcrete(get_config().lock(), RunInfo(100))
    return TracedModel(TokenLM(nnx.Rngs(params=0), tied=tied), rngs=nnx.Rngs(params=1),
                       input_shape=(T,), input_dtype=jnp.int32, num_classes=VOCAB,
                       gate_factory=method.make_gates, granularity=granularity)


def token_ids(batch: int = 4) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.key(0), (batch, T), 0, VOCAB), np.int32)


@pytest.mark.parametrize("tied", [False, True], ids=["own_head", "tied_head"])
def test_a_token_model_counts_its_lookup_and_a_tied_head_once(tied):
    """The embedding's V x d entries are params of a lookup layer that costs no MACs; tied, they
    are the head's kernel (d -> V at every position), counted once."""
    model = traced(tied)
    block = 4 * DIM * DIM + (DIM * MLP + MLP) + (MLP * DIM + DIM)
    attention = 2 * T * T * DIM  # Q K^T and A V over every pair of positions
    dense = count_network(model.layers, {}, model.activation_products)
    assert float(dense["params"]) == VOCAB * DIM + block + (0 if tied else DIM * VOCAB)
    assert float(dense["flops"]) == T * (4 * DIM * DIM + 2 * DIM * MLP + DIM * VOCAB) + attention
    layers = {layer.name: layer for layer in model.layers}
    assert layers["embed"].out_positions == (T if tied else 0)
    assert layers["embed"].kernel_shape == ((DIM, VOCAB) if tied else (VOCAB, DIM))
    table = np.asarray(model.net.embed.embedding[...])
    np.testing.assert_array_equal(layer_kernels(model)["embed"],
                                  table.T if tied else table)


@pytest.mark.parametrize("tied", [False, True], ids=["own_head", "tied_head"])
def test_closed_heads_and_units_of_a_token_model_leave_a_slim_network_with_its_logits(tied):
    model = traced(tied)
    assert [s.name for s in model.gate_slots] == [
        "attention.query.axis1", "attention.query.axis2", "attention.value", "up"]
    closed = {"attention.query.axis1": [3.0, -10.0], "up": [-10.0, 3.0, 0.0] * 4}
    for name, log_alpha in closed.items():
        model.gates[name].log_alpha[...] = jnp.asarray(log_alpha, jnp.float32)
    ids = token_ids()
    slim = slim_traced_model(model, ids)
    assert slim.params["up.kernel"].shape == (DIM, 8)
    assert slim.params["attention.query.kernel"].shape == (DIM, 1, 4)
    assert slim.params["embed.embedding"].shape == (VOCAB, DIM)
    assert slim.report.max_logit_difference < 1e-5
    assert slim(ids).shape == (4, T, VOCAB)


def test_weight_gates_of_a_tied_table_count_its_entries_once_at_every_position():
    """One weight gate per table entry; closing the entries of one vocabulary row removes that
    row's lookup and its head column, counted once: d weights at T positions."""
    model = traced(tied=True, granularity="weight")
    mask = np.ones((VOCAB, DIM), np.float32)
    mask[3] = 0.0
    dense = count_network(model.layers, {}, model.activation_products)
    masked = count_network(model.layers, {"embed": mask}, model.activation_products)
    assert float(dense["params"] - masked["params"]) == DIM
    assert float(dense["flops"] - masked["flops"]) == DIM * T


def test_the_trace_finds_an_untied_lookup_as_the_producer_of_the_stream_it_starts():
    ids = jax.ShapeDtypeStruct((1, T), jnp.int32)
    untied = trace_structure(TokenLM(nnx.Rngs(0)), ids)
    assert [(layer.kernel, layer.kind) for layer in untied.layers][0] == (
        "embed.embedding", "lookup")
    (stream,) = [g for g in untied.groups if g.stream]
    assert stream.producers[0] == ("embed.embedding", 1) and not stream.removable
    tied = trace_structure(TokenLM(nnx.Rngs(0), tied=True), ids)
    assert [layer.kind for layer in tied.layers if layer.kernel == "embed.embedding"] == ["dense"]
    assert ("embed.embedding", 1) not in {p for g in tied.groups for p in g.producers}
    # the tied head's layer comes where the table is first read: the lookup, in network order
    assert tied.layers[0].kernel == "embed.embedding"
    assert [l.kernel for l in tied.layers[1:]] == [l.kernel for l in untied.layers[1:-1]]


class TwoLookups(nnx.Module):
    """One table looked up at the tokens and at the tokens reversed, summed."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.mix = nnx.Linear(DIM, 12, rngs=rngs)
        self.head = nnx.Linear(12, VOCAB, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids) + self.embed(ids[:, ::-1])
        return self.head(nnx.relu(self.mix(h)))


def test_a_table_looked_up_twice_is_one_layer_that_produces_its_group():
    """Its features, summed with themselves, are one removable group of the embedding (no
    residual stream: the lookups are its only producer), gated on ``mix``'s rows."""
    model = TracedModel(TwoLookups(nnx.Rngs(0)), rngs=nnx.Rngs(params=1), input_shape=(T,),
                        input_dtype=jnp.int32, num_classes=VOCAB)
    assert [(l.name, l.kernel_shape) for l in model.layers] == [
        ("embed", (VOCAB, DIM)), ("mix", (DIM, 12)), ("head", (12, VOCAB))]
    assert [(s.name, s.shape) for s in model.gate_slots] == [
        ("embed", (DIM,)), ("mix", (12,))]
    closed = count_network(model.layers, {"embed": np.zeros(DIM), "mix": np.ones(12)})
    assert float(closed["params"]) == 12 + 12 * VOCAB + VOCAB


def test_a_token_model_without_logits_per_token_says_what_it_returns():
    with pytest.raises(ConfigError, match=r"maps token sequences of shape \(1, 6\) to an output "
                       r"of shape \(1, 20\), not logits of shape \(batch, 6, 20\)"):
        TracedModel(TokenLM(nnx.Rngs(0), pooled=True), rngs=nnx.Rngs(params=1),
                    input_shape=(T,), input_dtype=jnp.int32, num_classes=VOCAB)
