import math

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.data.sources import open_source
from sparsejax.errors import ConfigError
from sparsejax.methods import RunInfo, create_method
from sparsejax.methods.greg import (
    GReg1,
    GReg2,
    greg_progress,
    kept_channels,
)
from sparsejax.methods.greg.accounting import greg_pruned_count
from sparsejax.methods.greg.report import traced_pruned_size
from sparsejax.methods.greg.rules import layer_ratios, traced_slot_ratios
from sparsejax.methods.greg.schedule import (
    FINETUNE,
    NOT_YET,
    REGULARISE,
    STABILISE,
    LayerState,
    Schedule,
    longest_regularisation,
    prune,
    regularise,
    smallest,
)
from sparsejax.models.base import GateSlot
from sparsejax.models.cifar_resnet import CifarResNet
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure.blocks import traced_layer_stages
from sparsejax.structure.traced_model import build_zoo_model, gate_zoo_network
from sparsejax.train import Preempted, train_and_evaluate
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.config import resolve_config
from sparsejax.train.loop import build
from sparsejax.train.metrics import read_metrics
from sparsejax.train.pretrained import load_network_weights
from sparsejax.train.state import merge_model, split_model

SCHEDULE = {
    "interval": 3, "delta": 1e-4, "ceiling": 1.0, "ratio_limit": 1000.0, "stabilise_steps": 5,
    "delta_pick": 1e-5, "ceiling_pick": 1e-2, "delta_recover": -1e-4, "ratio_test": True,
}


def fresh_layer(shape):
    return LayerState(
        penalty=jnp.zeros(shape), selected=jnp.zeros(shape, bool), mask=jnp.ones(shape),
        ratio=jnp.array(-1.0), finished=jnp.array(False), picked=jnp.array(False),
    )


def run_iterations(schedule, scores, counts, iterations):
    """``iterations`` regularisation iterations t = 0, 1, ... on fixed scores, jitted once."""

    @jax.jit
    def run(layers):
        def body(t, carry):
            layers, phase, start = carry
            return tuple(regularise(layers, scores, counts, t, phase, start, schedule))

        return jax.lax.fori_loop(
            0, iterations, body, (layers, jnp.int32(REGULARISE), jnp.int32(-1))
        )

    return run([fresh_layer(s.shape) for s in scores])


SCORES = [jnp.array([0.5, 0.1, 0.9, 0.2, 0.7, 0.3]), jnp.array([2.0, 1.0, 3.0, 4.0])]
COUNTS = [3, 1]  # ratio 0.5 of 6 filters, 0.25 of 4


def test_greg1_penalty_after_k_updates_is_k_delta_on_the_pruned_set_only():
    schedule = Schedule(variant=1, **SCHEDULE)
    updates = 7
    layers, phase, _ = run_iterations(schedule, SCORES, COUNTS, (updates - 1) * 3 + 1)
    expected = np.float32(0)
    for _ in range(updates):
        expected = np.float32(expected + np.float32(schedule.delta))
    pruned = [np.array([0, 1, 0, 1, 0, 1], bool), np.array([0, 1, 0, 0], bool)]
    for layer, chosen in zip(layers, pruned):
        np.testing.assert_array_equal(np.asarray(layer.selected), chosen)
        np.testing.assert_array_equal(np.asarray(layer.penalty), np.where(chosen, expected, 0.0))
    assert int(phase) == REGULARISE
    assert np.isclose(expected, updates * schedule.delta)


