import json

import matplotlib.pyplot as plt
import numpy as np
import pytest

from sparsejax.plots import (
    ACTIVE_UNITS_FIGURE,
    ERROR_FIGURE,
    KEPT_UNITS_FIGURE,
    LEARNING_RATE_FIGURE,
    LOSS_FIGURE,
    SPARSITY_FIGURE,
    build_figures,
    kept_units,
    load_series,
    main,
    plot_run,
    read_records,
    read_run_info,
)
from tests.commands import run_module

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 5_000
ALL_FIGURES = {
    ERROR_FIGURE, LOSS_FIGURE, SPARSITY_FIGURE, ACTIVE_UNITS_FIGURE, KEPT_UNITS_FIGURE,
    LEARNING_RATE_FIGURE,
}
SLOTS = ["conv1", "conv2", "fc1", "fc2"]
DENSE = [20, 50, 800, 500]
FINAL_ACTIVE = [9, 26, 380, 240]
EPOCHS = 3
STEPS_PER_EPOCH = 100
SUMMARY = {
    "gate_slots": SLOTS,
    "dense_units": DENSE,
    "active_units": FINAL_ACTIVE,
    "method": "l0_arm",
    "model": "lenet5",
}


def train_record(step, err):
    return {
        "step": step,
        "epoch": step / STEPS_PER_EPOCH,
        "train/data_loss": 2.0 - step / 1000,
        "train/err": err,
        "train/loss": 3.0 - step / 1000,
        "train/penalty": 1.0,
        "lr/net": 0.1 if step < 2 * STEPS_PER_EPOCH else 0.01,
        "train/steps_per_second": 13.9,
        "train/examples_per_second": 1394.6,
    }


def eval_record(epoch):
    fraction = 1.0 - 0.1 * (EPOCHS - epoch)
    return {
        "step": epoch * STEPS_PER_EPOCH,
        "epoch": epoch,
        "eval/err": 50.0 / epoch,
        "eval/loss": 1.5 / epoch,
        "epoch_seconds": 7.0,
        "sparsity/active_units": {s: round(n * fraction) for s, n in zip(SLOTS, FINAL_ACTIVE)},
        "sparsity/expected_l0": 60_000.0 / epoch,
        "sparsity/expected_flops": 600_000.0 / epoch,
        "sparsity/params": 55_000.0 / epoch,
        "sparsity/flops": 550_000.0 / epoch,
        "sparsity/pruning_rate": 80.0 + epoch,
    }


def synthetic_records():
    records = []
    for epoch in range(1, EPOCHS + 1):
        for half in (1, 2):
            step = (epoch - 1) * STEPS_PER_EPOCH + half * STEPS_PER_EPOCH // 2
            records.append(train_record(step, err=50.0 / epoch))
        records.append(eval_record(epoch))
    return records


def write_run(run_dir, records=None, summary=SUMMARY):
    run_dir.mkdir(parents=True, exist_ok=True)
    records = synthetic_records() if records is None else records
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    assert len(data) > MIN_PNG_BYTES, path


def figures_for(records, summary):
    figures = build_figures(load_series(records), summary or {})
    yield figures
    for figure in figures.values():
        plt.close(figure)


@pytest.fixture
def full_figures():
    yield from figures_for(synthetic_records(), SUMMARY)


def test_plot_run_writes_every_figure(tmp_path):
    run_dir = write_run(tmp_path / "run")
    paths = plot_run(run_dir)
    assert {p.name for p in paths} == ALL_FIGURES
    for path in paths:
        assert path.parent == run_dir / "plots"
        assert_png(path)


def test_plot_run_closes_its_figures(tmp_path):
    open_before = len(plt.get_fignums())
    plot_run(write_run(tmp_path / "run"))
    assert len(plt.get_fignums()) == open_before


