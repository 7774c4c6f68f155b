"""Injected faults: damaged checkpoints, SIGKILL at several points (during a save too), a second
run on a live workdir. Each ends in an exact resume from the newest good checkpoint or a clean
refusal, never in a silent use of damaged data."""

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.mnist import get_config
from sparsejax.errors import UserError
from sparsejax.slim.runs import restore_run
from sparsejax.train import NonFiniteLossError, train_and_evaluate
from sparsejax.train.checkpoint import (
    CORRUPT_PREFIX,
    SEALED_MARKER,
    Checkpointer,
    CheckpointError,
)
from sparsejax.train.digest import DIGEST_FILE
from sparsejax.train.lock import (
    LOCK_FILE,
    STALE_SECONDS,
    WorkdirLock,
    WorkdirLockedError,
)
from sparsejax.train.metrics import METRICS_FILE, drop_records_after, read_metrics

ROOT = Path(__file__).resolve().parents[2]
RESULT_KEYS = ("test_error", "best_test_error", "expected_l0", "params", "active_units")
TIMING_KEYS = ("epoch_seconds", "train/steps_per_second", "train/examples_per_second")


def config_for(**overrides):
    config = get_config()
    config.update(
        dataset="synthetic", model="mlp", method="l0_hc", epochs=3, batch_size=64,
        num_train=512, num_test=128, log_every=3, eval_batch_size=100,
    )
    config.update(overrides)
    return config


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bits(path: Path, count: int = 5, seed: int = 0) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for _ in range(count):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "bit flips": lambda step: flip_bits(largest_file(step / "state")),
    "truncated": lambda step: truncate(largest_file(step / "state")),
    "deleted array metadata": lambda step: (step / "state" / "_METADATA").unlink(),
    "deleted checkpoint metadata": lambda step: (step / "_CHECKPOINT_METADATA").unlink(),
    "unfinished (no digest)": lambda step: (step / DIGEST_FILE).unlink(),
    "garbage digest": lambda step: (step / DIGEST_FILE).write_text("{not json"),
    "digest of another shape": lambda step: (step / DIGEST_FILE).write_text('{"files": [1]}'),
    "added file": lambda step: (step / "state" / "stray").write_bytes(b"x"),
}


def saved(tmp_path, steps=(1, 2)) -> dict:
    checkpointer = Checkpointer(tmp_path, max_to_keep=len(steps))
    for step in steps:
        checkpointer.save(step, {"w": jnp.full(4, float(step))}, {"epoch": step})
    checkpointer.close()
    return {"w": jnp.zeros(4)}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_restored(
    tmp_path, capsys, damage
):
    template = saved(tmp_path)
    newest = tmp_path / "checkpoints" / "2"
    DAMAGE[damage](newest)
    checkpointer = Checkpointer(tmp_path, set_aside=True)
    state, progress = checkpointer.restore(template)
    np.testing.assert_array_equal(state["w"], np.full(4, 1.0))
    assert progress == {"epoch": 1}
    assert checkpointer.all_steps() == [1]
    assert not newest.exists() and (tmp_path / "checkpoints" / f"{CORRUPT_PREFIX}2").is_dir()
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: checkpoint 2 failed verification")
    checkpointer.save(2, {"w": jnp.full(4, 7.0)}, {"epoch": 2})
    state, _ = checkpointer.restore(template)
    np.testing.assert_array_equal(state["w"], np.full(4, 7.0))
    checkpointer.close()


def test_a_reader_skips_a_damaged_checkpoint_without_moving_it(tmp_path, capsys):
    template = saved(tmp_path)
    flip_bits(largest_file(tmp_path / "checkpoints" / "2" / "state"))
    checkpointer = Checkpointer(tmp_path)
    state, _ = checkpointer.restore(template)
    checkpointer.close()
    np.testing.assert_array_equal(state["w"], np.full(4, 1.0))
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert "skipped" in capsys.readouterr().err


def test_a_checkpoint_at_or_before_a_step_is_the_newest_there_that_verifies(tmp_path):
    template = saved(tmp_path, steps=(1, 2, 3))
    truncate(largest_file(tmp_path / "checkpoints" / "2" / "state"))
    checkpointer = Checkpointer(tmp_path)
    state, _ = checkpointer.restore(template, at_most=2)
    np.testing.assert_array_equal(state["w"], np.full(4, 1.0))
    assert checkpointer.restore(template, at_most=0) is None
    checkpointer.close()


