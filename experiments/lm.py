"""Train a gated byte-level language model on the text that ships with Python.

    python -m experiments.lm --method=l0_hc --model=lm_tiny --dataset=python_docs \
        --workdir=runs/lm_l0_hc

``--model`` is ``lm_tiny`` or ``MODULE:FACTORY``, a plain NNX module of the user's that maps
``(batch, T)`` int32 token ids to ``(batch, T, vocabulary)`` logits, traced and gated like the
image command lines' (``examples/traced_lm.py``).

Datasets: ``python_docs`` (the ``pydoc_data.topics`` documentation) and ``python_sources`` (the
standard library's ``.py`` files; ``--data_dir`` another library directory), split by document
(:mod:`sparsejax.data.text`). Every hyperparameter is a ``--config.NAME=VALUE`` override of
``experiments/configs/lm.py``. The summary has the image CLIs' fields, where ``test_error`` is
the percent of test bytes whose arg-max prediction is wrong, plus ``test_loss`` (mean
cross-entropy per byte, nats), ``test_perplexity`` (exp of it, per byte), ``test_bits_per_byte``
and ``unigram_bits_per_byte``, the baseline of the train split's byte frequencies on the test
split. Rerunning the same command with the same ``--workdir`` resumes.
"""

from sparsejax import host

host.configure()

import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import ml_collections  # noqa: E402

from experiments import cli  # noqa: E402
from sparsejax.data.text import TEXT_DATASETS, load_text  # noqa: E402
from sparsejax.errors import ConfigError  # noqa: E402
from sparsejax.train.loop import SUMMARY_FILE  # noqa: E402
from sparsejax.train.metrics import METRICS_FILE  # noqa: E402

LM_LAMBDA = 1e-3
"""The default lambda of every gate slot (units of 1/N, N training sequences)."""


def resolve(config: ml_collections.ConfigDict) -> None:
    """Refuses a dataset that is not text; an unset ``lambdas`` of an L0-family method becomes
    :data:`LM_LAMBDA`, unless a budget (``target_flops`` / ``target_params``) replaces it."""
    if config.dataset not in TEXT_DATASETS:
        raise ConfigError(
            f"--dataset={config.dataset}: experiments.lm trains on text; choose one of "
            f"{', '.join(TEXT_DATASETS)}"
        )
    targeted = any(config.get(f"target_{kind}") is not None for kind in ("flops", "params"))
    if "lambdas" in config and config.get("lambdas") is None and not targeted:
        config.lambdas = LM_LAMBDA


def last_eval_loss(workdir: Path) -> float:
    """The ``eval/loss`` of the run's last evaluation record."""
    loss = None
    with open(workdir / METRICS_FILE) as records:
        for line in records:
            record = json.loads(line)
            loss = record.get("eval/loss", loss)
    if loss is None:
        raise ValueError(f"{workdir / METRICS_FILE} has no eval/loss record")
    return float(loss)


def summarize(config: ml_collections.ConfigDict, workdir: Path, summary: dict) -> dict:
    """The summary with the LM's test loss, perplexity and bits per byte and the unigram
    baseline, also written to ``summary.json``."""
    loss = last_eval_loss(workdir)
    data = load_text(config.dataset, stdlib_dir=config.get("data_dir"))
    summary = {
        **summary,
        "test_loss": loss,
        "test_perplexity": math.exp(loss),
        "test_bits_per_byte": loss / math.log(2.0),
        "unigram_bits_per_byte": data.unigram_bits_per_byte,
    }
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    cli.run("lm", resolve, summarize)
