"""Methods on gates that span several parameters: the parameter groups of a transformer's slots
(heads, KV groups, FFN units, hidden dimensions, sublayers) in the gated L2, the group norms,
Dep-L0's penalty and generator, and GReg's groups and masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.lm import get_config
from sparsejax.methods import METHODS, RunInfo, create_method
from sparsejax.methods.dep_penalty import dep_l0_penalty
from sparsejax.methods.greg.schedule import FINETUNE
from sparsejax.methods.penalties import gated_l2
from sparsejax.methods.slot_groups import (
    layer_members,
    unit_mean_magnitudes,
    unit_norms,
    unit_sums,
)
from sparsejax.models.lm import DecoderLM
from sparsejax.models.transformer import family_chain_order
from sparsejax.models.vit import ViT
from sparsejax.structure.accounting import count_network
from sparsejax.structure.report import sparsity_report, weight_report
from sparsejax.structure.traced_model import TracedModel, gate_zoo_network
from sparsejax.train.sharding import create_mesh
from sparsejax.train.state import init_state, merge_model
from sparsejax.train.step import make_train_step

VOCAB, CONTEXT = 32, 8
LM = dict(num_classes=VOCAB, input_shape=(CONTEXT,), dim=12, depth=2, heads=4, kv_heads=2,
          head_dim=4, ffn_hidden=10)
VIT = dict(num_classes=5, input_shape=(8, 8, 1), patch_size=4, dim=12, depth=2, heads=2,
           head_dim=4, mlp_hidden=10)
MODELS = {
    "lm_gqa": lambda **kw: traced_lm(**kw),
    "lm_mha_untied": lambda **kw: traced_lm(**{"kv_heads": 4, "tied": False, **kw}),
    "vit": lambda **kw: traced_vit(**kw),
}


def traced_lm(*, gate_factory=None, **overrides) -> TracedModel:
    """The LM, a plain module, gated from its trace by its own placements."""
    rngs = nnx.Rngs(0)
    return gate_zoo_network(DecoderLM(rngs=rngs, **{**LM, **overrides}), "lm_tiny", rngs=rngs,
                            gate_factory=gate_factory)


def traced_vit(**overrides) -> TracedModel:
    """The ViT (mean pooling), a plain module, gated from its trace by its own placements."""
    rngs = nnx.Rngs(0)
    net = ViT(rngs=rngs, **{**VIT, "pooling": "mean", **overrides})
    return gate_zoo_network(net, "vit_tiny", rngs=rngs)


def network(model):
    """The module holding the blocks: a traced model's plain network, or the model."""
    return getattr(model, "net", model)


def randomize(model):
    """Every parameter (biases and norms too) drawn at random, so that no group is zero."""
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    nnx.update(model, jax.tree.unflatten(
        tree, [jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)]))
    return model


def tokens(batch: int = 2) -> jax.Array:
    return jax.random.randint(jax.random.key(1), (batch, CONTEXT), 0, VOCAB)


def inputs_of(model):
    if isinstance(model.net, DecoderLM):
        return tokens()
    return jax.random.uniform(jax.random.key(2), (2, 8, 8, 1))


def slot(model, name):
    return next(s for s in model.gate_slots if s.name == name)


