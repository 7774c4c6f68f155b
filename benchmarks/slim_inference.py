"""Inference speed of a slimmed network against the masked network it came from.

    python -m benchmarks.slim_inference --model=resnet56 --batch_size=256

The masked network is the dense model whose pruned filters are zero (GReg filter pruning: kernel
slice and the following BatchNorm's scale and bias), with the pruning ratios ``--stage_pr`` =
[stem, stage 1, ..., fc] applied to the first convolution of every residual block (the GReg
ResNet-56 setting [0, 0.75, 0.75, 0.32, 0] by default; the lowest-L1 filters go). Both networks'
eval-mode forward passes are jitted, compiled, then timed alternately over ``--repeats`` chunks of
``--steps`` batches already on the device, so that both ratios come from the same run; the table
gives the median examples per second, the wall-clock speedup, the FLOPs reduction
(:mod:`sparsejax.structure.accounting`) and their quotient (the target is >= 0.7 on CPU), for the
exactly slimmed network and for one whose widths are rounded up to ``--width_multiple``.
:mod:`benchmarks.narrow_conv` times the slimmed convolutions one by one (on XLA's CPU backend
the narrowed 16-channel convolutions of stage 1 can be slower than the full-width ones).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks.common import dataset_like, forward
from sparsejax.data.synthetic import SYNTHETIC_LIKE
from sparsejax.methods.greg.accounting import greg_pruned_count
from sparsejax.models.base import GatedModel
from sparsejax.slim import slim_model
from sparsejax.structure.traced_model import build_zoo_model

_MODEL = flags.DEFINE_string("model", "resnet56", "A residual model with block{i}.conv1 layers.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Batch size.")
_STAGE_PR = flags.DEFINE_list("stage_pr", ["0", "0.75", "0.75", "0.32", "0"],
                              "Pruning ratios: stem, one per stage, fc.")
_STEPS = flags.DEFINE_integer("steps", 3, "Batches per timed chunk.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed chunks per network (median reported).")
_WIDTH_MULTIPLE = flags.DEFINE_integer(
    "width_multiple", 8, "Also time the slim network with widths rounded up to this multiple."
)


def prune_first_convs(model: GatedModel, stage_pr: list[float]) -> None:
    """Zero the lowest-L1 filters of every ``block{i}.conv1`` at its stage's ratio, in place."""
    first_convs = [
        layer for layer in model.layers
        if layer.name.startswith("block") and layer.name.endswith(".conv1")
    ]
    per_stage = len(first_convs) // (len(stage_pr) - 2)
    for index, layer in enumerate(first_convs):
        ratio = stage_pr[1 + index // per_stage]
        count = greg_pruned_count(ratio, layer.out_units)
        module = model.layer_module(layer.name)
        kernel = np.array(module.kernel[...])
        pruned = np.argsort(np.abs(kernel).sum(axis=(0, 1, 2)))[:count]
        kernel[..., pruned] = 0.0
        module.kernel[...] = jnp.asarray(kernel)
        norm = model.module_at(layer.norm)
        for variable in (norm.scale, norm.bias):
            values = np.asarray(variable[...]).copy()
            values[pruned] = 0.0
            variable[...] = jnp.asarray(values)


def time_chunk(run: Callable[[jax.Array], jax.Array], batches: jax.Array) -> float:
    """Seconds per batch over ``batches``."""
    started = time.perf_counter()
    for batch in batches:
        out = run(batch)
    jax.block_until_ready(out)
    return (time.perf_counter() - started) / len(batches)


def main(argv: list[str]) -> None:
    del argv
    spec = SYNTHETIC_LIKE[dataset_like(_MODEL.value)]
    model = build_zoo_model(_MODEL.value, rngs=nnx.Rngs(0), input_shape=spec.image_shape,
                            num_classes=spec.num_classes)
    prune_first_convs(model, [float(r) for r in _STAGE_PR.value])
    slims = {
        "slim": slim_model(model),
        f"slim, widths multiple of {_WIDTH_MULTIPLE.value}":
            slim_model(model, width_multiple=_WIDTH_MULTIPLE.value),
    }
    runs = {"masked": forward(model), **{name: forward(r.model) for name, r in slims.items()}}
    batches = jax.random.normal(jax.random.key(0), (_STEPS.value, _BATCH.value, *spec.image_shape))
    outputs = {name: run(batches[0]) for name, run in runs.items()}
    for name in slims:
        np.testing.assert_allclose(outputs[name], outputs["masked"], atol=1e-3, rtol=1e-3)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(_REPEATS.value):
        for name, run in runs.items():
            times[name].append(time_chunk(run, batches))
    per_second = {name: _BATCH.value / statistics.median(t) for name, t in times.items()}
    dense = next(iter(slims.values())).report
    print(f"model={_MODEL.value} batch={_BATCH.value} stage_pr={_STAGE_PR.value} "
          f"backend={jax.default_backend()} devices={jax.devices()}")
    print("| network | params | MFLOPs (MACs) / example | examples / s | speedup | "
          "FLOPs reduction | speedup / FLOPs reduction |")
    print("|---|---|---|---|---|---|---|")
    print(f"| masked | {dense.params_before:,.0f} | {dense.flops_before / 1e6:.1f} | "
          f"{per_second['masked']:.0f} | 1.00x | 1.00x | - |")
    for name, result in slims.items():
        report = result.report
        speedup = per_second[name] / per_second["masked"]
        print(f"| {name} | {report.params_after:,.0f} | {report.flops_after / 1e6:.1f} | "
              f"{per_second[name]:.0f} | {speedup:.2f}x | {report.flops_ratio:.2f}x | "
              f"{speedup / report.flops_ratio:.2f} |")


if __name__ == "__main__":
    app.run(main)
