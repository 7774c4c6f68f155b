"""``python -m experiments.lm``: a gated byte-level LM trained through the engine."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_lm(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "experiments.lm", *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    )


def test_lm_cli_trains_and_reports_perplexity_and_bits_per_byte(tmp_path):
    result = run_lm(
        "--method=l0_hc", "--model=lm_tiny", "--dataset=python_docs", "--epochs=1",
        "--steps_per_epoch=2", "--batch_size=4", "--config.num_test=8",
        "--config.eval_batch_size=8", f"--workdir={tmp_path}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    loss = summary["test_loss"]
    # per-token cross-entropy: near ln(256) after two steps, not a sum over a sequence's bytes
    assert 0.0 < loss < 2 * math.log(256)
    assert summary["test_perplexity"] == math.exp(loss)
    assert summary["test_bits_per_byte"] == loss / math.log(2)
    assert 3.0 < summary["unigram_bits_per_byte"] < 8.0
    assert 0.0 <= summary["test_error"] <= 100.0
    assert summary["model"] == "lm_tiny" and summary["dataset"] == "python_docs"
    assert summary["dense_flops"] > summary["dense_params"] * 128  # attention and every token
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["lambdas"] == 1e-3 and config["l2"] == 0.0


def test_lm_cli_refuses_an_image_dataset_in_one_line(tmp_path):
    result = run_lm("--dataset=fashion_mnist", f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "error: --dataset=fashion_mnist: experiments.lm trains on text" in result.stderr
    assert "Traceback" not in result.stderr
