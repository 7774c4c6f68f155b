"""Stopping on SIGTERM and resuming; two processes joined by jax.distributed on localhost."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXIT_PREEMPTED = 75
COMMON = [
    "--model=lenet5", "--method=l0_hc", "--dataset=synthetic", "--batch_size=32", "--epochs=2",
    "--config.log_every=2",
]


def env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **extra}


def cli(workdir, *extra, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.mnist", *COMMON, f"--workdir={workdir}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, **kwargs,
    )


def summary(workdir):
    return json.loads((Path(workdir) / "summary.json").read_text())


def test_sigterm_saves_and_the_rerun_ends_like_an_uninterrupted_run(tmp_path):
    process = cli(tmp_path / "stopped", env=env())
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert "Rerun the same command to resume" in stderr
    saved = [int(p.name) for p in (tmp_path / "stopped" / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and 0 < max(saved) < 128

    rerun = cli(tmp_path / "stopped", env=env())
    whole = cli(tmp_path / "whole", env=env())
    for p in (rerun, whole):
        assert p.wait(timeout=600) == 0, p.communicate()[1][-2000:]
    resumed, reference = summary(tmp_path / "stopped"), summary(tmp_path / "whole")
    for key in ("test_error", "best_test_error", "expected_l0", "params", "active_units"):
        assert resumed[key] == reference[key], key


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pod(workdir, *extra) -> list[str]:
    """Two processes of 2 CPU devices each, joined on localhost, train ``workdir``; their
    stderr."""
    address = f"127.0.0.1:{free_port()}"
    host_env = env(JAX_NUM_CPU_DEVICES="2", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    processes = [
        cli(workdir, "--distributed", f"--coordinator_address={address}",
            "--num_processes=2", f"--process_id={i}", "--steps_per_epoch=6", *extra,
            env=host_env)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, stderr) in zip(processes, outputs):
        assert p.returncode == 0, stderr[-3000:]
    return [stderr for _, stderr in outputs]


def test_two_processes_train_one_data_parallel_run(tmp_path):
    run_pod(tmp_path / "pod")
    pod = summary(tmp_path / "pod")
    assert pod["num_processes"] == 2 and pod["num_devices"] == 4
    single = cli(tmp_path / "single", "--steps_per_epoch=6", env=env(JAX_NUM_CPU_DEVICES="4"))
    assert single.wait(timeout=600) == 0, single.communicate()[1][-2000:]
    reference = summary(tmp_path / "single")
    assert reference["num_processes"] == 1 and reference["num_devices"] == 4
    assert pod["expected_l0"] == pytest.approx(reference["expected_l0"], rel=1e-4)
    assert pod["test_error"] == pytest.approx(reference["test_error"], abs=1.0)

    # Both processes verify the newest checkpoint, agree that it is damaged and resume the pod
    # from the one before, ending where the first pod run ended.
    (tmp_path / "pod" / "checkpoints" / "12" / "state" / "_METADATA").write_text("{}")
    for stderr in run_pod(tmp_path / "pod"):
        assert "checkpoint 12 failed verification" in stderr
    resumed = summary(tmp_path / "pod")
    for key in ("test_error", "expected_l0", "params", "active_units"):
        assert resumed[key] == pod[key], key
    assert (tmp_path / "pod" / "checkpoints" / "corrupt-12").is_dir()


def test_two_processes_train_with_parameters_sharded_across_them(tmp_path):
    # fsdp=4 over the 4 devices of 2 processes: every large parameter is split across both
    # processes, so placing the state, reading it on the host and checkpointing are collective.
    # Two steps per dispatch: each process stacks its parts of two batches into one global block.
    run_pod(tmp_path / "pod", "--config.fsdp=4", "--config.steps_per_dispatch=2")
    pod = summary(tmp_path / "pod")
    assert pod["num_processes"] == 2 and pod["fsdp"] == 4
    single = cli(tmp_path / "single", "--steps_per_epoch=6", env=env(JAX_NUM_CPU_DEVICES="4"))
    assert single.wait(timeout=600) == 0, single.communicate()[1][-2000:]
    reference = summary(tmp_path / "single")
    assert reference["fsdp"] == 1
    assert pod["expected_l0"] == pytest.approx(reference["expected_l0"], rel=1e-4)
    assert pod["test_error"] == pytest.approx(reference["test_error"], abs=1.0)
