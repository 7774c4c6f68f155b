"""Parameters and optimizer state sharded over the mesh's ``fsdp`` axis, on 8 forced CPU devices,
each case in a fresh process, against the replicated run (``fsdp`` = 1)."""

import json
import shutil

import numpy as np
import pytest

from tests.train.test_multidevice import run_script

SGD = {"optimizer": "momentum", "learning_rate": 0.05}
# Sharding changes only the order of floating-point reductions (a gradient is reduce-scattered
# instead of all-reduced, a layer's matmul may be split differently), so losses agree to a few
# float32 ulps per step; 2e-5 relative is the bound the data-parallel test uses for 8 devices vs 1.
RTOL = 2e-5


def layout(result, shape):
    [leaf] = [leaf for leaf in result["params"] if leaf["shape"] == shape]
    return leaf


def bytes_per_device(result):
    return sum(leaf["bytes_per_device"] for key in ("params", "opt_state") for leaf in result[key])


def test_fsdp_steps_match_the_replicated_run_and_shard_the_large_leaves():
    sharded = run_script("steps", "dense", 6, "shared", json.dumps({**SGD, "fsdp": 4}), devices=8)
    replicated = run_script("steps", "dense", 6, "shared", json.dumps(SGD), devices=8)
    np.testing.assert_allclose(sharded["losses"], replicated["losses"], rtol=RTOL)
    assert sharded["losses"][-1] < sharded["losses"][0]
    # the 784x300 kernel is split 4 ways along its longest axis; each split is held by the 2
    # devices of its column of the (2, 4) mesh
    big = layout(sharded, [784, 300])
    assert big["shard_shapes"] == [[196, 300]] and big["devices"] == 8
    assert layout(sharded, [300, 100])["shard_shapes"] == [[75, 100]]
    # small leaves (the 100x10 kernel, biases) stay whole
    assert layout(sharded, [100, 10])["shard_shapes"] == [[100, 10]]
    assert layout(sharded, [300])["shard_shapes"] == [[300]]
    assert sharded["replicas"] == 2 and sharded["identical"]
    assert replicated["replicas"] == 8 and replicated["identical"]
    assert layout(replicated, [784, 300])["shard_shapes"] == [[784, 300]]
    # the momentum buffer is sharded like its parameter
    assert [[196, 300]] in [leaf["shard_shapes"] for leaf in sharded["opt_state"]]
    assert bytes_per_device(sharded) < 0.3 * bytes_per_device(replicated)


def test_fsdp_with_adam_and_gates_matches_the_replicated_run():
    sharded = run_script("steps", "l0_hc", 4, "shared", json.dumps({"fsdp": 8}), devices=8)
    replicated = run_script("steps", "l0_hc", 4, "shared", "{}", devices=8)
    np.testing.assert_allclose(sharded["losses"], replicated["losses"], rtol=RTOL)
    assert layout(sharded, [784, 300])["shard_shapes"] == [[98, 300]]


def train_losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def saved_specs(workdir, step):
    """The mesh shapes and partition specs Orbax recorded for the leaves of a saved state."""
    path = workdir / "checkpoints" / str(step) / "state" / "_sharding"
    saved = json.loads(path.read_text()).values()
    leaves = [json.loads(s) if isinstance(s, str) else s for s in saved]
    return {tuple(s["shape"]) for s in leaves}, [s["partition_spec"] for s in leaves]


def test_a_run_saved_with_fsdp_4_resumes_with_fsdp_2_and_replicated(tmp_path):
    first = run_script("run", tmp_path / "two", 1, json.dumps({"fsdp": 4}), devices=8)
    assert first["fsdp"] == 4
    meshes, specs = saved_specs(tmp_path / "two", 8)
    assert meshes == {(2, 4)} and ["fsdp"] in specs  # saved sharded: the 784x300 kernel by rows
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    on_two = run_script("run", tmp_path / "two", 2, json.dumps({"fsdp": 2}), devices=8)
    on_one = run_script("run", tmp_path / "one", 2, "{}", devices=8)
    reference = run_script("run", tmp_path / "ref", 2, json.dumps({"fsdp": 4}), devices=8)
    assert on_two["epochs"] == on_one["epochs"] == 2 and on_two["fsdp"] == 2
    assert saved_specs(tmp_path / "two", 16)[0] == {(4, 2)}
    expected = train_losses(tmp_path / "ref")
    assert sorted(expected) == [4, 8, 12, 16]
    for resumed in ("two", "one"):
        losses = train_losses(tmp_path / resumed)
        assert sorted(losses) == sorted(expected)
        np.testing.assert_allclose(
            [losses[s] for s in sorted(losses)], [expected[s] for s in sorted(expected)], rtol=1e-4
        )
    for result in (on_two, on_one):
        assert result["expected_l0"] == pytest.approx(reference["expected_l0"], rel=1e-5)
        assert result["test_error"] == pytest.approx(reference["test_error"], abs=1.0)


@pytest.mark.parametrize("fsdp", [3, 0])
def test_fsdp_must_divide_the_device_count(tmp_path, fsdp):
    result = run_script(
        "run", tmp_path / "bad", 1, json.dumps({"fsdp": fsdp}), devices=8, check=False
    )
    assert result.returncode != 0
    assert f"fsdp={fsdp} does not divide the 8 devices" in result.stderr
    assert "[1, 2, 4, 8]" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_a_gated_run_with_a_sharded_average_matches_the_replicated_run(tmp_path):
    # l0_hc with Adam and a parameter average (sharded like the parameters under fsdp); the
    # evaluated (averaged) network and its expected L0 must agree as well as the losses.
    options = {"method": "l0_hc", "ema_decay": 0.9}
    sharded = run_script("run", tmp_path / "s", 1, json.dumps({**options, "fsdp": 8}), devices=8)
    replicated = run_script("run", tmp_path / "r", 1, json.dumps(options), devices=8)
    assert sharded["fsdp"] == 8 and sharded["evaluated_parameters"] == "ema"
    expected = train_losses(tmp_path / "r")
    losses = train_losses(tmp_path / "s")
    assert sorted(losses) == sorted(expected) == [4, 8]
    np.testing.assert_allclose([losses[4], losses[8]], [expected[4], expected[8]], rtol=1e-4)
    assert sharded["expected_l0"] == pytest.approx(replicated["expected_l0"], rel=1e-5)
    assert sharded["test_error"] == pytest.approx(replicated["test_error"], abs=1.0)