def test_greg1_magnitude_ratio_is_an_ema_and_ends_every_layer_when_all_pass():
    schedule = Schedule(variant=1, **{**SCHEDULE, "interval": 1, "ratio_limit": 2.0})
    layers, phase, start = run_iterations(schedule, SCORES, COUNTS, 1)
    first = (0.7 / 0.2, 3.0 / 1.0)  # mean kept / mean pruned score
    np.testing.assert_allclose([float(l.ratio) for l in layers], first, rtol=1e-6)
    assert all(bool(l.finished) for l in layers)
    assert (int(phase), int(start)) == (STABILISE, 0)

    strict = Schedule(variant=1, **{**SCHEDULE, "interval": 1, "ratio_limit": 3.2})
    layers, phase, _ = run_iterations(strict, SCORES, COUNTS, 2)
    assert not any(bool(l.finished) for l in layers)  # 3.5 passes, 3.0 fails: global test
    np.testing.assert_allclose([float(l.ratio) for l in layers], first, rtol=1e-6)
    assert int(phase) == REGULARISE

    open_ended = Schedule(variant=1, **{**SCHEDULE, "interval": 1, "ratio_limit": 1000.0})
    layers = [fresh_layer(s.shape) for s in SCORES]
    layers, phase, start = regularise(
        layers, SCORES, COUNTS, 0, jnp.int32(REGULARISE), jnp.int32(-1), open_ended
    )
    moved = [SCORES[0].at[2].set(1.9), SCORES[1]]  # layer 0's kept mean: 0.7 -> 3.1 / 3
    layers, _, _ = regularise(layers, moved, COUNTS, 1, phase, start, open_ended)
    ema = (0.9 * first[0] + 0.1 * (3.1 / 3) / 0.2, first[1])
    np.testing.assert_allclose([float(l.ratio) for l in layers], ema, rtol=1e-6)


def test_greg1_ceiling_is_strict_and_starts_stabilisation_at_that_iteration():
    schedule = Schedule(variant=1, **{**SCHEDULE, "interval": 2, "delta": 0.25, "ratio_test": False})
    layers, phase, start = run_iterations(schedule, SCORES, COUNTS, 7)  # updates at 0, 2, 4, 6
    assert int(phase) == REGULARISE  # max lambda 1.0 is not > 1.0
    layers, phase, start = run_iterations(schedule, SCORES, COUNTS, 9)
    assert (int(phase), int(start)) == (STABILISE, 8)
    assert float(jnp.max(layers[0].penalty)) == 1.25


def greg2_pick_update(schedule):
    """The update at which float32 accumulation of delta_pick reaches ceiling_pick."""
    value, updates = np.float32(0), 0
    while value < np.float32(schedule.ceiling_pick):
        value, updates = np.float32(value + np.float32(schedule.delta_pick)), updates + 1
    return updates, value


def test_greg2_picks_after_ceil_tau_over_delta_updates_then_pushes():
    schedule = Schedule(variant=2, **{**SCHEDULE, "interval": 1})
    pick, picked_value = greg2_pick_update(schedule)
    ceil = math.ceil(schedule.ceiling_pick / schedule.delta_pick)
    assert pick in (ceil, ceil + 1)

    before, _, _ = run_iterations(schedule, SCORES, COUNTS, pick - 1)
    assert not any(bool(l.picked) for l in before)
    np.testing.assert_allclose(np.asarray(before[0].penalty), (pick - 1) * 1e-5, rtol=1e-4)
    assert len(set(np.asarray(before[0].penalty).tolist())) == 1  # uniform

    at, _, _ = run_iterations(schedule, SCORES, COUNTS, pick)
    assert all(bool(l.picked) for l in at)
    np.testing.assert_array_equal(np.asarray(at[0].penalty), picked_value)
    np.testing.assert_array_equal(np.asarray(at[0].selected), [0, 1, 0, 1, 0, 1])

    after, _, _ = run_iterations(schedule, SCORES, COUNTS, pick + 2)
    chosen = np.asarray(after[0].selected)
    pushed = np.float32(np.float32(picked_value + np.float32(1e-4)) + np.float32(1e-4))
    np.testing.assert_array_equal(np.asarray(after[0].penalty), np.where(chosen, pushed, -1e-4).astype(np.float32))


def test_greg2_finishes_a_layer_only_after_picking():
    schedule = Schedule(variant=2, **{**SCHEDULE, "interval": 1, "ratio_limit": 2.0})
    pick, _ = greg2_pick_update(schedule)
    layers, phase, _ = run_iterations(schedule, SCORES, COUNTS, pick - 1)
    assert not any(bool(l.finished) for l in layers)  # the ratio passes, but no pick yet
    layers, phase, start = run_iterations(schedule, SCORES, COUNTS, pick)
    assert all(bool(l.finished) for l in layers)
    assert (int(phase), int(start)) == (STABILISE, pick - 1)


