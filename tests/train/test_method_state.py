"""Every method's state travels in the train state: it round-trips through a checkpoint, and a
run preempted mid-epoch resumes to exactly the uninterrupted result."""

import numpy as np
import pytest

from sparsejax.methods import METHODS
from sparsejax.train import Preempted, train_and_evaluate
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.metrics import read_metrics
from tests.methods.test_greg import latest_checkpoint, leaves
from tests.train.test_loop import comparable, config_for

SCHEDULES = {
    "greg1": {"pretrain_epochs": 1, "greg_interval": 1, "greg_delta": 0.5,
              "greg_stabilise_steps": 2, "fine_tune_epochs": 1, "epochs": None},
    "greg2": {"pretrain_epochs": 1, "greg_interval": 1, "greg_delta_pick": 0.2,
              "greg_ceiling_pick": 0.3, "greg_delta": 0.5, "greg_stabilise_steps": 2,
              "fine_tune_epochs": 1, "epochs": None},
    "stochastic": {"final_sparsity": 0.5, "prune_end_epoch": 1.5},
    "gmp": {"final_sparsity": 0.5, "prune_every": 2, "prune_end_epoch": 1.5},
    "dep_l0": {"fine_tune_epochs": 1},
}
"""Settings under which each method's state changes within the short run."""


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_state_round_trips_and_a_preempted_run_resumes_exactly(tmp_path, method, monkeypatch):
    config = config_for(method=method, **{"epochs": 3, **SCHEDULES.get(method, {})})
    whole = train_and_evaluate(config, tmp_path / "whole")
    with monkeypatch.context() as patch:  # stop inside the second epoch
        patch.setattr(Checkpointer, "reached_preemption", lambda self, step: step == 11)
        with pytest.raises(Preempted):
            train_and_evaluate(config, tmp_path / "split")
    saved = leaves(latest_checkpoint(tmp_path / "split")["method_state"])
    assert all(np.all(np.isfinite(v)) for v in saved.values() if v.dtype.kind == "f")
    resumed = train_and_evaluate(config, tmp_path / "split")
    assert_resumed_like_whole(tmp_path, whole, resumed)
    states = [leaves(latest_checkpoint(tmp_path / d)) for d in ("whole", "split")]
    if method in ("greg1", "greg2", "stochastic", "gmp"):
        assert any(path.startswith("/method_state") for path in states[0]), method


def assert_resumed_like_whole(tmp_path, whole, resumed):
    """The run in ``tmp_path / "split"``, stopped and resumed, ended like the one in
    ``tmp_path / "whole"``: its evaluations, summary (timings aside) and newest checkpoint."""
    evaluations = [  # the training records of the resumed run are chunked from the resume
        comparable([r for r in read_metrics(tmp_path / d) if "eval/err" in r])
        for d in ("split", "whole")
    ]
    assert evaluations[0] == evaluations[1]
    for key, value in whole.items():
        if "seconds" not in key and key != "examples_per_second":
            assert resumed[key] == value, key
    states = [leaves(latest_checkpoint(tmp_path / d)) for d in ("whole", "split")]
    assert states[0].keys() == states[1].keys()
    for path, value in states[0].items():
        np.testing.assert_array_equal(value, states[1][path], err_msg=path)
