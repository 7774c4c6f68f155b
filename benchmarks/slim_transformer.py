"""Inference speed of a slimmed transformer against the gated network it came from.

    python -m benchmarks.slim_transformer --run=runs/transformer_table/lm_tiny/l0_hc

Restores the newest checkpoint of a training run of ``lm_tiny`` or ``vit_tiny``
(:func:`sparsejax.slim.runs.restore_run`), slims it from its trace (the closed heads, KV groups,
FFN units, hidden dimensions and sublayers removed:
:func:`sparsejax.slim.traced.slim_traced_model`) and checks that both networks give the same
logits. Both eval-mode forward passes are jitted,
compiled, then timed in turn over ``--repeats`` chunks of ``--steps`` batches already on the device
(:func:`benchmarks.common.interleaved_medians`), so that the ratio comes from one run on a shared
machine; the table gives the median examples per second, the wall-clock speedup, the FLOPs
reduction (MACs with the attention products, :mod:`sparsejax.structure.accounting`) and their
quotient (the target is >= 0.8 on CPU). The gated network's forward pass multiplies by its
test-time gates, which the slim one has folded into its weights.
"""

from __future__ import annotations

from sparsejax import host

host.configure()

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.common import (  # noqa: E402
    dataset_like,
    forward,
    input_spec,
    interleaved_medians,
)
from sparsejax.data.text import TEXT_DATASETS  # noqa: E402
from sparsejax.slim.runs import restore_run  # noqa: E402
from sparsejax.slim.traced import slim_traced_model  # noqa: E402

_RUN = flags.DEFINE_string("run", None, "Working directory of a gated transformer run.",
                           required=True)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 3, "Batches per timed chunk.")
_REPEATS = flags.DEFINE_integer("repeats", 11, "Timed chunks per network (median reported).")
_JSON = flags.DEFINE_string("json", None, "Also write the numbers to this file.")


def main(argv: list[str]) -> None:
    del argv
    model, spec, step = restore_run(_RUN.value)
    like = dataset_like(spec.model)
    shape = (_STEPS.value, _BATCH.value, *input_spec(like).image_shape)
    if like in TEXT_DATASETS:
        batches = jax.random.randint(jax.random.key(0), shape, 0, input_spec(like).num_classes)
    else:
        batches = jax.random.uniform(jax.random.key(0), shape)
    slim = slim_traced_model(model, np.asarray(batches[0]))
    slim_forward, report = jax.jit(slim), slim.report
    architecture = {"widths": report.widths}
    runs = {"gated": forward(model), "slim": slim_forward}
    outputs = {name: run(batches[0]) for name, run in runs.items()}
    scale = max(1.0, float(np.abs(outputs["gated"]).max()))
    np.testing.assert_allclose(outputs["slim"], outputs["gated"], atol=1e-4 * scale, rtol=1e-4)

    def chunk(run):
        def timed() -> None:
            for batch in batches:
                out = run(batch)
            jax.block_until_ready(out)
        return timed

    seconds = interleaved_medians(
        {name: chunk(run) for name, run in runs.items()}, _REPEATS.value, _STEPS.value
    )
    speedup = seconds["gated"] / seconds["slim"]
    numbers = {
        "run": _RUN.value,
        "model": spec.model,
        "step": step,
        "architecture": architecture,
        "batch_size": _BATCH.value,
        "ms_per_batch": {name: 1000 * s for name, s in seconds.items()},
        "params": [report.params_before, report.params_after],
        "flops": [report.flops_before, report.flops_after],
        "flops_ratio": report.flops_ratio,
        "speedup": speedup,
        "speedup_over_flops_ratio": speedup / report.flops_ratio,
    }
    print(f"{spec.model} at step {step} ({_RUN.value}), batch {_BATCH.value}, "
          f"backend={jax.default_backend()}; slim architecture {numbers['architecture']}")
    print("| network | params | MFLOPs (MACs) / example | ms / batch | speedup | FLOPs reduction "
          "| speedup / FLOPs reduction |")
    print("|---|---|---|---|---|---|---|")
    print(f"| gated | {report.params_before:,.0f} | {report.flops_before / 1e6:.1f} "
          f"| {1000 * seconds['gated']:.1f} | 1.00x | 1.00x | - |")
    print(f"| slim | {report.params_after:,.0f} | {report.flops_after / 1e6:.1f} "
          f"| {1000 * seconds['slim']:.1f} | {speedup:.2f}x | {report.flops_ratio:.2f}x "
          f"| {speedup / report.flops_ratio:.2f} |")
    if _JSON.value:
        with open(_JSON.value, "w") as file:
            json.dump(numbers, file, indent=2)


if __name__ == "__main__":
    app.run(main)
