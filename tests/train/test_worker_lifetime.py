"""Input worker processes do not outlive the process that started them, even when it is killed."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from sparsejax.train.input import usable_cpus

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
GONE_WITHIN_SECONDS = 5.0

WORKER = textwrap.dedent("""
    import sys, time
    from sparsejax.train.worker_lifetime import exit_with_parent
    exit_with_parent(int(sys.argv[1]), poll_seconds=0.05)
    print("watching", flush=True)
    time.sleep(120)
""")

PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())])
    print(worker.pid, flush=True)
    time.sleep(120)
""")


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until_gone(processes: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """The processes still alive after ``seconds`` (or none, as soon as all are gone)."""
    deadline = time.monotonic() + seconds
    while (living := [p for p in processes if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return living


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def kill_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        if alive(process):
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue


def test_a_worker_ends_when_its_parent_is_killed():
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, WORKER], env=ENV, stdout=subprocess.PIPE, text=True
    )
    worker = psutil.Process(int(parent.stdout.readline()))
    try:
        assert parent.stdout.readline() == "watching\n"
        time.sleep(0.5)  # the watching thread has polled several times
        assert alive(worker)
        parent.kill()
        parent.wait()
        assert not wait_until_gone([worker], GONE_WITHIN_SECONDS)
    finally:
        kill_all([worker])
        parent.kill()
        parent.wait()


def test_a_worker_whose_parent_is_already_gone_ends_at_once():
    not_parent = 1 if os.getpid() != 1 else 2
    script = (
        "import time\nfrom sparsejax.train.worker_lifetime import exit_with_parent\n"
        f"exit_with_parent({not_parent})\ntime.sleep(120)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=ENV, timeout=120)
    assert result.returncode == -signal.SIGKILL


def test_no_input_worker_outlives_a_killed_training_run(tmp_path):
    workers = min(2, usable_cpus())
    run = subprocess.Popen(
        [
            sys.executable, "-m", "experiments.mnist", "--method=l0_hc", "--model=mlp",
            "--dataset=synthetic", "--epochs=1", "--batch_size=8", "--steps_per_epoch=100000",
            "--config.num_train=800000", "--config.num_test=8", "--config.eval_batch_size=8",
            "--config.log_every=1", f"--config.input_workers={workers}", f"--workdir={tmp_path}",
        ],
        cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    parent = psutil.Process(run.pid)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and metrics.stat().st_size):  # workers deliver batches
            assert run.poll() is None, "the run ended before it trained"
            assert time.monotonic() < deadline, "the run never trained"
            time.sleep(0.2)
        children = parent.children(recursive=True)
        assert sum("spawn_main" in command_line(c) for c in children) == workers
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        survivors = wait_until_gone(children, GONE_WITHIN_SECONDS)
        assert not survivors, [command_line(p)[:80] for p in survivors]
    finally:
        kill_all(children)
        run.kill()
        run.wait()
