"""vit_tiny and lm_tiny: shapes, causality, GQA, rotary positions, and gates that close exactly
the units they name (the gated model equals the model without those units)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparsejax.data import text
from sparsejax.errors import ConfigError
from sparsejax.gates.hard_concrete import HardConcreteGate
from sparsejax.models import each_slot
from sparsejax.models.lm import DecoderLM
from sparsejax.models.transformer import (
    FAMILIES,
    block_placements,
    family_slots,
    lambdas_by_family,
    rope,
    transformer_blocks,
)
from sparsejax.models.vit import ViT
from sparsejax.structure.accounting import count_network
from sparsejax.structure.report import gate_report, weight_report
from sparsejax.structure.traced_model import (
    TracedModel,
    build_zoo_model,
    gate_zoo_network,
)

VOCAB, CONTEXT = 32, 8
# Every width differs from the others, so an axis's size says which units it indexes.
LM = dict(num_classes=VOCAB, input_shape=(CONTEXT,), dim=12, depth=2, heads=4, kv_heads=2,
          head_dim=4, ffn_hidden=10)
VIT = dict(num_classes=5, input_shape=(8, 8, 1), patch_size=4, dim=12, depth=2, heads=2,
           head_dim=4, mlp_hidden=10)


def lm(seed: int = 0, *, gate_factory=None, granularity="unit", **overrides) -> TracedModel:
    """The LM, a plain module, gated from its trace by its own placements."""
    rngs = nnx.Rngs(seed)
    return gate_zoo_network(DecoderLM(rngs=rngs, **{**LM, **overrides}), "lm_tiny", rngs=rngs,
                            gate_factory=gate_factory, granularity=granularity,
                            input_dtype=jnp.int32)


def vit(seed: int = 0, **overrides) -> TracedModel:
    """The ViT, a plain module, gated from its trace by its own placements (no gate layers)."""
    rngs = nnx.Rngs(seed)
    return gate_zoo_network(ViT(rngs=rngs, **{**VIT, **overrides}), "vit_tiny", rngs=rngs)


def tokens(batch: int = 2, length: int = CONTEXT, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def images(shape=(8, 8, 1), batch: int = 2) -> jax.Array:
    return jax.random.uniform(jax.random.key(2), (batch, *shape))


@nnx.jit
def _forward(model, x, z):
    return model.forward(x, z, train=False)


def logits(model, x, z=None) -> np.ndarray:
    return np.asarray(_forward(model, x, z or {}))


def transplant(big, small, removed: dict[int, list[int]]):
    """``small`` with ``big``'s parameters, minus the given indices along every axis whose size
    is a key of ``removed``."""

    def cut(array):
        for axis, size in enumerate(array.shape):
            if size in removed:
                array = jnp.delete(array, jnp.asarray(removed[size], jnp.int32), axis=axis)
        return array

    nnx.update(small, jax.tree.map(cut, nnx.state(big, nnx.Param)))
    return small


def test_shapes():
    model = lm()
    assert logits(model, tokens()).shape == (2, CONTEXT, VOCAB)
    assert logits(model, tokens(length=5)).shape == (2, 5, VOCAB)
    assert logits(vit(), images()).shape == (2, 5)
    # the registered models at their default sizes, evaluated abstractly
    for shape, pooling in (((28, 28, 1), "cls"), ((32, 32, 3), "mean")):
        out = nnx.eval_shape(lambda: build_zoo_model(
            "vit_tiny", rngs=nnx.Rngs(0), input_shape=shape, pooling=pooling
        )(jnp.zeros((2, *shape)), train=False))
        assert out.shape == (2, 10)
    out = nnx.eval_shape(lambda: build_zoo_model("lm_tiny", rngs=nnx.Rngs(0))(
        jnp.zeros((1, 128), jnp.int32), train=False))
    assert out.shape == (1, 128, 256)


def test_causal_masking_future_tokens_do_not_change_past_logits():
    model, x = lm(), tokens(batch=1)
    t = 4
    changed = x.at[:, t:].set((x[:, t:] + 7) % VOCAB)
    before, after = logits(model, x), logits(model, changed)
    np.testing.assert_allclose(before[:, :t], after[:, :t], rtol=1e-6, atol=1e-6)
    assert not np.allclose(before[:, t], after[:, t])


def test_gqa_equals_mha_with_repeated_key_value_weights():
    gqa = lm(depth=1)
    mha = lm(depth=1, kv_heads=LM["heads"])
    heads, groups, dh = LM["heads"], LM["kv_heads"], LM["head_dim"]
    # MHA head h = g' reads kv column d * H + h; GQA serves head h from group h % G.
    columns = jnp.asarray([d * groups + h % groups for d in range(dh) for h in range(heads)])

    def repeat_key_values(path, array):
        is_kv = any(f"['attn']['{n}']" in jax.tree_util.keystr(path) for n in "kv")
        return array[:, columns] if is_kv else array

    nnx.update(mha, jax.tree_util.tree_map_with_path(repeat_key_values,
                                                     nnx.state(gqa, nnx.Param)))
    np.testing.assert_allclose(logits(gqa, tokens()), logits(mha, tokens()), rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_on_relative_position_only():
    key_q, key_k = jax.random.split(jax.random.key(3))
    q = jax.random.normal(key_q, (1, 1, 8))
    k = jax.random.normal(key_k, (1, 1, 8))

    def score(t, s):
        return float(jnp.sum(rope(q, jnp.asarray([t])) * rope(k, jnp.asarray([s]))))

    assert score(5, 2) == pytest.approx(score(12, 9), rel=1e-4)
    assert score(0, 3) == pytest.approx(score(20, 23), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)
    np.testing.assert_allclose(rope(q, jnp.asarray([0])), q, rtol=1e-6)
    assert float(jnp.linalg.norm(rope(q, jnp.asarray([7])))) == pytest.approx(
        float(jnp.linalg.norm(q)), rel=1e-5)


def _closed(size: int, *indices: int, batch: int | None = None) -> jax.Array:
    z = jnp.ones((size,)).at[jnp.asarray(indices)].set(0.0)
    return z if batch is None else jnp.broadcast_to(z, (batch, size))


def test_closing_a_query_head_equals_zeroing_its_output_projection_rows():
    model, x = lm(), tokens()
    heads, dh, head = LM["heads"], LM["head_dim"], 3
    gated = logits(model, x, {"blocks.1.heads": _closed(heads, head)})
    kernel = model.net.blocks[1].attn.o.kernel
    kernel[...] = kernel[...].at[jnp.arange(dh) * heads + head].set(0.0)
    np.testing.assert_allclose(gated, logits(model, x), rtol=1e-5, atol=1e-5)


def test_closing_a_kv_group_equals_the_model_without_it():
    heads, groups, dh, group = LM["heads"], LM["kv_heads"], LM["head_dim"], 1
    per_group = heads // groups
    big, x = lm(), tokens()
    query = [d * heads + m * groups + group for d in range(dh) for m in range(per_group)]
    key_value = [d * groups + group for d in range(dh)]
    small = transplant(big, lm(heads=heads - per_group, kv_heads=groups - 1),
                       {heads * dh: query, groups * dh: key_value})
    z = {f"blocks.{i}.kv_groups": _closed(groups, group) for i in range(2)}
    np.testing.assert_allclose(logits(big, x, z), logits(small, x), rtol=1e-5, atol=1e-5)


def test_closing_a_vit_head_equals_the_model_without_it():
    heads, dh, head = VIT["heads"], VIT["head_dim"], 0
    big, x = vit(), images()
    removed = {heads * dh: [d * heads + head for d in range(dh)]}
    small = transplant(big, vit(heads=heads - 1), removed)
    both = {f"blocks.{i}.heads": _closed(heads, head) for i in range(2)}
    np.testing.assert_allclose(logits(big, x, both), logits(small, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,inputs", [(lm, tokens), (vit, images)], ids=["lm", "vit"])
def test_closing_ffn_units_equals_the_model_without_them(make, inputs):
    big, x = make(), inputs()
    hidden = 10
    small = transplant(big, make(**{"ffn_hidden" if make is lm else "mlp_hidden": hidden - 2}),
                       {hidden: [2, 7]})
    z = {f"blocks.{i}.ffn": _closed(hidden, 2, 7) for i in range(2)}
    np.testing.assert_allclose(logits(big, x, z), logits(small, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,inputs", [(lm, tokens), (vit, images)], ids=["lm", "vit"])
def test_closing_hidden_dimensions_equals_the_model_without_them(make, inputs):
    big, x = make(), inputs()
    dim = 12
    small = transplant(big, make(dim=dim - 2), {dim: [0, 5]})
    gated = logits(big, x, {"hidden": _closed(dim, 0, 5)})
    np.testing.assert_allclose(gated, logits(small, x), rtol=1e-4, atol=1e-5)
    per_example = logits(big, x, {"hidden": _closed(dim, 0, 5, batch=x.shape[0])})
    np.testing.assert_allclose(per_example, gated, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make,inputs", [(lm, tokens), (vit, images)], ids=["lm", "vit"])
def test_closing_a_sublayer_equals_zeroing_its_branch(make, inputs):
    model, x = make(), inputs()
    z = {"blocks.0.attn": jnp.zeros((1,)), "blocks.1.mlp": jnp.zeros((1,))}
    gated = logits(model, x, z)
    blocks = model.net.blocks
    for dense in (blocks[0].attn.o, blocks[1].ffn.down):
        dense.kernel[...] = jnp.zeros_like(dense.kernel[...])
        if dense.bias is not None:
            dense.bias[...] = jnp.zeros_like(dense.bias[...])
    np.testing.assert_allclose(gated, logits(model, x), rtol=1e-5, atol=1e-6)


def test_per_example_head_gates_gate_each_example_separately():
    model, x = lm(), tokens()
    heads = LM["heads"]
    z = jnp.stack([jnp.ones((heads,)), _closed(heads, 1)])
    per_example = logits(model, x, {"blocks.0.heads": z})
    np.testing.assert_allclose(per_example[0], logits(model, x)[0], rtol=1e-5, atol=1e-6)
    shared = logits(model, x, {"blocks.0.heads": _closed(heads, 1)})
    np.testing.assert_allclose(per_example[1], shared[1], rtol=1e-5, atol=1e-6)


def _gate_values(model, seed: int = 4) -> dict[str, jax.Array]:
    """Values in (0.2, 1) for every slot, with the first unit of each slot of more than one unit
    closed (a head, a KV group, an FFN unit, a hidden dimension)."""
    keys = jax.random.split(jax.random.key(seed), len(model.gate_slots))
    z = {}
    for key, slot in zip(keys, model.gate_slots):
        values = jax.random.uniform(key, slot.shape, minval=0.2, maxval=1.0)
        z[slot.name] = values.at[0].set(0.0) if slot.shape[0] > 1 else values
    return z


@pytest.mark.parametrize("make,inputs", [(lm, tokens), (vit, images)], ids=["lm", "vit"])
def test_shared_gates_folded_into_weights_equal_gating_the_activations(make, inputs):
    """Batch-shared gates are folded into the projections' rows / columns and the norms' scales;
    per-example gates multiply the activations. The same gates given per example (broadcast over
    the batch) must give the same logits, parameter gradients and gate gradients."""
    model, x = make(), inputs()
    z = _gate_values(model)
    graphdef, params = nnx.split(model, nnx.Param)
    weights = jax.random.normal(jax.random.key(5), logits(model, x).shape)

    def loss(params, z, per_example):
        m = nnx.merge(graphdef, params)
        if per_example:
            z = {name: jnp.broadcast_to(v, (x.shape[0], *v.shape)) for name, v in z.items()}
        return jnp.sum(m.forward(x, z, train=True) * weights), m.forward(x, z, train=True)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (folded_params, folded_z), folded = grad(params, z, False)
    (gated_params, gated_z), gated = grad(params, z, True)
    np.testing.assert_allclose(folded, gated, rtol=1e-5, atol=1e-6)
    for name in z:
        np.testing.assert_allclose(folded_z[name], gated_z[name], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    leaves = jax.tree_util.tree_leaves_with_path(folded_params)
    for (path, a), b in zip(leaves, jax.tree.leaves(gated_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert any(float(jnp.max(jnp.abs(v))) > 1e-3 for v in folded_z.values())


@pytest.mark.parametrize("make", [lm, vit, lambda: lm(tied=False)], ids=["lm", "vit", "untied"])
def test_group_size_is_the_params_one_gate_removes(make):
    model = make()
    dense = count_network(model.layers, {})
    for slot in model.gate_slots:
        closed = {slot.name: jnp.ones(slot.shape).at[0].set(0.0)}
        removed = dense["params"] - count_network(model.layers, closed)["params"]
        assert slot.group_size == int(removed), slot.name
    assert set(family_slots(model.gate_slots)) <= set(FAMILIES)


def test_attention_flops_include_the_sequence_length():
    model = lm()
    heads, dh, dim, depth, t = LM["heads"], LM["head_dim"], LM["dim"], LM["depth"], CONTEXT
    products = model.activation_products
    with_attention = count_network(model.layers, {}, products)["flops"]
    without = count_network(model.layers, {})["flops"]
    assert with_attention - without == depth * 2 * heads * dh * t * t
    closed = {"blocks.0.heads": jnp.ones((heads,)).at[2].set(0.0)}
    saved = with_attention - count_network(model.layers, closed, products)["flops"]
    assert saved == 2 * dh * t * t + t * 2 * dim * dh  # scores and mix, q columns and o rows


def test_params_match_the_declared_layers_and_untied_adds_a_head():
    model = lm()
    norms = (2 * LM["depth"] + 1) * LM["dim"]
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert total == count_network(model.layers, {})["params"] + norms
    untied = lm(tied=False)
    extra = sum(x.size for x in jax.tree.leaves(nnx.state(untied, nnx.Param))) - total
    assert extra == LM["dim"] * VOCAB


def test_families_choose_the_slots_and_weight_granularity_gates_every_kernel():
    model = lm(families=("heads", "hidden"))
    assert {s.name for s in model.gate_slots} == {"hidden", "blocks.0.heads", "blocks.1.heads"}
    assert all(s.name.endswith("heads") or s.name == "hidden" for s in model.gate_slots)
    mha = vit()
    assert "blocks.0.kv_groups" not in {s.name for s in mha.gate_slots}  # MHA: heads suffice
    named = {name for layer in mha.layers for name, _ in layer.inputs + layer.outputs}
    assert named == {s.name for s in mha.gate_slots}
    weights = lm(granularity="weight")
    assert {s.name for s in weights.gate_slots} == {l.name for l in weights.layers}
    z = {s.name: jnp.ones(s.shape) for s in weights.gate_slots}
    np.testing.assert_allclose(logits(weights, tokens(), z), logits(weights, tokens()), rtol=1e-6)
    z["blocks.0.ffn.down"] = jnp.zeros(z["blocks.0.ffn.down"].shape)
    assert not np.allclose(logits(weights, tokens(), z), logits(weights, tokens()))
    with pytest.raises(ValueError, match="unknown gate families"):
        lm(families=("rows",))


def test_hard_concrete_gates_train_and_report():
    factory = each_slot(
        lambda slot, rngs: HardConcreteGate(slot.shape, rngs=rngs, droprate_init=0.5))
    model = lm(gate_factory=factory)
    train = nnx.jit(lambda m, x: m(x, train=True, rngs=nnx.Rngs(gates=0)))(model, tokens())
    assert train.shape == (2, CONTEXT, VOCAB) and np.all(np.isfinite(train))
    report = gate_report(model)
    assert report.dense_flops == count_network(model.layers, {}, model.activation_products)["flops"]
    assert 0 < report.expected_flops < report.dense_flops
    assert set(report.active_units) == {s.name for s in model.gate_slots}


def test_lambdas_by_family_follow_the_slot_order():
    slots = lm().gate_slots
    lambdas = lambdas_by_family(slots, {"heads": 2.0, "hidden": 3.0}, default=1.0)
    expected = {"heads": 2.0, "hidden": 3.0}
    assert lambdas == tuple(expected.get(s.name.rsplit(".", 1)[-1], 1.0) for s in slots)
    assert lambdas[0] == 3.0 and slots[0].name == "hidden"
    with pytest.raises(ValueError, match="unknown gate families"):
        lambdas_by_family(slots, {"head": 1.0})


def test_a_model_without_gates_counts_the_attention_of_its_live_heads():
    model = lm()
    heads, dh, dim, t = LM["heads"], LM["head_dim"], LM["dim"], CONTEXT
    dense = weight_report(model)
    assert dense.flops == dense.dense_flops == count_network(
        model.layers, {}, model.activation_products)["flops"]
    kernel = model.net.blocks[0].attn.o.kernel
    kernel[...] = kernel[...].at[jnp.arange(dh) * heads + 2].set(0.0)  # head 2 is dead
    report = weight_report(model)
    assert report.active_units["blocks.0.heads"] == heads - 1
    assert dense.flops - report.flops == 2 * dh * t * t + t * 2 * dim * dh


def test_a_model_given_the_other_kind_of_input_is_a_config_error():
    with pytest.raises(ConfigError, match="text dataset"):
        lm(input_shape=(28, 28, 1))
    with pytest.raises(ConfigError, match="image dataset"):
        vit(input_shape=(128,))


def test_a_short_run_beats_the_unigram_baseline():
    data = text.load_text("python_docs")
    model = DecoderLM(rngs=nnx.Rngs(0), input_shape=(32,), dim=32, depth=1, heads=2, kv_heads=1,
                      head_dim=16, ffn_hidden=64)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    def loss(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    @nnx.jit
    def step(m, opt, x, y):
        value, grads = nnx.value_and_grad(loss)(m, x, y)
        opt.update(m, grads)
        return value

    for _, (x, y) in zip(range(80), data.train_batches(32, 16, seed=0, epoch=0)):
        step(model, optimizer, jnp.asarray(x), jnp.asarray(y))
    x, y = data.sequences("test", 32, np.arange(256))
    bits = float(nnx.jit(loss)(model, jnp.asarray(x), jnp.asarray(y))) / np.log(2)
    unigram = text.unigram_bits_per_byte(data.train_stream, y.reshape(-1).astype(np.uint8))
    assert bits < unigram - 0.3


def test_placements_of_grouped_query_attention_place_query_heads_and_key_value_groups():
    blocks = transformer_blocks(1, 8, heads=4, kv_heads=2, ffn_hidden=6, head_dim=2, norm="rms",
                                ffn="swiglu", use_bias=False, causal=True, rotary=False,
                                rngs=nnx.Rngs(0))
    placed = block_placements(blocks, ("heads", "kv_groups", "ffn", "attn", "mlp"))
    assert [(p.slot, p.layer, p.heads) for p in placed[:4]] == [
        ("blocks.0.heads", "blocks.0.attn.q", 4), ("blocks.0.heads", "blocks.0.attn.v", 4),
        ("blocks.0.kv_groups", "blocks.0.attn.k", 2), ("blocks.0.kv_groups", "blocks.0.attn.v", 2)]
    assert [p.slot for p in placed[4:]] == ["blocks.0.attn", "blocks.0.ffn", "blocks.0.mlp"]