def test_when_no_checkpoint_verifies_one_error_says_so_and_what_to_do(tmp_path):
    template = saved(tmp_path)
    for step in ("1", "2"):
        flip_bits(largest_file(tmp_path / "checkpoints" / step / "state"))
    checkpointer = Checkpointer(tmp_path, set_aside=True)
    with pytest.raises(CheckpointError) as error:
        checkpointer.restore(template)
    checkpointer.close()
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, UserError)
    assert "checkpoint 2 failed" in message and "checkpoint 1 failed" in message
    assert f"delete {tmp_path / 'checkpoints'}" in message


def test_checkpoints_whose_save_did_not_finish_count_as_never_written(tmp_path, capsys):
    template = saved(tmp_path)
    for step in ("1", "2"):
        (tmp_path / "checkpoints" / step / DIGEST_FILE).unlink()
    checkpointer = Checkpointer(tmp_path, set_aside=True)
    assert checkpointer.restore(template) is None
    checkpointer.close()
    assert capsys.readouterr().err.count("its save did not finish") == 2


@pytest.mark.parametrize("engine", [True, False], ids=["engine", "reader"])
def test_checkpoints_written_before_digests_are_still_read(tmp_path, capsys, engine):
    template = saved(tmp_path)
    (tmp_path / "checkpoints" / SEALED_MARKER).unlink()
    for step in ("1", "2"):
        (tmp_path / "checkpoints" / step / DIGEST_FILE).unlink()
    checkpointer = Checkpointer(tmp_path, set_aside=engine)
    state, _ = checkpointer.restore(template)
    checkpointer.close()
    np.testing.assert_array_equal(state["w"], np.full(4, 2.0))
    assert "predate digests" in capsys.readouterr().err
    sealed = [(tmp_path / "checkpoints" / step / DIGEST_FILE).exists() for step in ("1", "2")]
    assert sealed == [engine, engine]  # a reader writes nothing
    assert (tmp_path / "checkpoints" / SEALED_MARKER).exists() == engine


def test_an_intact_checkpoint_that_does_not_fit_is_an_error_and_stays(tmp_path):
    saved(tmp_path)
    checkpointer = Checkpointer(tmp_path, set_aside=True)
    with pytest.raises(CheckpointError, match="intact but does not fit"):
        checkpointer.restore({"w": jnp.zeros(4), "extra": jnp.zeros(2)})
    checkpointer.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == ["1", "2"]


def comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_a_run_resumes_from_the_newest_good_checkpoint_as_if_the_bad_one_was_never_written(
    tmp_path,
):
    whole = train_and_evaluate(config_for(), tmp_path / "whole")
    train_and_evaluate(config_for(epochs=2), tmp_path / "damaged")
    flip_bits(largest_file(tmp_path / "damaged" / "checkpoints" / "16" / "state"))
    resumed = train_and_evaluate(config_for(), tmp_path / "damaged")
    for key in RESULT_KEYS:
        assert resumed[key] == whole[key], key
    assert comparable(read_metrics(tmp_path / "damaged")) == comparable(
        read_metrics(tmp_path / "whole")
    )
    assert (tmp_path / "damaged" / "checkpoints" / f"{CORRUPT_PREFIX}16").is_dir()


def test_fewer_epochs_than_the_workdir_finished_is_an_error_that_changes_nothing(tmp_path):
    train_and_evaluate(config_for(epochs=2), tmp_path)
    config_text = (tmp_path / "config.json").read_text()
    summary_text = (tmp_path / "summary.json").read_text()
    with pytest.raises(UserError, match="finished 2 epochs.*--epochs=1"):
        train_and_evaluate(config_for(epochs=1), tmp_path)
    assert (tmp_path / "config.json").read_text() == config_text
    assert (tmp_path / "summary.json").read_text() == summary_text


def test_a_run_that_fails_before_its_first_step_leaves_no_workdir(tmp_path):
    with pytest.raises(ValueError, match="exceeds"):
        train_and_evaluate(config_for(batch_size=4096), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ValueError, match="exceeds"):
        train_and_evaluate(config_for(batch_size=4096), existing)
    assert existing.is_dir()


def test_a_non_finite_loss_before_any_checkpoint_says_none_was_saved(tmp_path):
    with pytest.raises(NonFiniteLossError, match="no checkpoint was saved"):
        train_and_evaluate(config_for(learning_rate=1e38, l2=1.0), tmp_path / "run")