def head_members_by_hand(model, block: int, head: int) -> list[np.ndarray]:
    """The entries of one query head, sliced by hand: query (and in MHA key / value) columns
    h, h + H, ... (the (head_dim, M, G) layout, G fastest), their biases, output rows."""
    attn = network(model).blocks[block].attn
    heads = attn.heads
    parts = [attn.q.kernel[...][:, head::heads], attn.o.kernel[...][head::heads]]
    if attn.kv_heads == heads:
        parts += [attn.k.kernel[...][:, head::heads], attn.v.kernel[...][:, head::heads]]
    for name in ("q", "k", "v") if attn.kv_heads == heads else ("q",):
        bias = getattr(attn, name).bias
        if bias is not None:
            parts.append(bias[...][head::heads])
    return [np.asarray(p) for p in parts]


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_the_members_of_every_unit_are_the_params_one_gate_removes(make):
    """Per unit, the layer entries of a slot's groups number its ``group_size`` (tested against
    the accounting in the model tests), and every entry of a kernel axis has one unit."""
    model = make()
    for s in model.gate_slots:
        count = sum(
            unit_sums(jnp.ones(model.parameter(m.path).shape), m, s)
            for m in layer_members(model, s)
        )
        np.testing.assert_array_equal(count, np.full(s.shape, s.group_size), err_msg=s.name)
        for m in model.slot_members(s):
            shape = model.parameter(m.path).shape
            if m.units is not None:
                assert len(m.units) == shape[m.axis] and set(m.units) <= set(range(s.shape[0]))


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_a_head_group_norm_is_the_norm_of_exactly_its_members(make):
    """||group of head h|| = the norm of its hand-sliced q / k / v / o entries; changing any
    member entry changes it and nothing else's."""
    model = randomize(make())
    heads = slot(model, "blocks.1.heads")
    norms = np.asarray(unit_norms(model, heads))
    for h in range(heads.shape[0]):
        by_hand = np.sqrt(sum(np.sum(p**2) for p in head_members_by_hand(model, 1, h)))
        np.testing.assert_allclose(norms[h], by_hand, rtol=1e-5)
    attn = network(model).blocks[1].attn
    mha = attn.kv_heads == attn.heads
    for name in ("q", "o", *(("k", "v") if mha else ())):
        kernel = getattr(attn, name).kernel
        original = kernel[...]
        column = 1 + attn.heads  # head 1, second head_dim entry
        index = (column, 0) if name == "o" else (0, column)
        kernel[...] = original.at[index].add(1.0)
        changed = np.asarray(unit_norms(model, heads))
        kernel[...] = original
        assert changed[1] != norms[1], name
        np.testing.assert_array_equal(np.delete(changed, 1), np.delete(norms, 1))
    if not mha:  # a GQA head owns no key / value columns
        original = attn.k.kernel[...]
        attn.k.kernel[...] = original + 1.0
        np.testing.assert_array_equal(unit_norms(model, heads), norms)
        attn.k.kernel[...] = original


def test_kv_group_ffn_and_hidden_norms_by_hand():
    model = randomize(MODELS["lm_gqa"]())
    net = network(model)
    attn, ffn = net.blocks[0].attn, net.blocks[0].ffn
    groups = np.asarray(unit_norms(model, slot(model, "blocks.0.kv_groups")))
    g, count = 1, attn.kv_heads
    by_hand = sum(np.sum(getattr(attn, name).kernel[...][:, g::count] ** 2) for name in "qkv")
    by_hand += np.sum(attn.o.kernel[...][g::count] ** 2)
    np.testing.assert_allclose(groups[g], np.sqrt(by_hand), rtol=1e-5)
    units = np.asarray(unit_norms(model, slot(model, "blocks.0.ffn")))
    j = 3
    by_hand = (np.sum(ffn.gate.kernel[...][:, j] ** 2) + np.sum(ffn.up.kernel[...][:, j] ** 2)
               + np.sum(ffn.down.kernel[...][j] ** 2))
    np.testing.assert_allclose(units[j], np.sqrt(by_hand), rtol=1e-5)
    hidden = np.asarray(unit_norms(model, slot(model, "hidden")))
    d = 5
    by_hand = np.sum(net.embed.kernel[...][d] ** 2)
    for block in net.blocks:
        by_hand += sum(np.sum(getattr(block.attn, n).kernel[...][d] ** 2) for n in "qkv")
        by_hand += np.sum(block.attn.o.kernel[...][:, d] ** 2)
        by_hand += sum(np.sum(getattr(block.ffn, n).kernel[...][d] ** 2) for n in ("gate", "up"))
        by_hand += np.sum(block.ffn.down.kernel[...][:, d] ** 2)
    np.testing.assert_allclose(hidden[d], np.sqrt(by_hand), rtol=1e-5)


def _outer(rows, columns):
    return np.asarray(rows)[:, None] * np.asarray(columns)[None, :]


