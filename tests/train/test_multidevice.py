"""Data parallelism on 8 forced CPU devices, each case in a fresh process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("engine_script.py")


def run_script(*args, devices=1, check=True):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                     f"--xla_force_host_platform_device_count={devices}",
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
        line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT "):])
    return result


def test_eight_devices_match_one_device_and_keep_replicas_identical():
    # Momentum SGD, whose update is linear in the gradient: Adam's first updates are close to
    # lr * sign(g), so a gradient element near zero whose sign depends on the order of the
    # all-reduce moves by a whole step and the losses part by ~1e-4 after a few steps.
    sgd = json.dumps({"optimizer": "momentum", "learning_rate": 0.05})
    eight = run_script("steps", "dense", 6, "shared", sgd, devices=8)
    one = run_script("steps", "dense", 6, "shared", sgd, devices=1)
    assert eight["devices"] == 8 and eight["replicas"] == 8 and eight["identical"]
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)


@pytest.mark.parametrize("method,noise", [("l0_hc", "shared"), ("l0_arm", "per_example")])
def test_gated_methods_keep_replicas_identical_on_eight_devices(method, noise):
    result = run_script("steps", method, 4, noise, devices=8)
    assert result["replicas"] == 8 and result["identical"]
    assert all(np.isfinite(result["losses"]))


def test_batch_size_must_split_over_the_devices(tmp_path):
    result = run_script("run", tmp_path, 1, json.dumps({"batch_size": 60}), devices=8, check=False)
    assert result.returncode != 0
    assert "batch_size=60 is not divisible by the 8 devices" in result.stderr


def test_a_run_saved_on_eight_devices_resumes_on_one(tmp_path):
    first = run_script("run", tmp_path / "moved", 1, "{}", devices=8)
    assert first["num_devices"] == 8
    resumed = run_script("run", tmp_path / "moved", 2, "{}", devices=1)
    assert resumed["num_devices"] == 1 and resumed["epochs"] == 2
    steps = sorted(int(p.name) for p in (tmp_path / "moved" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [8, 16]
    reference = run_script("run", tmp_path / "one", 2, "{}", devices=1)
    assert resumed["expected_l0"] == pytest.approx(reference["expected_l0"], rel=1e-4)
    assert abs(resumed["test_error"] - reference["test_error"]) <= 2.0


@pytest.mark.parametrize("fsdp", [1, 2])
def test_blocks_of_steps_on_eight_devices_equal_single_steps(tmp_path, fsdp):
    results = {
        count: run_script(
            "run", tmp_path / str(count), 1,
            json.dumps({"method": "l0_arm", "fsdp": fsdp, "steps_per_dispatch": count}),
            devices=8,
        )
        for count in (1, 4)
    }
    assert results[4]["devices"] == 8
    for key in ("test_error", "expected_l0", "active_units"):
        assert results[4][key] == results[1][key], key
