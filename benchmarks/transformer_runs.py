"""The runs of :mod:`benchmarks.transformer_table`: their configs and the query heads that stay
live in them (no command-line flags, so tests and other benchmarks can import it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_collections
import numpy as np

from experiments.configs import lm as lm_config
from experiments.configs import mnist as mnist_config
from sparsejax.slim.runs import restore_run
from sparsejax.structure.report import gate_report

MODELS = ("vit_tiny", "lm_tiny")
GATE_LEARNING_RATE = {"vit_tiny": 4e-2, "lm_tiny": 5e-2}
"""Adam's learning rate of the gate parameters. A hard-concrete gate closes at test time when
log alpha <= log(-gamma / zeta) = -2.4 (gamma = -0.1, zeta = 1.1), from log(0.9 / 0.1) = 2.2
at the transformers' initial drop rate 0.1: a move of 4.6, and Adam moves a parameter at most
about its learning rate per update. :mod:`benchmarks.budget_table`'s 1e-2 allows 1.8 in the
176 updates of two ``lm_tiny`` epochs (measured: ``l0_hc`` at ``target_params=0.5`` closed no
gate, expected L0 0.54 of dense); 5e-2 allows 8.8 there, 4e-2 allows 12 in 300 ``vit_tiny``
updates."""
BLOCK_SLOT = re.compile(r"blocks\.(\d+)\.(\w+)")
LIVE_HEADS_FILE = "live_heads.json"


def run_config(method: str, model: str, epochs: int, target: float, seed: int = 0,
               steps_per_epoch: int | None = None) -> ml_collections.ConfigDict:
    """The config of one run: the model's config, the budget for a gated method."""
    if model == "vit_tiny":
        config = mnist_config.get_config(method)
        settings = {"dataset": "fashion_mnist", "target_flops": target}
    else:
        config = lm_config.get_config(method)
        settings = {"dataset": "python_docs", "target_params": target}
    settings.update(model=model, epochs=epochs, seed=seed, log_every=100,
                    steps_per_epoch=steps_per_epoch,
                    gate_learning_rate=GATE_LEARNING_RATE[model])
    config.update({key: value for key, value in settings.items() if key in config})
    return config


def heads_per_block(summary: dict) -> list[int]:
    """Open query-head gates of every block, 0 if the block's attention or every KV group is
    closed (from the summary's counts: exact for MHA; with GQA a head of a closed group still
    counts, see :func:`live_heads`)."""
    blocks: dict[int, dict[str, int]] = {}
    for slot, units in zip(summary["gate_slots"], summary["active_units"]):
        match = BLOCK_SLOT.fullmatch(slot)
        if match:
            blocks.setdefault(int(match[1]), {})[match[2]] = units
    return [
        0 if b.get("attn", 1) == 0 or b.get("kv_groups", 1) == 0 else b["heads"]
        for _, b in sorted(blocks.items())
    ]


def live_heads(test_gates: dict[str, np.ndarray], depth: int) -> list[int]:
    """Query heads of every block that reach the output under the test-time gates: head
    h = m G + g (G KV groups) is live when its gate, its group's gate (``kv_groups``) and the
    block's ``attn`` gate are all nonzero."""
    counts = []
    for block in range(depth):
        heads = np.asarray(test_gates[f"blocks.{block}.heads"]).reshape(-1) != 0
        groups = test_gates.get(f"blocks.{block}.kv_groups")
        if groups is not None:
            groups = np.asarray(groups).reshape(-1) != 0
            heads = heads & groups[np.arange(heads.size) % groups.size]
        attn = np.asarray(test_gates.get(f"blocks.{block}.attn", 1.0)).reshape(-1)
        counts.append(int(heads.sum()) if attn.all() else 0)
    return counts


def run_live_heads(run_dir: Path, depth: int) -> list[int] | None:
    """:func:`live_heads` of the run's newest checkpoint (None for a run without gates), cached
    in ``run_dir``."""
    cache = run_dir / LIVE_HEADS_FILE
    if not cache.exists():
        model, _, _ = restore_run(run_dir)
        gates = gate_report(model).test_gates
        cache.write_text(json.dumps(live_heads(gates, depth) if gates else None) + "\n")
    return json.loads(cache.read_text())
