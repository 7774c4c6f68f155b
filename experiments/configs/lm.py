"""Byte-level language-model runs: ``lm_tiny`` on the text that ships with Python.

    python -m experiments.lm --method=l0_hc --model=lm_tiny --dataset=python_docs \
        --epochs=10 --workdir=runs/lm_l0_hc

Sequences of :data:`sparsejax.data.text.DEFAULT_SEQ_LEN` bytes, batch 32, Adam at
1e-3 for every parameter, no gated L2 (``l2 = 0``). The loss is the mean cross-entropy per
token, while the L0 penalty divides by N, the number of training *sequences*: a per-token
lambda is ``lambdas * T`` here. ``experiments.lm`` sets an unset ``lambdas`` to
:data:`experiments.lm.LM_LAMBDA`.
"""

import ml_collections

from sparsejax.train.config import shared_config, with_method


def get_config(method: str | None = None) -> ml_collections.ConfigDict:
    """The shared fields for LM runs and the fields of ``method`` (None: l0_hc)."""
    config = shared_config()
    config.model = "lm_tiny"
    config.dataset = "python_docs"
    config.batch_size = 32
    config.eval_batch_size = 64
    config.epochs = 10
    config.l2 = 0.0
    config.log_every = 20
    return with_method(config, method)