def test_gated_l2_weights_every_entry_by_every_gate_it_belongs_to():
    """(l2/2) sum_e prod_g q_g theta_e^2, the weights built by hand from the layouts: a query
    entry (row d, column c) carries q_hidden[d] q_head[c % H] q_group[c % G] q_attn."""
    model = randomize(MODELS["lm_gqa"]())
    key = jax.random.key(3)
    probs = {s.name: np.asarray(jax.random.uniform(jax.random.fold_in(key, i), s.shape))
             for i, s in enumerate(model.gate_slots)}
    hidden, net = probs["hidden"], network(model)
    total = np.sum(_outer(hidden, np.ones(VOCAB)) * net.embed.kernel[...] ** 2)
    for i, block in enumerate(net.blocks):
        attn, ffn = block.attn, block.ffn
        p = {f: probs[f"blocks.{i}.{f}"] for f in ("heads", "kv_groups", "attn", "ffn", "mlp")}
        columns = np.arange(attn.heads * attn.head_dim)
        query = p["heads"][columns % attn.heads] * p["kv_groups"][columns % attn.kv_heads]
        query = query * p["attn"][0]
        key_value = p["kv_groups"][np.arange(attn.kv_heads * attn.head_dim) % attn.kv_heads]
        key_value = key_value * p["attn"][0]
        total += np.sum(_outer(hidden, query) * attn.q.kernel[...] ** 2)
        total += np.sum(_outer(query, hidden) * attn.o.kernel[...] ** 2)
        for name in ("k", "v"):
            total += np.sum(_outer(hidden, key_value) * getattr(attn, name).kernel[...] ** 2)
        units = p["ffn"] * p["mlp"][0]
        for name in ("gate", "up"):
            total += np.sum(_outer(hidden, units) * getattr(ffn, name).kernel[...] ** 2)
        total += np.sum(_outer(units, hidden) * ffn.down.kernel[...] ** 2)
    got = gated_l2(model, {k: jnp.asarray(v) for k, v in probs.items()}, 0.3)
    np.testing.assert_allclose(got, 0.15 * total, rtol=1e-5)
    # only the heads gated: the dense L2 less (1 - q_h) times each head's own members
    heads = {"blocks.0.heads": jnp.asarray([0.25, 1.0, 0.5, 0.0])}
    dense = sum(np.sum(np.asarray(leaf) ** 2) for layer in model.layers
                for leaf in [model.layer_module(layer.name).kernel[...]])
    removed = sum((1 - float(q)) * sum(np.sum(p**2) for p in head_members_by_hand(model, 0, h))
                  for h, q in enumerate(heads["blocks.0.heads"]))
    np.testing.assert_allclose(gated_l2(model, heads, 2.0), dense - removed, rtol=1e-5)


def test_dep_l0_penalty_counts_each_weight_with_all_its_gates_and_the_chain_runs_over_blocks():
    model = MODELS["lm_gqa"]()
    key = jax.random.key(4)
    probs = {s.name: jax.random.uniform(jax.random.fold_in(key, i), s.shape)
             for i, s in enumerate(model.gate_slots)}
    expected = count_network(model.layers, probs)["weights"]
    got = dep_l0_penalty(model.layers, model.gate_slots, probs, 2.0)
    np.testing.assert_allclose(got, 2.0 * expected, rtol=1e-5)
    order = [s.name for s in family_chain_order(model.gate_slots)]
    assert order == ["hidden", "blocks.0.heads", "blocks.1.heads", "blocks.0.kv_groups",
                     "blocks.1.kv_groups", "blocks.0.attn", "blocks.1.attn", "blocks.0.ffn",
                     "blocks.1.ffn", "blocks.0.mlp", "blocks.1.mlp"]
    method = create_method("dep_l0", get_config("dep_l0"), RunInfo(num_train=64))
    gated = traced_lm(gate_factory=method.make_gates)
    generator = next(iter(gated.gates.values())).generator
    widths = [layer.kernel.shape[1] for layer in generator.layers]
    assert widths == [dict((s.name, s.shape[0]) for s in model.gate_slots)[n] for n in order]


@pytest.mark.parametrize("make,family", [
    (MODELS["lm_gqa"], "heads"), (MODELS["lm_gqa"], "kv_groups"), (MODELS["lm_gqa"], "ffn"),
    (MODELS["lm_mha_untied"], "heads"), (MODELS["vit"], "heads"), (MODELS["vit"], "ffn"),
])
def test_zeroing_a_units_members_equals_closing_its_gate(make, family):
    """GReg's mask (``GatedModel.scale_units``) zeroes every member of a unit: the logits equal the
    model whose gate closes that unit, which equals the model without it (model tests)."""
    model = randomize(make())
    name = f"blocks.1.{family}"
    units = slot(model, name).shape[0]
    unit = 2 if family == "ffn" else 1  # the random ViT's FFN unit 1 barely moves its logits
    mask = jnp.ones(units).at[unit].set(0.0)
    x = inputs_of(model)
    closed = model.forward(x, {name: mask}, train=False)
    before = model.forward(x, {}, train=False)
    model.scale_units(slot(model, name), mask)
    np.testing.assert_allclose(model.forward(x, {}, train=False), closed, rtol=1e-5, atol=1e-5)
    assert not np.allclose(before, closed, atol=1e-3)
    for member in model.slot_members(slot(model, name)):
        value = np.asarray(model.parameter(member.path)[...])
        owned = np.asarray(member.units) == unit if member.units is not None else np.arange(
            value.shape[member.axis]) == unit
        assert np.all(np.compress(owned, value, axis=member.axis) == 0), member.path
        assert np.all(np.compress(~owned, value, axis=member.axis) != 0), member.path