def test_resuming_drops_the_metric_records_after_the_restored_step(tmp_path):
    path = tmp_path / METRICS_FILE
    records = [{"step": s, "train/loss": 1.0} for s in (3, 6, 8, 8, 11, 14)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 16, "tra')
    drop_records_after(path, 8)
    assert [r["step"] for r in read_metrics(tmp_path)] == [3, 6, 8, 8]


def test_a_second_run_on_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirLockedError) as error:
            train_and_evaluate(config_for(epochs=1), tmp_path)
    assert f"process {os.getpid()} on host {socket.gethostname()}" in str(error.value)
    assert not (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / "config.json").exists()


def write_lock(workdir: Path, host: str, pid: int, started, age: float = 0.0) -> Path:
    path = workdir / LOCK_FILE
    path.write_text(json.dumps({"host": host, "pid": pid, "started": started}) + "\n")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize(
    "holder,alive",
    [
        (lambda: (socket.gethostname(), os.getpid(), None, 0.0), True),
        (lambda: (socket.gethostname(), dead_pid(), None, 0.0), False),
        (lambda: (socket.gethostname(), os.getpid(), "not this process", 0.0), False),
        (lambda: ("another-host", 1, "1", 0.0), True),
        (lambda: ("another-host", 1, "1", STALE_SECONDS + 60), False),
    ],
    ids=["live here", "dead here", "reused pid", "fresh heartbeat elsewhere", "stale elsewhere"],
)
def test_a_lock_is_taken_over_only_from_a_dead_holder(tmp_path, capsys, holder, alive):
    host, pid, started, age = holder()
    write_lock(tmp_path, host, pid, started, age)
    lock = WorkdirLock(tmp_path)
    if alive:
        with pytest.raises(WorkdirLockedError, match=f"process {pid} on host {host}"):
            lock.acquire()
        return
    with lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert f"taking over {tmp_path / LOCK_FILE} from process {pid}" in capsys.readouterr().err
    assert not (tmp_path / LOCK_FILE).exists()


def run_script(workdir: Path, fault: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "train" / "fault_script.py"), str(workdir), fault],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
    )


def result_of(process: subprocess.CompletedProcess) -> dict:
    assert process.returncode == 0, process.stderr[-3000:]
    line = next(l for l in process.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole")
    return result_of(run_script(workdir, "none")), read_metrics(workdir)


@pytest.mark.parametrize(
    "fault", ["in_orbax_save", "before_digest", "before_first_digest", "mid_digest", "mid_epoch"]
)
def test_sigkill_at_any_point_resumes_exactly(tmp_path, uninterrupted, fault):
    killed = run_script(tmp_path, fault)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / LOCK_FILE).exists()
    rerun = run_script(tmp_path, "none")
    summary = result_of(rerun)
    assert "taking over" in rerun.stderr
    whole_summary, whole_metrics = uninterrupted
    for key in RESULT_KEYS:
        assert summary[key] == whole_summary[key], key
    assert comparable(read_metrics(tmp_path)) == comparable(whole_metrics)
    assert not (tmp_path / LOCK_FILE).exists()


def test_slimming_reads_the_newest_checkpoint_that_verifies(tmp_path, capsys):
    train_and_evaluate(config_for(epochs=2), tmp_path)
    truncate(largest_file(tmp_path / "checkpoints" / "16" / "state"))
    _, _, step = restore_run(tmp_path)
    assert step == 8
    assert "checkpoint 16 failed verification" in capsys.readouterr().err
    flip_bits(largest_file(tmp_path / "checkpoints" / "8" / "state"))
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        restore_run(tmp_path)


def test_a_second_cli_run_on_a_live_workdir_is_refused_with_one_line(tmp_path):
    command = [
        sys.executable, "-m", "experiments.mnist", "--model=lenet5", "--method=l0_hc",
        "--dataset=synthetic", "--epochs=50", "--config.log_every=2", f"--workdir={tmp_path}",
    ]
    # without the suite's compilation cache: the first run is killed at no chosen point, maybe
    # while it writes a cache entry that a later test would then read damaged
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")},
        "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
    }
    first = subprocess.Popen(command, cwd=ROOT, env=environment, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (tmp_path / METRICS_FILE).exists() and time.time() < deadline:
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.1)
        second = subprocess.run(
            command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
        )
    finally:
        first.kill()
        first.communicate()
    lines = second.stderr.strip().splitlines()
    assert second.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr[-2000:]
    assert f"process {first.pid} on host {socket.gethostname()}" in lines[0]
