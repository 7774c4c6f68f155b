"""Slimming ``vit_tiny`` and ``lm_tiny`` from their trace: the slim network has the gated one's
eval logits, the widths its gates leave and the parameters the report counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.models.lm import DecoderLM
from sparsejax.models.vit import ViT
from sparsejax.slim.__main__ import main as slim_main
from sparsejax.slim.runs import restore_run
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure import gate_report
from sparsejax.structure.slim_trace import load_slim_function
from sparsejax.structure.traced_model import gate_zoo_network
from tests.commands import run_module
from tests.gated import scale_gates

DEPTH = 3
LM_SHAPE = dict(dim=16, depth=DEPTH, heads=6, kv_heads=2, head_dim=4, ffn_hidden=24,
                input_shape=(8,))
VIT_SHAPE = dict(dim=16, depth=DEPTH, heads=4, head_dim=4, mlp_hidden=24, input_shape=(8, 8, 1))
PATTERNS = ("heads", "kv_groups", "ffn", "hidden", "sublayers", "everything")


def build(kind: str, granularity: str = "unit"):
    """The ViT or the LM (tied or untied), plain modules gated from their trace with scale
    gates."""
    rngs = nnx.Rngs(0)
    if kind == "vit":
        net = ViT(rngs=rngs, **VIT_SHAPE)
    else:
        net = DecoderLM(rngs=rngs, tied=kind == "lm_tied", **LM_SHAPE)
    return gate_zoo_network(net, "vit_tiny" if kind == "vit" else "lm_tiny", rngs=rngs,
                            gate_factory=scale_gates, granularity=granularity)


def inputs(model, batch: int = 2):
    if isinstance(model.net, ViT):
        return jax.random.normal(jax.random.key(3), (batch, *VIT_SHAPE["input_shape"]))
    return jax.random.randint(jax.random.key(3), (batch, 8), 0, 256)


def set_gates(model, pattern: str, rng: np.random.Generator) -> None:
    """Gate values in [0.5, 1.5] (folded, not just masked), zero where ``pattern`` closes:
    random units of its family, every family at once, or whole sublayers (block 0's attention,
    block 1's FFN, both of block 2's: the block goes)."""
    for name, gate in model.gates.items():
        family = name.rsplit(".", 1)[-1]
        values = rng.uniform(0.5, 1.5, gate.shape)
        if pattern == "sublayers":
            closed = name in ("blocks.0.attn", "blocks.1.mlp", "blocks.2.attn", "blocks.2.mlp")
            values = values * (not closed)
        elif family == pattern or pattern == "everything":
            values = values * (rng.random(gate.shape) >= 0.4)
            values.flat[rng.integers(values.size)] = 1.0  # never a whole slot
        gate.value[...] = jnp.asarray(values, jnp.float32)


@nnx.jit
def logits(model, x):
    return model(x, train=False)


def mask(model, slot: str) -> np.ndarray:
    return np.asarray(model.gates[slot].value[...]) != 0


CASES = [
    *[("lm_untied", p) for p in PATTERNS],
    *[("lm_tied", p) for p in ("hidden", "everything")],  # where the table takes the hidden gate
]


@pytest.mark.parametrize("kind, pattern", CASES)
def test_an_lm_slims_from_its_trace_to_the_gated_logits_and_the_gates_widths(kind, pattern):
    """Every key/value group keeps as many query heads as its fullest one (the others' output
    rows are zero); a group, an FFN unit or a hidden dimension whose gates closed goes, and a
    closed sublayer leaves nothing stored."""
    model = build(kind)
    set_gates(model, pattern, np.random.default_rng(PATTERNS.index(pattern)))
    x = np.asarray(inputs(model, 8))
    slim = slim_traced_model(model, x)
    assert slim.report.max_logit_difference < 1e-5 * max(1.0, np.abs(logits(model, x)).max())
    assert slim.params["final_norm.scale"].shape == (mask(model, "hidden").sum(),)
    balanced = True
    for i in range(DEPTH):
        mlp = mask(model, f"blocks.{i}.mlp").all()
        assert (f"blocks.{i}.ffn.up.kernel" in slim.params) == bool(mlp), (i, "mlp")
        if mlp:
            units = slim.params[f"blocks.{i}.ffn.up.kernel"].shape[1]
            assert units == mask(model, f"blocks.{i}.ffn").sum()
        heads = mask(model, f"blocks.{i}.heads").reshape(-1, 2)  # head m G + g at (m, g)
        heads = heads & mask(model, f"blocks.{i}.kv_groups") & mask(model, f"blocks.{i}.attn")
        groups, per_group = heads.any(axis=0), heads.sum(axis=0)
        assert (f"blocks.{i}.attn.q.kernel" in slim.params) == bool(groups.any()), (i, "attn")
        if groups.any():
            assert slim.params[f"blocks.{i}.attn.k.kernel"].shape[1] == 4 * groups.sum()
            assert slim.params[f"blocks.{i}.attn.q.kernel"].shape[1] == (
                4 * per_group.max() * groups.sum())
            balanced &= len(set(per_group[groups].tolist())) == 1
    predicted = gate_report(model)
    if balanced:  # no padding: exactly what the accounting predicts under the test-time masks
        assert slim.report.params_after == pytest.approx(predicted.params)
        assert slim.report.flops_after == pytest.approx(predicted.flops)
    else:
        assert slim.report.params_after > predicted.params


def test_weight_gates_fold_and_dead_heads_and_units_go():
    """Weight gates that zero a query head's output rows and FFN units' down rows: the head
    stays as a filler of its group (the other group keeps three), the units go."""
    model = build("lm_untied", granularity="weight")
    rng = np.random.default_rng(5)
    for name, gate in model.gates.items():
        values = rng.uniform(0.5, 1.5, gate.shape) * (rng.random(gate.shape) >= 0.3)
        if name == "blocks.1.attn.o":  # zero the o rows of query head 0 (rows d * 6 + 0)
            values = values.reshape(4, 6, -1)
            values[:, 0] = 0.0
            values = values.reshape(gate.shape)
        if name == "blocks.0.ffn.down":
            values[:5] = 0.0
        gate.value[...] = jnp.asarray(values, jnp.float32)
    x = np.asarray(inputs(model, 8))
    slim = slim_traced_model(model, x)
    assert slim.report.max_logit_difference < 1e-5 * max(1.0, np.abs(logits(model, x)).max())
    assert slim.params["blocks.0.ffn.up.kernel"].shape[1] == 19
    assert slim.params["blocks.1.attn.q.kernel"].shape[1] == 24  # head 0 is a filler


@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p != "kv_groups"])
def test_a_vit_slims_from_its_trace_to_the_gated_logits_and_the_counted_size(pattern):
    """Multi-head attention (no KV groups). The stream keeps its open dimensions, a closed
    sublayer leaves nothing stored, and the slim size is what the gates' accounting counts."""
    model = build("vit")
    set_gates(model, pattern, np.random.default_rng(PATTERNS.index(pattern)))
    x = np.asarray(jax.random.normal(jax.random.key(3), (8, *VIT_SHAPE["input_shape"])))
    slim = slim_traced_model(model, x)
    assert slim.report.max_logit_difference < 1e-5 * max(1.0, np.abs(logits(model, x)).max())
    (stream,) = [g for g in slim.report.groups if "patch_embed.kernel:1" in g.producers]
    assert stream.width == mask(model, "hidden").sum()
    predicted = gate_report(model)
    assert slim.report.params_after == pytest.approx(predicted.params)
    assert slim.report.flops_after == pytest.approx(predicted.flops)
    for i in range(DEPTH):
        for family, layer in (("attn", "attn.q"), ("mlp", "ffn.up")):
            stored = f"blocks.{i}.{layer}.kernel" in slim.params
            assert stored == bool(mask(model, f"blocks.{i}.{family}").all()), (i, family)


