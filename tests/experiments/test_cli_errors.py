"""Every mistake that is the user's or the environment's to fix ends an experiment run with
exit status 1 and one ``error:`` line on stderr, never a traceback (unless ``--debug``)."""

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from sparsejax.data.cifar import CIFAR_FILES
from tests.commands import run_module

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--method=l0_hc", "--model=mlp", "--dataset=synthetic", "--epochs=1", "--steps_per_epoch=2",
    "--config.num_train=200", "--config.num_test=100",
]
"""A run of a few seconds."""


def run_cli(*args, module="experiments.mnist", cwd=ROOT, **env):
    return run_module(module, *args, cwd=cwd, timeout=300, **env)


def error_line(result, *facts):
    """The one ``error:`` line of a failed run, after checking it says each of ``facts``."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fact in facts:
        assert fact in lines[0], (fact, lines[0])
    return lines[0]


def test_an_unknown_config_field_names_it_and_the_config_file(tmp_path):
    result = run_cli(*TINY, f"--workdir={tmp_path / 'run'}", "--config.no_such_field=1")
    error_line(result, "--config.no_such_field", "experiments/configs/mnist.py")
    assert not (tmp_path / "run").exists()


def test_a_misspelt_config_field_gets_a_suggestion(tmp_path):
    result = run_cli(*TINY, f"--workdir={tmp_path}", "--config.lambdaz=(0.1,)")
    error_line(result, "'lambdaz'", '"lambdas"')


def test_a_config_value_of_the_wrong_type_is_one_line(tmp_path):
    error_line(run_cli(*TINY, f"--workdir={tmp_path}", "--config.log_every=often"),
               "--config.log_every=often", "--helpfull")


def test_the_batch_size_must_be_a_multiple_of_the_device_count(tmp_path):
    result = run_cli(
        *TINY, f"--workdir={tmp_path}", "--batch_size=7",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    error_line(result, "batch_size=7", "multiple of the device count", "multiple of 2")


def test_a_per_slot_value_of_the_wrong_length_is_refused(tmp_path):
    result = run_cli(*TINY, f"--workdir={tmp_path}", "--config.lambdas=(0.1,0.1)")
    error_line(result, "config.lambdas has 2 values", "3 gate slots")


@pytest.mark.parametrize("method", ["dense", "greg1"])
def test_a_per_slot_field_the_method_does_not_read_is_refused(tmp_path, method):
    result = run_cli(
        *TINY, f"--method={method}", f"--workdir={tmp_path}", "--config.lambdas=(0.1,0.1)"
    )
    error_line(result, "config.lambdas", f"not a field of method {method!r}", "l0_hc")


def test_a_pruning_ratio_outside_the_unit_interval_is_refused(tmp_path):
    greg = [flag for flag in TINY if not flag.startswith("--epochs")]  # GReg plans its length
    result = run_cli(*greg, "--method=greg1", f"--workdir={tmp_path}", "--config.stage_pr=1.5")
    error_line(result, "config.stage_pr", "1.5", "[0, 1)")


def test_an_epoch_count_for_greg_names_its_phase_fields(tmp_path):
    result = run_cli(*TINY, "--method=greg2", f"--workdir={tmp_path}")
    error_line(result, "greg2", "epochs=1", "pretrain_epochs", "fine_tune_epochs")


def test_an_unknown_optimizer_lists_the_valid_ones(tmp_path):
    error_line(run_cli(*TINY, f"--workdir={tmp_path}", "--config.optimizer=foo"),
               "config.optimizer", "'foo'", "adam")


def test_a_negative_steps_per_dispatch_says_what_it_may_be(tmp_path):
    error_line(run_cli(*TINY, f"--workdir={tmp_path}", "--config.steps_per_dispatch=-2"),
               "steps_per_dispatch", "0 (chosen from the model)", "got -2")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished")
    result = run_cli(*TINY, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_a_changed_config_on_an_existing_workdir_names_the_directory(finished_run):
    result = run_cli(*TINY, f"--workdir={finished_run}", "--config.l2=0.1")
    error_line(result, str(finished_run), "l2", "another --workdir")


@pytest.mark.parametrize("content", [b"\xff\x00\x9c garbage", b"{not json", b"[1, 2]"])
def test_a_damaged_config_json_is_named(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    result = run_cli(*TINY, f"--workdir={tmp_path}")
    error_line(result, str(tmp_path / "config.json"), "damaged", "delete it")


def test_a_fake_cifar_tarball_is_reported_as_damaged(tmp_path):
    tarball = tmp_path / CIFAR_FILES["cifar10"].tarball
    tarball.write_bytes(os.urandom(4096))
    result = run_cli(
        "--method=l0_hc", "--model=resnet20", "--dataset=cifar10", f"--data_dir={tmp_path}",
        f"--workdir={tmp_path / 'run'}", module="experiments.cifar",
    )
    error_line(result, str(tarball), "damaged or not a CIFAR-10 archive", "download")


def test_a_data_dir_that_does_not_exist_is_an_error(tmp_path):
    missing = tmp_path / "no" / "such"
    result = run_cli(*TINY, "--dataset=fashion_mnist", f"--data_dir={missing}",
                     f"--workdir={tmp_path / 'run'}")
    error_line(result, f"data_dir {missing} does not exist")


def test_debug_shows_the_traceback(tmp_path):
    for debug in ({"args": ["--debug"]}, {"env": {"SPARSEJAX_DEBUG": "1"}}):
        result = run_cli(*TINY, f"--workdir={tmp_path}", "--config.optimizer=foo",
                         *debug.get("args", []), **debug.get("env", {}))
        assert result.returncode == 1
        assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str):
    mount_tmpfs(path, options)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB file system: a run's first checkpoint does not fit."""
    with mounted_tmpfs(tmp_path / "disk", "size=1m") as disk:
        yield disk


