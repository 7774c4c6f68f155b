"""Slimming ``vit_tiny`` (from its trace) and ``lm_tiny`` (its declared surgery): the slim model
has the gated one's eval logits, the widths its gates leave and the parameters the report
counts; it saves and loads."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.models.lm import DecoderLM
from sparsejax.models.vit import ViT
from sparsejax.slim import slim_model
from sparsejax.slim.__main__ import main as slim_main
from sparsejax.slim.runs import restore_run
from sparsejax.slim.store import SLIM_CONFIG_FILE, ModelSpec, load_slim, save_slim
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure import gate_report
from sparsejax.structure.traced_model import TracedModel, build_zoo_model, gate_zoo_network
from tests.commands import run_module
from tests.gated import scale_gates

DEPTH = 3
LM_SHAPE = dict(dim=16, depth=DEPTH, heads=6, kv_heads=2, head_dim=4, ffn_hidden=24,
                input_shape=(8,))
VIT_SHAPE = dict(dim=16, depth=DEPTH, heads=4, head_dim=4, mlp_hidden=24, input_shape=(8, 8, 1))
PATTERNS = ("heads", "kv_groups", "ffn", "hidden", "sublayers", "everything")


def build(kind: str, granularity: str = "unit"):
    if kind == "vit":
        rngs = nnx.Rngs(0)
        return gate_zoo_network(ViT(rngs=rngs, **VIT_SHAPE), "vit_tiny", rngs=rngs,
                                gate_factory=scale_gates, granularity=granularity)
    return DecoderLM(rngs=nnx.Rngs(0), gate_factory=scale_gates, granularity=granularity,
                     tied=kind == "lm_tied", **LM_SHAPE)


def inputs(model):
    if isinstance(model, TracedModel):
        return jax.random.normal(jax.random.key(3), (2, *VIT_SHAPE["input_shape"]))
    return jax.random.randint(jax.random.key(3), (2, 8), 0, 256)


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


def assert_same_logits(model, slim):
    x = inputs(model)
    expected, got = np.asarray(logits(model, x)), np.asarray(logits(slim, x))
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()))


def declared_entries(model) -> int:
    """Kernel and bias entries of the declared layers, read from the arrays themselves."""
    total = 0
    for layer in model.layers:
        module = model.layer_module(layer.name)
        total += module.kernel[...].size
        total += 0 if getattr(module, "bias", None) is None else module.bias[...].size
    return total


def mask(model, slot: str) -> np.ndarray:
    return np.asarray(model.gates[slot].value[...]) != 0


CASES = [
    *[("lm_untied", p) for p in PATTERNS],
    *[("lm_tied", p) for p in ("hidden", "everything")],  # where the table takes the hidden gate
]


@pytest.mark.parametrize("kind, pattern", CASES)
def test_slim_transformer_has_the_gated_logits_and_the_gates_widths(kind, pattern):
    model = build(kind)
    set_gates(model, pattern, np.random.default_rng(PATTERNS.index(pattern)))
    result = slim_model(model)
    slim = result.model
    assert type(slim) is type(model) and not slim.gates
    assert_same_logits(model, slim)

    kept = [i for i in range(DEPTH)
            if mask(model, f"blocks.{i}.attn").any() or mask(model, f"blocks.{i}.mlp").any()]
    assert len(slim.blocks) == len(kept)
    assert slim.dim == mask(model, "hidden").sum()
    widths = slim.block_widths()
    for new, old in enumerate(kept):
        ffn_open = mask(model, f"blocks.{old}.mlp").all()
        assert widths["ffn_hidden"][new] == (ffn_open and mask(model, f"blocks.{old}.ffn").sum())
        heads = mask(model, f"blocks.{old}.heads").reshape(-1, model.blocks[old].attn.kv_heads)
        if f"blocks.{old}.kv_groups" in model.gates:
            heads = heads & mask(model, f"blocks.{old}.kv_groups")
        if not mask(model, f"blocks.{old}.attn").all():
            heads = heads & False
        groups = heads.any(axis=0)
        assert widths["kv_heads"][new] == groups.sum()
        per_group = heads.sum(axis=0).max()  # GQA pads every kept group to the fullest one
        assert widths["heads"][new] == per_group * groups.sum()

    assert result.report.params_after == declared_entries(slim)
    predicted = gate_report(model)
    balanced = all(
        len(set(m.sum(axis=0)[m.any(axis=0)])) <= 1
        for i in kept
        for m in [mask(model, f"blocks.{i}.heads").reshape(-1, model.blocks[i].attn.kv_heads)]
    )
    if balanced:  # no padding: exactly what the accounting predicts under the test-time masks
        assert result.report.params_after == pytest.approx(predicted.params)
        assert result.report.flops_after == pytest.approx(predicted.flops)
    else:
        assert result.report.params_after > predicted.params


def test_weight_gates_fold_and_dead_heads_and_units_go():
    model = build("lm_untied", granularity="weight")
    rng = np.random.default_rng(5)
    for name, gate in model.gates.items():
        values = rng.uniform(0.5, 1.5, gate.shape) * (rng.random(gate.shape) >= 0.3)
        if name == "blocks.1.attn.o":  # zero the o rows of query head 0 (columns d * 6 + 0)
            values = values.reshape(4, 6, -1)
            values[:, 0] = 0.0
            values = values.reshape(gate.shape)
        if name == "blocks.0.ffn.down":
            values[:5] = 0.0
        gate.value[...] = jnp.asarray(values, jnp.float32)
    result = slim_model(model)
    assert_same_logits(model, result.model)
    widths = result.model.block_widths()
    assert widths["ffn_hidden"][0] == 19
    assert widths["heads"][1] == 6  # head 0's group keeps 2 others: the head is a filler
    assert result.report.params_after == declared_entries(result.model)


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


def test_slim_transformer_saves_and_loads(tmp_path):
    model = build("lm_tied")
    set_gates(model, "everything", np.random.default_rng(11))
    result = slim_model(model)
    spec = ModelSpec("lm_tiny", 256, LM_SHAPE["input_shape"], "unit")
    save_slim(tmp_path / "slim", spec, result)
    loaded = load_slim(tmp_path / "slim")
    assert loaded.block_widths() == result.model.block_widths()
    x = inputs(model)
    np.testing.assert_array_equal(np.asarray(logits(loaded, x)),
                                  np.asarray(logits(result.model, x)))


def test_a_slim_config_without_architecture_is_refused_with_what_to_do(tmp_path):
    """A slim directory of a model that is now slimmed from its trace (its config holds a plan
    and no architecture) is no transformer's: load_slim says to slim the run again."""
    model = build("lm_tied")
    result = slim_model(model)
    directory = tmp_path / "slim"
    save_slim(directory, ModelSpec("lm_tiny", 256, LM_SHAPE["input_shape"], "unit"), result)
    config = json.loads((directory / SLIM_CONFIG_FILE).read_text())
    assert config["architecture"]["depth"] == result.architecture["depth"] == DEPTH
    del config["architecture"]
    (directory / SLIM_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="holds no architecture.+slim the run again"):
        load_slim(directory)


def test_slim_model_points_a_traced_model_to_its_trace():
    model = build_zoo_model("mlp", rngs=nnx.Rngs(params=0), gate_factory=scale_gates)
    with pytest.raises(ConfigError, match=r"a TracedModel is slimmed from its trace: "
                       r"sparsejax\.slim\.traced\.slim_traced_model\(model, images\)"):
        slim_model(model)


def test_the_input_model_is_unchanged():
    model = build("lm_untied")
    set_gates(model, "everything", np.random.default_rng(2))
    x = inputs(model)
    before = np.asarray(logits(model, x))
    slim_model(model)
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
    loaded = load_slim(run / "slim")
    assert isinstance(loaded, DecoderLM) and not loaded.gates
    x = jax.random.randint(jax.random.key(0), (2, 128), 0, 256)
    expected = np.asarray(logits(gated, x))
    np.testing.assert_allclose(np.asarray(logits(loaded, x)), expected,
                               atol=1e-5 * np.abs(expected).max())
