"""Runs a small training run in a fresh process that kills itself with SIGKILL at a chosen point
(``fault`` argument), or runs it to the end (``none``); prints the summary as one JSON line."""

import json
import os
import signal
import sys

import orbax.checkpoint as ocp

from experiments.configs.mnist import get_config
from sparsejax.train import checkpoint, train_and_evaluate
from sparsejax.train.digest import DIGEST_FILE
from sparsejax.train.metrics import MetricWriter

KILL_AT_SAVE = 2
"""The save (1-based) during or after which the process dies."""
KILL_AT_RECORD_STEP = 11
"""The step whose metrics record is the last thing written before the process dies."""


def small_config():
    config = get_config()
    config.update(
        dataset="synthetic", model="mlp", method="l0_hc", batch_size=64, num_train=512,
        num_test=128, eval_batch_size=64, epochs=3, log_every=3,
    )
    return config


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def on_call(owner, name, count, action):
    """Replace ``owner.name`` by a wrapper that calls ``action(original, *args)`` on its
    ``count``-th call and the original otherwise."""
    original = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(None)
        if len(calls) == count:
            return action(original, *args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def inject(fault: str) -> None:
    if fault == "in_orbax_save":  # the data is written to a temporary directory, not yet renamed
        on_call(ocp.CompositeCheckpointHandler, "finalize", KILL_AT_SAVE, lambda *_, **__: die())
    elif fault == "before_digest":
        on_call(checkpoint, "write_digest", KILL_AT_SAVE, lambda *_: die())
    elif fault == "before_first_digest":  # the only checkpoint is unfinished: start afresh
        on_call(checkpoint, "write_digest", 1, lambda *_: die())
    elif fault == "mid_digest":
        def half_written(original, directory):
            (directory / f"{DIGEST_FILE}.partial").write_text('{"files": {')
            die()

        on_call(checkpoint, "write_digest", KILL_AT_SAVE, half_written)
    elif fault == "mid_epoch":
        original = MetricWriter.write

        def write(self, step, record):
            original(self, step, record)
            if step == KILL_AT_RECORD_STEP:
                die()

        MetricWriter.write = write
    elif fault != "none":
        raise ValueError(f"unknown fault {fault!r}")


if __name__ == "__main__":
    inject(sys.argv[2])
    summary = train_and_evaluate(small_config(), sys.argv[1])
    print("RESULT " + json.dumps(summary))
