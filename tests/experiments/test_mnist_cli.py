import json

from tests.commands import run_module


def run_cli(*args, cwd):
    return run_module("experiments.mnist", *args, cwd=cwd, timeout=300)


def test_cli_trains_and_writes_the_summary(tmp_path):
    result = run_cli(
        "--method=l0_arm", "--model=lenet5", "--dataset=synthetic", "--epochs=1",
        "--steps_per_epoch=3", "--batch_size=32", f"--workdir={tmp_path}", "--seed=3",
        "--config.lambdas=(1.0,)", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "l0_arm" and summary["steps_per_epoch"] == 3
    assert len(summary["active_units"]) == 4
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["lambdas"] == [1.0] and config["seed"] == 3
    assert "epoch 1/1" in result.stderr


def test_cli_lists_valid_values_of_a_bad_flag(tmp_path):
    result = run_cli("--method=l0_bogus", cwd=tmp_path)
    assert result.returncode != 0
    assert "l0_arm" in result.stderr and "l0_hc" in result.stderr


def test_cli_missing_data_is_a_short_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("--dataset=mnist", f"--data_dir={empty}", f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1
    assert any(line.startswith("error: ") for line in result.stderr.splitlines())
    assert str(empty) in result.stderr
    assert "Traceback" not in result.stderr
