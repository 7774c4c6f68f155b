import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs.mnist import get_config
from sparsejax.train import train_and_evaluate
from sparsejax.train.replay import replay
from sparsejax.train.state import split_model


def tiny_config(**overrides):
    config = get_config()
    config.update(
        dataset="synthetic", model="mlp", method="l0_hc", epochs=2, batch_size=64, num_train=512,
        num_test=128, eval_batch_size=128, log_every=4, keep_checkpoints=2,
    )
    config.update(overrides)
    return config


def saved_kernels(workdir, step):
    state = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    network = state["params"]["net"]["net"]
    return {name: network[name]["kernel"]["value"] for name in ("fc1", "fc2", "fc3")}


def assert_kernels_are(snapshot, saved):
    replayed = split_model(snapshot.model)[1]["net"]["net"]
    for name, kernel in saved.items():
        np.testing.assert_array_equal(replayed[name]["kernel"][...], kernel)


def test_replayed_states_are_the_runs_states(tmp_path):
    config = tiny_config()
    summary = train_and_evaluate(config, tmp_path)  # stochastic gates; checkpoints 8 and 16
    first, middle, last = replay(config, tmp_path, [16, 5, 8])  # from the initial state
    assert [first.step, middle.step, last.step] == [5, 8, 16]
    _, from_checkpoint = replay(config, tmp_path, [12, 16])  # from the checkpoint of step 8
    assert last.err == from_checkpoint.err == summary["test_error"]
    assert_kernels_are(middle, saved_kernels(tmp_path, 8))
    for snapshot in (last, from_checkpoint):
        assert_kernels_are(snapshot, saved_kernels(tmp_path, 16))
    with pytest.raises(ValueError, match="must lie in"):
        replay(config, tmp_path, [17])


def test_replay_never_starts_from_a_checkpoint_that_fails_verification(tmp_path, capsys):
    config = tiny_config()
    train_and_evaluate(config, tmp_path)
    kernels = saved_kernels(tmp_path, 16)
    (tmp_path / "checkpoints" / "16" / "state" / "_METADATA").write_text("{}")
    (snapshot,) = replay(config, tmp_path, [16])  # from the checkpoint of step 8
    assert_kernels_are(snapshot, kernels)
    assert "checkpoint 16 failed verification" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "16").is_dir()  # a reader moves nothing