def test_load_series_orders_records_by_step():
    records = synthetic_records()
    series = load_series(records[::-1])
    train = series["train/err"]
    np.testing.assert_array_equal(train.step, [50, 100, 150, 200, 250, 300])
    np.testing.assert_allclose(train.value, [50, 50, 25, 25, 50 / 3, 50 / 3])
    np.testing.assert_allclose(train.epoch, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    np.testing.assert_allclose(series["eval/err"].value, [50, 25, 50 / 3])
    np.testing.assert_array_equal(series["sparsity/active_units/fc2"].step, [100, 200, 300])
    np.testing.assert_array_equal(series["sparsity/active_units/fc2"].value, [192, 216, 240])


def test_load_series_keeps_the_last_record_per_kind_and_step():
    records = [
        train_record(100, err=90.0),
        eval_record(1),
        train_record(100, err=20.0),
        {**eval_record(1), "eval/err": 12.5},
    ]
    series = load_series(records)
    np.testing.assert_array_equal(series["train/err"].step, [100])
    np.testing.assert_allclose(series["train/err"].value, [20.0])
    np.testing.assert_allclose(series["eval/err"].value, [12.5])


def test_load_series_skips_non_numeric_values_and_marks_missing_epochs():
    series = load_series([{"step": 5, "train/loss": 1.0, "note": "x", "flag": True}])
    assert set(series) == {"train/loss"}
    assert np.isnan(series["train/loss"].epoch).all()


def test_active_units_has_one_line_per_slot_as_a_fraction_of_dense(full_figures):
    ax = full_figures[ACTIVE_UNITS_FIGURE].axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == SLOTS
    final = [line.get_ydata()[-1] for line in lines]
    np.testing.assert_allclose(final, np.array(FINAL_ACTIVE) / np.array(DENSE))
    assert "l0_arm / lenet5" in full_figures[ACTIVE_UNITS_FIGURE].get_suptitle()


def test_error_figure_plots_train_and_eval_against_epoch(full_figures):
    ax = full_figures[ERROR_FIGURE].axes[0]
    train, evaluation = ax.get_lines()
    np.testing.assert_allclose(train.get_xdata(), [0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    assert max(train.get_ydata()) == pytest.approx(50.0)
    np.testing.assert_allclose(evaluation.get_xdata(), [1, 2, 3])
    assert ax.get_xlabel() == "epoch"


def test_kept_units_bars_compare_dense_and_kept(full_figures):
    ax = full_figures[KEPT_UNITS_FIGURE].axes[0]
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == DENSE + FINAL_ACTIVE


def test_run_without_summary_plots_kept_units_from_the_last_eval(tmp_path):
    run_dir = write_run(tmp_path / "run", summary=None)
    paths = plot_run(run_dir)
    assert {p.name for p in paths} == ALL_FIGURES
    series = load_series(read_records(run_dir / "metrics.jsonl"))
    assert kept_units(series, read_run_info(run_dir)) == (SLOTS, FINAL_ACTIVE, None)
    for figures in figures_for(synthetic_records(), None):
        ax = figures[KEPT_UNITS_FIGURE].axes[0]
        assert [patch.get_height() for patch in ax.patches] == FINAL_ACTIVE
        assert figures[ACTIVE_UNITS_FIGURE].axes[0].get_ylabel() == "active units"


def test_figures_without_data_are_skipped(tmp_path):
    records = [train_record(50 * i, err=50.0) for i in range(1, 4)]
    paths = plot_run(write_run(tmp_path / "run", records=records, summary=None))
    assert {p.name for p in paths} == {ERROR_FIGURE, LOSS_FIGURE, LEARNING_RATE_FIGURE}


def test_title_falls_back_to_config(tmp_path):
    run_dir = write_run(tmp_path / "run", summary=None)
    (run_dir / "config.json").write_text(json.dumps({"method": "l0_hc", "model": "mlp"}))
    for figures in figures_for(synthetic_records(), read_run_info(run_dir)):
        assert "l0_hc / mlp" in figures[ERROR_FIGURE].get_suptitle()


def test_main_writes_to_out_and_prints_paths(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    out_dir = tmp_path / "figures"
    assert main([str(run_dir), "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(out_dir / name) for name in ALL_FIGURES)
    for name in ALL_FIGURES:
        assert_png(out_dir / name)


def test_main_reports_errors(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "metrics.jsonl" in capsys.readouterr().err


def test_missing_metrics_file_names_path_and_expected_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="--workdir") as info:
        plot_run(tmp_path)
    assert str(tmp_path / "metrics.jsonl") in str(info.value)


def test_empty_metrics_file_is_rejected(tmp_path):
    run_dir = write_run(tmp_path / "run", records=[])
    with pytest.raises(ValueError, match="no metric records"):
        plot_run(run_dir)


@pytest.mark.parametrize("bad_line", ["{not json", "[1, 2]"])
def test_bad_line_is_reported_with_its_number(tmp_path, bad_line):
    run_dir = write_run(tmp_path / "run")
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines.insert(2, bad_line)
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3"):
        plot_run(run_dir)


@pytest.mark.parametrize("metrics", [None, b"\xff\xfe\x00\x81 garbage", b"garbage\n"])
def test_the_cli_reports_a_missing_or_damaged_metrics_file_in_one_line(tmp_path, metrics):
    run_dir = tmp_path / "run"
    if metrics is not None:
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_bytes(metrics)
    result = run_module("sparsejax.plots", str(run_dir), timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {run_dir / 'metrics.jsonl'}")


def test_main_shows_the_traceback_with_debug(tmp_path):
    with pytest.raises(FileNotFoundError):
        main([str(tmp_path), "--debug"])


def test_learning_rate_figure_shows_the_change_of_rate_on_a_log_axis(full_figures):
    (ax,) = full_figures[LEARNING_RATE_FIGURE].axes
    (line,) = ax.get_lines()
    assert ax.get_yscale() == "log" and line.get_label() == "network"
    assert sorted(set(line.get_ydata())) == [0.01, 0.1]