def greg_config(stage_pr="heads:0.5,ffn:0.2"):
    config = get_config("greg1")
    config.update(stage_pr=stage_pr, pretrain_epochs=0, greg_interval=1, greg_delta=0.5,
                  greg_ceiling=1.0, greg_stabilise_steps=1, learning_rate=1e-3, lr_prune=1e-3,
                  fine_tune_epochs=1)
    return config


def test_greg_on_heads_and_ffn_units_prunes_whole_units_and_the_accounting_counts_them():
    config = greg_config()
    method = create_method("greg1", config, RunInfo(num_train=8, steps_per_epoch=4))
    model = traced_lm()
    pruned = method.pruned_layers(model)
    assert [(p.name, p.count) for p in pruned] == [
        ("blocks.0.heads", 2), ("blocks.0.ffn", 2), ("blocks.1.heads", 2), ("blocks.1.ffn", 2)]
    state = method.init(model)
    scores = {p.name: np.asarray(unit_mean_magnitudes(model, slot(model, p.name)))
              for p in pruned}
    x = tokens()
    for step in range(6):
        state = method.before_update(model, state, jnp.asarray(step))
        state = method.after_update(model, state, jnp.asarray(step), jax.random.key(0))
    assert int(state["phase"]) == FINETUNE
    masks = {p.name: np.asarray(layer["mask"]) for p, layer in zip(pruned, state["layers"])}
    for name, mask in masks.items():  # the smallest mean |w| over each unit's kernel entries
        assert set(np.flatnonzero(mask == 0)) == set(np.argsort(scores[name], stable=True)[:2])
    # the gate accounting with the masks as gates, and a KV group closed when it lost its heads
    heads, groups = 4, 2
    values = dict(masks)
    for block in (0, 1):
        kept = masks[f"blocks.{block}.heads"].reshape(heads // groups, groups)
        values[f"blocks.{block}.kv_groups"] = (kept.sum(axis=0) > 0).astype(np.float32)
    expected = count_network(model.layers, values, model.activation_products)
    report = weight_report(model)
    assert report.params == pytest.approx(float(expected["params"]))
    assert report.flops == pytest.approx(float(expected["flops"]))
    dense = count_network(model.layers, {}, model.activation_products)
    assert report.params < float(dense["params"])
    facts = method.report(model, state)
    assert facts["greg/widths"] == {name: int(np.sum(m)) for name, m in masks.items()}
    assert facts["greg/params"] == pytest.approx(report.params)
    assert np.isfinite(np.asarray(model(x, train=False))).all()


def test_greg_slot_ratios_are_checked():
    model = traced_lm()
    method = create_method("greg1", greg_config({"hidden": 0.25}), RunInfo(num_train=8))
    assert [(p.name, p.count) for p in method.pruned_layers(model)] == [("hidden", 3)]
    for bad in ("rows:0.5", {"nope": 0.5}, [0.1, 0.2]):
        method = create_method("greg1", greg_config(bad), RunInfo(num_train=8))
        with pytest.raises(Exception, match="stage_pr"):
            method.pruned_layers(model)


PRUNING = ("gmp", "greg1")
"""Methods whose few steps below already prune (their schedules shortened; GReg-2 picks its
pruned set later)."""


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_a_few_steps_on_a_tiny_lm(name):
    """Six jitted steps of every method on a one-block LM with every gate family; the run's
    report is finite, and the pruning schedules shortened here remove parameters from it."""
    config = greg_config() if name.startswith("greg") else get_config(name)
    config.update(l2=1e-4)
    if name == "gmp":
        config.update(prune_every=1, prune_end_epoch=1.0)
    method = create_method(name, config, RunInfo(num_train=16, steps_per_epoch=4, epochs=2))
    model = traced_lm(gate_factory=method.make_gates, depth=1)
    tx = method.optimizer()
    graphdef, state = init_state(model, method.init(model), tx, jax.random.key(0))
    step = make_train_step(graphdef, method, tx, create_mesh(1))
    x = jax.random.randint(jax.random.key(5), (4, CONTEXT + 1), 0, VOCAB)
    for _ in range(6):
        state, metrics = step(state, x[:, :-1], x[:, 1:])
        assert np.isfinite(float(metrics["loss"])), name
    trained = merge_model(graphdef, state.params, state.model_state)
    report = sparsity_report(trained)
    dense = float(count_network(trained.layers, {}, trained.activation_products)["params"])
    assert 0 < report.params <= dense and np.isfinite(report.flops)
    if name in PRUNING:
        assert report.params < dense