def test_greg2_finishes_each_layer_on_its_own_ratio_and_freezes_it():
    schedule = Schedule(variant=2, **{**SCHEDULE, "interval": 1, "ratio_limit": 3.2})
    pick, _ = greg2_pick_update(schedule)
    at_pick, phase, _ = run_iterations(schedule, SCORES, COUNTS, pick)
    assert [bool(l.finished) for l in at_pick] == [True, False]  # ratios 3.5 and 3.0
    assert int(phase) == REGULARISE
    later, phase, _ = run_iterations(schedule, SCORES, COUNTS, pick + 3)
    assert int(phase) == REGULARISE and not bool(later[1].finished)
    np.testing.assert_array_equal(later[0].penalty, at_pick[0].penalty)  # frozen once finished
    assert float(jnp.max(later[1].penalty)) > float(jnp.max(at_pick[1].penalty))


def test_smallest_marks_exactly_count_smallest_with_ties_by_index():
    scores = jnp.array([[3.0, 1.0], [1.0, 0.5]])
    np.testing.assert_array_equal(np.asarray(smallest(scores, 2)), [[False, True], [False, True]])
    np.testing.assert_array_equal(np.asarray(smallest(scores, 3)), [[False, True], [True, True]])


# --- the method on models --------------------------------------------------------------------


def greg_config(**overrides):
    config = get_config(overrides.get("method", "greg1"))
    config.update(
        dataset="synthetic", model="mlp", batch_size=64,
        num_train=512, num_test=128, log_every=4, eval_batch_size=128,
        greg_interval=1, greg_delta=0.5, greg_stabilise_steps=3, pretrain_epochs=0, stage_pr=0.5,
        fine_tune_epochs=2,
    )
    config.update(overrides)
    return config


def prepared(config, **model_kwargs):
    method = create_method(config.method, config, RunInfo(num_train=512))
    model = build_zoo_model(config.model, rngs=nnx.Rngs(params=0),
                            use_placements=method.uses_gate_placements, **model_kwargs)
    return method, model, method.init(model)


