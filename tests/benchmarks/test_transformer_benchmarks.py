import numpy as np
import pytest

from benchmarks import common
from benchmarks.common import input_spec, interleaved_medians, make_steps, parse_method
from benchmarks.transformer_runs import heads_per_block, live_heads, run_config


def test_a_method_spec_names_the_fields_it_overrides():
    assert parse_method("dense") == ("dense", {})
    assert parse_method("l0_hc@target_flops=0.5@target_lr=2") == (
        "l0_hc", {"target_flops": 0.5, "target_lr": 2.0}
    )


def test_runs_are_timed_in_turn_and_their_medians_divided(monkeypatch):
    calls = []
    # perf_counter at the start and end of each call: a takes 2, 6, 4; b takes 1, 1, 7
    clock = iter([0, 2, 2, 3, 3, 9, 9, 10, 10, 14, 14, 21])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    runs = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    medians = interleaved_medians(runs, repeats=3, divisor=2)
    assert calls == ["a", "b"] * 3
    assert medians == {"a": 2.0, "b": 0.5}


def test_text_batches_are_byte_sequences():
    spec = input_spec("python_docs")
    assert spec.image_shape == (128,) and spec.num_classes == 256
    assert input_spec("fashion_mnist").image_shape == (28, 28, 1)


def test_a_budgeted_lm_step_runs():
    run = make_steps("l0_hc", "lm_tiny", 2, 1, "python_docs", {"target_params": 0.5})
    run()


def test_kept_heads_are_zero_where_the_attention_or_every_group_is_closed():
    slots = {
        "hidden": 128,
        "blocks.0.heads": 3, "blocks.0.kv_groups": 2, "blocks.0.attn": 1,
        "blocks.1.heads": 4, "blocks.1.kv_groups": 2, "blocks.1.attn": 0,
        "blocks.2.heads": 2, "blocks.2.kv_groups": 0, "blocks.2.attn": 1,
        "blocks.10.heads": 1, "blocks.10.kv_groups": 1, "blocks.10.attn": 1,
    }
    summary = {"gate_slots": list(slots), "active_units": list(slots.values())}
    assert heads_per_block(summary) == [3, 0, 0, 1]


@pytest.mark.parametrize("model, field", [("vit_tiny", "target_flops"),
                                          ("lm_tiny", "target_params")])
def test_gated_runs_train_to_the_budget_and_dense_runs_have_none(model, field):
    gated = run_config("l0_arm", model, 2, 0.4)
    assert gated[field] == 0.4 and gated.epochs == 2 and gated.model == model
    assert field not in run_config("dense", model, 2, 0.4)


def test_a_head_is_live_when_its_gate_its_group_and_the_attention_are_open():
    # H = 4 heads in G = 2 groups: head h is in group h % 2
    gates = {
        "blocks.0.heads": np.array([1.0, 0.5, 0.0, 1.0]),
        "blocks.0.kv_groups": np.array([0.3, 0.0]),
        "blocks.0.attn": np.array([1.0]),
        "blocks.1.heads": np.array([1.0, 1.0, 1.0, 1.0]),
        "blocks.1.kv_groups": np.array([1.0, 1.0]),
        "blocks.1.attn": np.array([0.0]),
        "blocks.2.heads": np.array([0.0, 1.0, 0.0, 0.2]),
        "blocks.2.kv_groups": np.array([1.0, 1.0]),
        "blocks.2.attn": np.array([0.9]),
    }
    assert live_heads(gates, 3) == [1, 0, 2]