@pytest.fixture
def read_only_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "read_only", "size=1m,ro") as disk:
        yield disk


def test_a_read_only_workdir_parent_is_named(read_only_disk):
    workdir = read_only_disk / "run"
    error_line(run_cli(*TINY, f"--workdir={workdir}"),
               str(workdir), "read-only file system", "--workdir")


def test_a_full_disk_before_the_first_write_is_named(small_disk):
    (small_disk / "filler").write_bytes(b"\0" * (1 << 20))
    workdir = small_disk / "run"
    error_line(run_cli(*TINY, f"--workdir={workdir}"),
               str(workdir), "no space left on device", "free space", "--workdir")


def test_a_full_disk_at_the_first_checkpoint_ends_with_one_error_line(small_disk):
    result = run_cli(*TINY, f"--workdir={small_disk / 'run'}")
    assert result.returncode == 1, result.stderr[-3000:]
    # Orbax's worker threads may print "Event loop is closed" tracebacks as it shuts down after
    # the failed write, before or after the run's own report: that report is the one error line.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    (error,) = errors
    assert error.startswith(f"error: {small_disk / 'run' / 'checkpoints'}"), result.stderr[-3000:]
    assert "no space left on device (ENOSPC); free space" in error
    assert "ValueError" not in result.stderr


def test_a_run_written_before_method_state_left_the_model_is_named_not_read(tmp_path):
    """A run directory whose config.json predates the resolved, versioned configs (and whose
    checkpoints hold GReg's or stochastic pruning's state inside the model) is refused by
    training and by slimming, in one line each."""
    run = tmp_path / "old_run"
    (run / "checkpoints" / "4" / "state").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": "l0_hc", "model": "mlp", "seed": 0}))
    error_line(run_cli(*TINY, f"--workdir={run}"), str(run), "earlier sparsejax", "new --workdir")
    slim = run_cli(str(run), module="sparsejax.slim")
    error_line(slim, str(run), "earlier sparsejax")