def test_added_gradient_equals_lambda_times_w():
    method, model, state = prepared(greg_config(model="mlp"), hidden=(12, 8))
    rng = np.random.default_rng(0)
    for layer in state["layers"]:
        layer["penalty"] = jnp.asarray(rng.uniform(0, 2, layer["penalty"].shape), jnp.float32)
    state["phase"] = jnp.int32(STABILISE)  # coefficients frozen: the step does not change them
    graphdef, params, rest = split_model(model)
    images = jax.random.normal(jax.random.key(0), (16, 28, 28, 1))
    labels = jnp.arange(16) % 10

    def gradient(with_growth):
        # the growing term is off once pruned
        phase = {} if with_growth else {"phase": jnp.int32(FINETUNE)}

        def loss(p):
            merged = merge_model(graphdef, p, rest)
            step_state = method.before_update(merged, {**state, **phase}, jnp.int32(5))
            return method.objective(merged, step_state, images, labels, jax.random.key(1))[0]

        return jax.jit(jax.grad(loss))(params)["net"]["net"]

    difference = jax.tree.map(lambda a, b: a - b, gradient(True), gradient(False))
    lambdas = {"fc1": state["layers"][0]["penalty"], "fc2": state["layers"][1]["penalty"]}
    for name in ("fc1", "fc2", "fc3"):
        kernel = model.layer_module(name).kernel[...]
        expected = lambdas[name] * kernel if name in lambdas else jnp.zeros_like(kernel)
        np.testing.assert_allclose(difference[name]["kernel"][...], expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(difference[name]["bias"][...], 0.0)


def abstract_model(name):
    """The model's declarations without computing its initial weights."""
    return nnx.eval_shape(lambda: build_zoo_model(name, rngs=nnx.Rngs(params=0)))


@pytest.mark.parametrize(
    "name,shape,blocks_per_stage",
    [("resnet50", (224, 224, 3), (3, 4, 6, 3)), ("wrn28_10", (32, 32, 3), (4, 4, 4))],
)
def test_projection_shortcuts_take_their_stage_ratio_and_start_the_stages(
    name, shape, blocks_per_stage
):
    """On ResNet-50 and WRN, whose layers are named by module path (``blocks.{i - 1}.conv1``)
    and staged by their trace."""
    model = nnx.eval_shape(lambda: build_zoo_model(name, rngs=nnx.Rngs(0), input_shape=shape))
    stage_ratios = [0.1 * (index + 1) for index in range(len(blocks_per_stage))]
    weight = layer_ratios(model.layers, (0.0, *stage_ratios, 0.0),
                          traced_layer_stages(model))

    def layer(block, conv):
        return f"blocks.{block - 1}.{conv}"

    first_blocks = np.cumsum((1, *blocks_per_stage[:-1]))
    for stage, (first, count) in enumerate(zip(first_blocks, blocks_per_stage)):
        assert weight[layer(first, "shortcut")] == stage_ratios[stage]
        for block in range(first, first + count):
            assert weight[layer(block, "conv1")] == stage_ratios[stage], block
    assert len(weight) == len(model.layers) - 2  # all but the stem and fc


def test_single_branch_rules_take_a_float_layer_indices_or_one_ratio_per_layer():
    model = abstract_model("lenet5")
    assert layer_ratios(model.layers, "[1-2:0.7]") == {"conv2": 0.7, "fc1": 0.7}
    assert layer_ratios(model.layers, {0: 0.5}) == {"conv1": 0.5}
    assert list(layer_ratios(model.layers, 0.5)) == ["conv1", "conv2", "fc1", "fc2"]
    assert layer_ratios(model.layers, (0.5, 0.0, 0.25, 0.5)) == {
        "conv1": 0.5, "fc1": 0.25, "fc2": 0.5}
    with pytest.raises(ValueError, match="4 layers"):
        layer_ratios(model.layers, (0.5, 0.5))


def test_traced_slot_rules_take_one_ratio_one_per_named_slot_or_one_per_layer_index():
    slots = [GateSlot(name, name, (8,), 3, False, 0.5, (3, 3, 4, 8))
             for name in ("stem", "blocks.0.conv", "head")]
    assert traced_slot_ratios(slots, 0.5) == dict.fromkeys(["stem", "blocks.0.conv", "head"], 0.5)
    assert traced_slot_ratios(slots, "0.25") == traced_slot_ratios(slots, 0.25)
    assert traced_slot_ratios(slots, {"head": 0.5, "stem": 0.0}) == {"head": 0.5}
    assert traced_slot_ratios(slots, "blocks.0.conv:0.7, head:0.1") == {
        "blocks.0.conv": 0.7, "head": 0.1}
    with pytest.raises(ConfigError, match=r"the gate slots \['fc'\], .* stem, blocks.0.conv, head"):
        traced_slot_ratios(slots, {"fc": 0.5})
    layers = ["stem", "blocks.0.conv", "head", "fc"]
    assert traced_slot_ratios(slots, [0.5, 0, 0.25, 0], layers) == {"stem": 0.5, "head": 0.25}
    assert traced_slot_ratios(slots, "[1-2:0.7]", layers) == {"blocks.0.conv": 0.7, "head": 0.7}
    assert traced_slot_ratios(slots, {"0": 0.5}, layers) == {"stem": 0.5}
    with pytest.raises(ConfigError, match=r"layer 3 \('fc'\), whose outputs are not a prunable "
                       r"group of the traced model; the layers with one are \[0, 1, 2\]"):
        traced_slot_ratios(slots, "[2-3:0.5]", layers)
    with pytest.raises(ConfigError, match=r"3 ratios but the traced model has 4 layers"):
        traced_slot_ratios(slots, [0.5, 0.5, 0.5], layers)
    with pytest.raises(ConfigError, match="'slot:ratio' items"):
        traced_slot_ratios(slots, "head=0.5,stem:0.1")
    with pytest.raises(ValueError, match="head"):
        traced_slot_ratios(slots, {"head": 1.0})


def test_traced_mlp_report_counts_the_kept_units_on_both_sides_of_each_layer():
    method, model, state = prepared(greg_config(model="mlp"))
    hidden = [layer.group_shape[0] for layer in method.pruned_layers(model)]
    assert hidden == [300, 100]  # the pixels and the classes are never pruned
    rng = np.random.default_rng(0)
    for layer, width in zip(state["layers"], hidden):
        kept = rng.permutation(width) < width // 2
        layer["mask"] = jnp.asarray(kept, jnp.float32)
    size = method.report(model, state)
    widths = [784, *hidden, 10]
    kept_widths = [784, *(w // 2 for w in hidden), 10]

    def weights(ws):
        return sum(a * b for a, b in zip(ws, ws[1:]))

    assert size["greg/dense_weights"] == weights(widths) == 266_200
    assert size["greg/weights"] == weights(kept_widths) == 125_600
    assert size["greg/dense_flops"] == 2 * weights(widths)
    assert size["greg/flops"] == 2 * weights(kept_widths)
    assert size["greg/speedup"] == pytest.approx(266_200 / 125_600)
    assert list(size["greg/widths"].values()) == [150, 50]


def test_pruned_filters_output_exactly_zero_like_removed_channels():
    config = greg_config(model="resnet20", stage_pr=(0, 0.5, 0.5, 0.5, 0))
    method = create_method(config.method, config, RunInfo(num_train=512))
    rngs = nnx.Rngs(0)
    pruned = gate_zoo_network(
        CifarResNet(depth=8, widths=(4, 4, 4), input_shape=(8, 8, 3), rngs=rngs), "resnet20",
        rngs=rngs, use_placements=False)
    state = method.init(pruned)
    for layer, layer_state in zip(method.pruned_layers(pruned), state["layers"]):
        # prune now: S = the first half of the filters
        layer_state["selected"] = jnp.arange(layer.group_shape[0]) < layer.count
    state.update(phase=jnp.int32(STABILISE), stabilise_start=jnp.int32(0))
    step = jnp.int32(config.greg_stabilise_steps)
    state = method.after_update(pruned, state, step, jax.random.key(0))
    names = [layer.name for layer in method.pruned_layers(pruned)]
    assert greg_progress(state, names)["phase"] == "finetune"
    assert greg_progress(state, names)["prune_step"] == config.greg_stabilise_steps
    kept = method.kept_channels(pruned, state)
    assert {name: list(channels) for name, channels in kept.items()} == {
        f"blocks.{i}.conv1": [2, 3] for i in range(3)
    }
    assert kept_channels(state, names, "filter").keys() == kept.keys()
    sizes = traced_pruned_size(pruned.layers, state, names)
    assert sizes["widths"] == {f"blocks.{i}.conv1": 2 for i in range(3)}

    images = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
    nnx.jit(lambda m: m(images, train=True))(pruned)  # BatchNorm statistics of the pruned net
    evaluate = nnx.jit(lambda m: m(images, train=False))
    before = evaluate(pruned)
    slim = slim_traced_model(pruned, np.asarray(images))  # removes exactly the pruned channels
    for name in kept:
        assert slim.params[f"{name}.kernel"].shape[-1] == 2
    np.testing.assert_allclose(slim(np.asarray(images)), before, rtol=1e-5, atol=1e-5)
    for block in pruned.net.blocks:  # the weights reading a removed channel no longer matter
        block.conv2.kernel[...] = block.conv2.kernel[...].at[:, :, :2, :].set(123.0)
    np.testing.assert_array_equal(evaluate(pruned), before)


def latest_checkpoint(workdir):
    step = Checkpointer(workdir).latest_step()
    return ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def leaves(tree, prefix=""):
    """``{path: array}`` of a restored pytree of dicts and lists."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: np.asarray(tree)}
    return {k: v for key, sub in items for k, v in leaves(sub, f"{prefix}/{key}").items()}


def assert_masked_weights_are_zero(workdir, names, ratio):
    saved = latest_checkpoint(workdir)
    layers = saved["method_state"]["layers"]
    for i, name in enumerate(names):
        mask = np.asarray(layers[i]["mask"])
        kernel = np.asarray(saved["params"]["net"]["net"][name]["kernel"]["value"])
        assert np.all(kernel[mask == 0] == 0.0), name
        assert np.sum(mask == 0) == greg_pruned_count(ratio, mask.size), name


def test_unstructured_mask_holds_through_fine_tuning_and_resume(tmp_path, monkeypatch):
    config = greg_config(method="greg1", greg_granularity="weight", stage_pr=0.6)
    whole = train_and_evaluate(config, tmp_path / "whole")
    assert whole["greg/phase"] == "finetune"
    assert whole["greg/prune_step"] is not None and whole["greg/prune_step"] < 12
    assert whole["greg/sparsity"] > 50.0
    assert_masked_weights_are_zero(tmp_path / "whole", ["fc1", "fc2", "fc3"], 0.6)
    network = latest_checkpoint(tmp_path / "whole")["params"]["net"]["net"]
    kernels = [network[name]["kernel"]["value"] for name in ("fc1", "fc2", "fc3")]
    zero_percent = 100 * sum(np.sum(k == 0) for k in kernels) / sum(k.size for k in kernels)
    assert zero_percent == pytest.approx(60.0, abs=0.01)
    assert whole["greg/sparsity"] == pytest.approx(zero_percent)  # GReg's counter: every kernel
    removed = whole["greg/dense_weights"] - whole["greg/weights"]
    assert removed == sum(np.sum(k == 0) for k in kernels)
    assert whole["pruning_rate"] >= zero_percent  # the summary sees the pruned weights
    assert whole["params"] < whole["dense_params"] and whole["flops"] < whole["dense_flops"]

    with monkeypatch.context() as patch:  # stop during fine-tuning, then resume
        patch.setattr(Checkpointer, "reached_preemption", lambda self, step: step == 19)
        with pytest.raises(Preempted):
            train_and_evaluate(config, tmp_path / "split")
    assert_masked_weights_are_zero(tmp_path / "split", ["fc1", "fc2", "fc3"], 0.6)
    resumed = train_and_evaluate(config, tmp_path / "split")
    for key in ("test_error", "greg/prune_step", "greg/sparsity", "greg/max_penalty"):
        assert resumed[key] == whole[key], key
    assert_masked_weights_are_zero(tmp_path / "split", ["fc1", "fc2", "fc3"], 0.6)


def test_greg2_pipeline_with_pretraining_resumes_like_an_uninterrupted_run(tmp_path, monkeypatch):
    config = greg_config(method="greg2", pretrain_epochs=1, greg_delta_pick=0.05,
                         greg_ceiling_pick=0.1, greg_stabilise_steps=2)
    whole = train_and_evaluate(config, tmp_path / "whole")
    with monkeypatch.context() as patch:  # stop during regularisation
        patch.setattr(Checkpointer, "reached_preemption", lambda self, step: step == 10)
        with pytest.raises(Preempted):
            train_and_evaluate(config, tmp_path / "split")
    resumed = train_and_evaluate(config, tmp_path / "split")
    assert whole["greg/phase"] == "finetune"
    pretraining_steps = 8  # one epoch of 512 / 64
    assert whole["greg/regularisation_iteration"] == whole["greg/iteration"] - pretraining_steps
    config.pretrain_epochs = 0  # the same schedule, started at step 0, prunes 8 steps earlier
    unpretrained = train_and_evaluate(config, tmp_path / "unpretrained")
    assert whole["greg/prune_step"] == pretraining_steps + unpretrained["greg/prune_step"]
    for key in ("test_error", "greg/prune_step", "greg/widths", "greg/max_penalty"):
        assert resumed[key] == whole[key], key
    assert whole["greg/widths"] == {"fc1": 150, "fc2": 50}
    assert whole["active_units"] == [150, 50]  # the summary sees the removed neurons


def test_pretrained_run_provides_the_weights(tmp_path):
    dense = get_config("dense")
    dense.update(dataset="synthetic", model="mlp", epochs=1, batch_size=64,
                 num_train=256, num_test=128, eval_batch_size=128)
    train_and_evaluate(dense, tmp_path / "dense")
    saved = latest_checkpoint(tmp_path / "dense")
    config = greg_config(model="mlp", pretrained=str(tmp_path / "dense"))
    method, model, _ = build(config, open_source("synthetic", num_train=256, num_test=128))
    assert method.pretrained_run() == str(tmp_path / "dense")
    assert GReg1(greg_config(), RunInfo(10)).pretrained_run() is None
    _, unloaded, _ = prepared(config)  # the engine loads the run, not the method
    saved_fc1 = saved["params"]["net"]["net"]["fc1"]["kernel"]["value"]
    assert not np.array_equal(unloaded.net.fc1.kernel[...], saved_fc1)
    for name in ("fc1", "fc3"):
        for kind in ("kernel", "bias"):
            np.testing.assert_array_equal(
                getattr(model.layer_module(name), kind)[...],
                saved["params"]["net"]["net"][name][kind]["value"],
            )
    with pytest.raises(ValueError, match="does not fit this model"):
        load_network_weights(abstract_model("lenet5"), tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_network_weights(abstract_model("mlp"), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="set one of them"):
        GReg1(greg_config(pretrained=str(tmp_path / "dense"), pretrain_epochs=2), RunInfo(10))


def test_a_pretrained_run_whose_checkpoint_fails_verification_is_not_used(tmp_path, capsys):
    dense = get_config("dense")
    dense.update(dataset="synthetic", model="mlp", epochs=2, batch_size=64,
                 num_train=256, num_test=128, eval_batch_size=128)
    train_and_evaluate(dense, tmp_path / "dense")
    checkpoints = tmp_path / "dense" / "checkpoints"
    (checkpoints / "8" / "sparsejax_digest.json").unlink()
    assert load_network_weights(abstract_model("mlp"), tmp_path / "dense") == 4
    assert "checkpoint 8" in capsys.readouterr().err
    (checkpoints / "4" / "state" / "_METADATA").write_text("{}")
    with pytest.raises(FileNotFoundError, match="verifies"):
        load_network_weights(abstract_model("mlp"), tmp_path / "dense")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="greg_granularity"):
        GReg2(greg_config(greg_granularity="channel"), RunInfo(10))
    with pytest.raises(ValueError, match="prunes no gate slot of the model; give some of fc1"):
        prepared(greg_config(stage_pr=0.0))


def test_pretrained_run_provides_the_batchnorm_statistics(tmp_path):
    dense = get_config("dense")
    dense.update(dataset="synthetic", synthetic_like="cifar10", model="resnet20",
                 epochs=1, batch_size=16, num_train=64, num_test=16, eval_batch_size=16)
    train_and_evaluate(dense, tmp_path / "dense")
    saved = latest_checkpoint(tmp_path / "dense")["model_state"]
    model = build_zoo_model("resnet20", rngs=nnx.Rngs(params=1), input_shape=(32, 32, 3))
    load_network_weights(model, tmp_path / "dense")
    for path in ("stem_bn", "blocks.0.bn1", "blocks.8.bn2"):
        norm, stored = model.module_at(f"net.{path}"), saved["net"]
        for part in path.split("."):
            stored = stored[part]
        assert not np.allclose(stored["mean"]["value"], 0.0)  # trained statistics, not the init
        for statistic in ("mean", "var"):
            np.testing.assert_array_equal(
                getattr(norm, statistic)[...], stored[statistic]["value"]
            )


def test_greg_on_resnet50_needs_a_pretrained_network_or_explicit_pretraining():
    config = get_config("greg1")
    config.model = "resnet50"
    with pytest.raises(ConfigError, match="--config.pretrained=WORKDIR"):
        resolve_config(config)
    config.pretrain_epochs = 5
    assert resolve_config(config)[1].pretrain_epochs == 5
    config.pretrain_epochs, config.pretrained = None, "runs/resnet50_dense"
    assert resolve_config(config)[1].pretrain_epochs == 0
    resolved = resolve_config(get_config("greg1"))[1]  # LeNet-5: its own default
    assert (resolved.greg_interval, resolved.pretrain_epochs) == (1, 5)


@pytest.mark.parametrize("variant", [1, 2])
def test_the_longest_regularisation_is_the_schedule_run_without_early_finishes(variant):
    schedule = Schedule(**{**SCHEDULE, "variant": variant, "delta": 0.1, "ceiling": 0.45,
                           "delta_pick": 0.03, "ceiling_pick": 0.1, "stabilise_steps": 4})
    scores = [jnp.ones(6), jnp.ones(4)]  # equal scores: the magnitude ratio stays 1 < R
    layers, phase, start = [fresh_layer(s.shape) for s in scores], REGULARISE, NOT_YET
    t = 0
    while phase != FINETUNE:
        layers, phase, start = regularise(layers, scores, COUNTS, t, phase, start, schedule)
        layers, phase, _ = prune(layers, t, phase, start, schedule)
        t += 1
    assert longest_regularisation(schedule) == t
    # GReg-1: 5 updates (0.5 > 0.45), GReg-2: 4 uniform (0.12 >= 0.1) and 4 pushes (0.52)
    updates = 5 if variant == 1 else 8
    assert t == schedule.interval * (updates - 1) + schedule.stabilise_steps + 1


def opt_counts(opt_state):
    """The update counts kept by the optimizer's learning-rate state, per parameter group."""
    return {
        group: int(np.asarray(inner["inner_state"][-1]["count"]))
        for group, inner in opt_state["inner_states"].items()
    }


def test_each_phase_trains_at_its_own_learning_rate_from_a_fresh_optimizer(tmp_path):
    config = greg_config(pretrain_epochs=1, lr_prune=5e-4, lr_ft="0:0.01,1:0.002",
                         learning_rate=2e-3, fine_tune_epochs=2)
    summary = train_and_evaluate(config, tmp_path)
    assert summary["epochs"] == 4 and summary["greg/phase"] == "finetune"
    assert summary["phases"] == [
        {"name": "pretrain", "start_epoch": 0, "epochs": 1},
        {"name": "regularise", "start_epoch": 1, "epochs": 1},
        {"name": "fine-tune", "start_epoch": 2, "epochs": 2},
    ]
    rates = {r["step"]: r["lr/net"] for r in read_metrics(tmp_path) if "lr/net" in r}
    assert all("lr/gates" not in r for r in read_metrics(tmp_path))  # GReg has no gates
    expected = {4: 2e-3, 8: 2e-3, 12: 5e-4, 16: 5e-4, 20: 0.01, 24: 0.01, 28: 2e-3, 32: 2e-3}
    assert rates == pytest.approx(expected)
    saved = latest_checkpoint(tmp_path)
    assert opt_counts(saved["opt_state"])["net"] == 16  # started with fine-tuning, at step 16


@pytest.mark.parametrize("stop", [5, 11, 16, 19])
def test_a_run_stopped_in_any_phase_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch, stop
):
    config = greg_config(method="greg2", pretrain_epochs=1, greg_delta_pick=0.2,
                         greg_ceiling_pick=0.3, greg_stabilise_steps=2, lr_ft="0:0.01,1:0.002")
    whole = train_and_evaluate(config, tmp_path / "whole")
    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "reached_preemption", lambda self, step: step == stop)
        with pytest.raises(Preempted):
            train_and_evaluate(config, tmp_path / "split")
    resumed = train_and_evaluate(config, tmp_path / "split")
    for key, value in whole.items():
        if "seconds" not in key and key != "examples_per_second":
            assert resumed[key] == value, key
    states = [leaves(latest_checkpoint(tmp_path / d)) for d in ("whole", "split")]
    for path, value in states[0].items():
        np.testing.assert_array_equal(value, states[1][path], err_msg=path)


def test_more_fine_tuning_epochs_on_resume_train_on_to_the_longer_run(tmp_path):
    config = greg_config(fine_tune_epochs=2)
    longer = train_and_evaluate(config, tmp_path / "longer")
    config.fine_tune_epochs = 1
    shorter = train_and_evaluate(config, tmp_path / "trained_on")
    assert shorter["epochs"] == longer["epochs"] - 1
    config.fine_tune_epochs = 2
    trained_on = train_and_evaluate(config, tmp_path / "trained_on")
    for key in ("test_error", "epochs", "phases", "greg/prune_step", "params"):
        assert trained_on[key] == longer[key], key
