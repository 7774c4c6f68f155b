"""Temporal averaging (``config.ema_decay``): the bias-corrected average of the parameters is
what a run evaluates, reports and slims; training runs on the raw parameters."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparsejax.slim.runs import restore_run
from sparsejax.train import Preempted, train_and_evaluate
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.config import resolve_config
from sparsejax.train.loop import evaluate, set_up
from sparsejax.train.metrics import read_metrics
from sparsejax.train.sharding import local_copy
from sparsejax.train.state import evaluated_params, split_model
from sparsejax.train.step import make_eval_step
from tests.train.test_loop import comparable, config_for


def hand_average(history, decay):
    """ema_t = decay ema_{t-1} + (1 - decay) theta_t from ema_0 = 0, over ema_t / (1 - decay^t),
    in float64."""
    ema = jax.tree.map(lambda p: np.zeros(p.shape), history[0])
    for params in history:
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * np.float64(p), ema, params)
    return jax.tree.map(lambda e: np.float32(e / (1 - decay ** len(history))), ema)


def assert_trees_close(actual, expected):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7),
                 actual, expected)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A two-epoch L0-HC MLP run at its default, averaging with decay 0.999."""
    workdir = tmp_path_factory.mktemp("ema_run")
    return workdir, train_and_evaluate(config_for(), workdir)


@pytest.mark.parametrize(
    "method,model,expected",
    [("l0_hc", "mlp", 0.999), ("l0_hc", "lenet5", 0.0), ("l0_arm", "mlp", 0.0),
     ("gmp", "mlp", 0.0)],
)
def test_the_default_decay_is_the_references(method, model, expected):
    assert resolve_config(config_for(method=method, model=model))[1].ema_decay == expected
    chosen = config_for(method=method, model=model, ema_decay=0.5)
    assert resolve_config(chosen)[1].ema_decay == 0.5


def test_evaluation_uses_the_bias_corrected_average_of_the_updated_parameters():
    setup = set_up(config_for())
    decay = setup.config.ema_decay
    assert decay == 0.999
    state, history = setup.initial_state, []
    for images, labels in setup.inputs.train_batches(0, 5):
        state, _ = setup.train_step(0)(state, images, labels)
        history.append(jax.device_get(local_copy(state.params)))  # the step donates its input
    expected = hand_average(history, decay)
    assert_trees_close(evaluated_params(local_copy(state), decay), expected)

    averaged = evaluate(make_eval_step(setup.graphdef, decay), state, setup.inputs)
    by_hand = evaluate(
        make_eval_step(setup.graphdef), state.replace(params=expected), setup.inputs
    )
    raw = evaluate(make_eval_step(setup.graphdef), state, setup.inputs)
    assert averaged["err"] == by_hand["err"]
    assert averaged["loss"] == pytest.approx(by_hand["loss"], rel=1e-5)
    assert averaged["loss"] != pytest.approx(raw["loss"], rel=1e-5)


def test_without_averaging_nothing_is_stored_and_training_is_the_same(tmp_path, ema_run):
    workdir, averaged = ema_run
    summary = train_and_evaluate(config_for(ema_decay=0.0), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["ema_decay"] == 0.0
    assert (summary["evaluated_parameters"], summary["ema_decay"]) == ("raw", 0.0)
    assert (averaged["evaluated_parameters"], averaged["ema_decay"]) == ("ema", 0.999)
    saved = ocp.PyTreeCheckpointer().restore(tmp_path / "checkpoints" / "16" / "state")
    assert not jax.tree.leaves(saved.get("ema_params", {}))

    def train_records(run):
        return comparable(r for r in read_metrics(run) if "train/loss" in r)

    # the average never feeds back (XLA fuses the step with the average differently: ulps)
    for without, with_average in zip(train_records(tmp_path), train_records(workdir), strict=True):
        assert without == pytest.approx(with_average, rel=1e-6)
    evals = [r["eval/err"] for r in read_metrics(tmp_path) if "eval/err" in r]
    assert evals[-1] == summary["test_error"]
    setup = set_up(config_for(ema_decay=0.0))
    restored, _ = Checkpointer(tmp_path).restore(setup.initial_state)
    raw = evaluate(make_eval_step(setup.graphdef), restored, setup.inputs)
    assert raw["err"] == summary["test_error"]


def test_a_preempted_averaging_run_resumes_exactly(tmp_path, monkeypatch, ema_run):
    workdir, whole = ema_run
    assert json.loads((workdir / "config.json").read_text())["ema_decay"] == 0.999
    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "reached_preemption", lambda self, step: step == 5)
        with pytest.raises(Preempted, match="stopped at step 5"):
            train_and_evaluate(config_for(), tmp_path)
    resumed = train_and_evaluate(config_for(), tmp_path)
    for key in ("test_error", "best_test_error", "expected_l0", "params", "active_units"):
        assert resumed[key] == whole[key], key
    def evals(run):
        return comparable(r for r in read_metrics(run) if "eval/err" in r)

    assert evals(tmp_path) == evals(workdir)
    ema = [
        ocp.PyTreeCheckpointer().restore(run / "checkpoints" / "16" / "state")["ema_params"]
        for run in (tmp_path, workdir)
    ]
    jax.tree.map(np.testing.assert_array_equal, *ema)


def test_slimming_restores_the_averaged_network(ema_run):
    workdir, _ = ema_run
    model, _, step = restore_run(workdir)
    saved = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    correction = 1 - 0.999**step
    restored = split_model(model)[1]
    for part in ("net", "gates"):  # both trees flatten in sorted key order
        expected = [e / correction for e in jax.tree.leaves(saved["ema_params"][part])]
        assert_trees_close(jax.tree.leaves(restored[part].to_pure_dict()), expected)
    raw_kernel = saved["params"]["net"]["net"]["fc1"]["kernel"]["value"]
    assert not np.allclose(np.asarray(restored["net"]["net"]["fc1"]["kernel"][...]), raw_kernel)