def test_a_vit_whose_heads_and_units_were_zeroed_without_gates_slims_them_away():
    """GReg and gmp prune the placed heads and FFN units of a ViT that has no gates, zeroing
    every slice of a unit (``scale_units``): slimming removes those heads' query, key and value
    columns and output rows, and those units, to the same logits."""
    rngs = nnx.Rngs(0)
    model = gate_zoo_network(ViT(rngs=rngs, **VIT_SHAPE), "vit_tiny", rngs=rngs)
    assert not model.gates
    slots = {slot.name: slot for slot in model.gate_slots}
    model.scale_units(slots["blocks.0.heads"], jnp.array([1.0, 0.0, 1.0, 0.0]))
    model.scale_units(slots["blocks.1.ffn"], jnp.ones(24).at[:10].set(0.0))
    x = np.asarray(inputs(model))
    slim = slim_traced_model(model, x)
    assert slim.report.max_logit_difference < 1e-5 * max(1.0, np.abs(logits(model, x)).max())
    assert slim.params["blocks.0.attn.q.kernel"].shape == (16, 8)  # 2 heads of 4
    assert slim.params["blocks.0.attn.o.kernel"].shape == (8, 16)
    assert slim.params["blocks.1.ffn.up.kernel"].shape == (16, 14)


def test_a_bias_only_branch_keeps_its_constant():
    """Every head of block 0 closed and every MLP unit of block 1: their branches add the
    output projections' biases alone."""
    model = build("vit")
    for gate in model.gates.values():
        gate.value[...] = jnp.ones(gate.shape)
    model.gates["blocks.0.heads"].value[...] = jnp.zeros(4)
    model.gates["blocks.1.ffn"].value[...] = jnp.zeros(24)
    model.net.blocks[0].attn.o.bias[...] = jnp.linspace(-1.0, 1.0, 16)
    model.net.blocks[1].ffn.down.bias[...] = jnp.linspace(1.0, -1.0, 16)
    x = np.asarray(inputs(model))
    slim = slim_traced_model(model, x)
    assert slim.report.max_logit_difference < 1e-5 * max(1.0, np.abs(logits(model, x)).max())
    assert "blocks.0.attn.q.kernel" not in slim.params
    np.testing.assert_allclose(slim.params["blocks.0.attn.o.bias"], jnp.linspace(-1.0, 1.0, 16))


def test_the_input_model_is_unchanged():
    model = build("lm_untied")
    set_gates(model, "everything", np.random.default_rng(2))
    x = inputs(model)
    before = np.asarray(logits(model, x))
    slim_traced_model(model, np.asarray(x))
    np.testing.assert_array_equal(np.asarray(logits(model, x)), before)


def test_slim_command_line_on_an_lm_run(tmp_path):
    run = tmp_path / "run"
    trained = run_module(
        "experiments.lm", "--method=l0_hc", "--model=lm_tiny", "--dataset=python_docs",
        "--epochs=1", "--steps_per_epoch=2", "--batch_size=4", "--config.num_test=8",
        "--config.eval_batch_size=8", f"--workdir={run}", cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    assert slim_main([str(run)]) == 0
    gated, _, _ = restore_run(run)
    loaded = load_slim_function(str(run / "slim" / "slim_function.npz"))
    x = jax.random.randint(jax.random.key(0), (2, 128), 0, 256)
    expected = np.asarray(logits(gated, x))
    np.testing.assert_allclose(np.asarray(loaded(x)), expected,
                               atol=1e-5 * np.abs(expected).max())
