"""``python -m experiments.lm``: a gated byte-level LM trained through the engine, the zoo's or
a plain NNX model of the user's (``--model=MODULE:FACTORY``)."""

import json
import math
import shutil
from pathlib import Path

from tests.commands import run_module

ROOT = Path(__file__).resolve().parents[2]


def run_lm(*args, cwd, pythonpath=str(ROOT)):
    return run_module("experiments.lm", *args, cwd=cwd, pythonpath=pythonpath)


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


POOLED_LM = """
from traced_lm import SmallLM


class Pooled(SmallLM):
    def __call__(self, ids):
        return super().__call__(ids).mean(axis=1)


def pooled(*, rngs, num_classes):
    return Pooled(rngs=rngs, num_classes=num_classes)
"""


def test_a_plain_nnx_language_model_trains_resumes_and_slims_from_outside_the_repository(
    tmp_path
):
    """The example LM, copied out of the repository: traced on token ids, its heads, head
    dimensions and MLP units gated under a FLOPs budget (no lambdas set for it), resumed, and
    slimmed to a network with the gated logits on test sequences."""
    own = tmp_path / "my_models"
    own.mkdir()
    shutil.copy(ROOT / "examples" / "traced_lm.py", own / "traced_lm.py")
    (own / "bad_lm.py").write_text(POOLED_LM)
    path = f"{own}:{ROOT}"
    common = ("--method=l0_hc", "--model=traced_lm:small_lm", "--config.target_flops=0.5",
              "--config.target_warmup_epochs=1",
              "--steps_per_epoch=2", "--batch_size=4", "--config.num_test=8",
              "--config.eval_batch_size=8", f"--workdir={tmp_path / 'run'}")
    first = run_lm("--epochs=1", *common, cwd=tmp_path, pythonpath=path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_lm("--epochs=2", *common, cwd=tmp_path, pythonpath=path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "at step 2" in resumed.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == "traced_lm:small_lm" and summary["epochs"] == 2
    assert summary["gate_slots"] == [
        f"blocks.{b}.{slot}" for b in range(2)
        for slot in ("attention.query.axis1", "attention.query.axis2", "attention.value", "up")]
    block = 4 * 64 * 64 + 2 * 64 * 128
    # token and position lookups, two blocks, the head
    assert summary["dense_params"] == 256 * 64 + 128 * 64 + 2 * block + 64 * 256
    assert summary["dense_flops"] == 128 * (2 * block + 64 * 256) + 2 * 2 * 128 * 128 * 64
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["target_flops"] == 0.5  # and no lambdas set, which a target refuses
    slimmed = run_module("sparsejax.slim", str(tmp_path / "run"), cwd=tmp_path, pythonpath=path)
    assert slimmed.returncode == 0, slimmed.stderr[-3000:]
    assert "on 8 test examples" in slimmed.stdout
    report = json.loads((tmp_path / "run" / "slim" / "slim_report.json").read_text())
    assert report["max_logit_difference"] < 1e-4
    failed = run_lm("--epochs=1", *common[:1], "--model=bad_lm:pooled", *common[2:-1],
                    f"--workdir={tmp_path / 'failed'}", cwd=tmp_path, pythonpath=path)
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert failed.returncode == 1 and len(lines) == 1, failed.stderr[-2000:]
    assert lines[0].startswith("error: --model=bad_lm:pooled maps token sequences of shape "
                               "(1, 128) to an output of shape (1, 256), not logits of shape "
                               "(batch, 128, 256)"), lines[0]
