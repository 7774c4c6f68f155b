"""Inference speed of a slimmed network against the masked network it came from.

    python -m benchmarks.slim_inference --model=resnet56 --batch_size=256

The masked network is the dense zoo model, gated from its trace with one slot per removable
group, whose pruned filters are zero: the filters GReg's rules pick at ``--stage_pr`` = [stem,
stage 1, ..., fc] (the GReg ResNet-56 setting [0, 0.75, 0.75, 0.32, 0] by default: the first
convolution of every residual block), the lowest by GReg's score (mean |w|), zeroed with every
member of their unit (kernel slice, BatchNorm entries, the next layer's rows). Both networks'
eval-mode forward passes are jitted, compiled, then timed alternately over ``--repeats`` chunks
of ``--steps`` batches already on the device, so that both ratios come from the same run; the
table gives the median examples per second, the wall-clock speedup, the FLOPs reduction (the
slim report's, from the trace) and their quotient (the target is >= 0.7 on CPU), for the
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
from experiments.configs.cifar import get_config
from sparsejax.data.synthetic import SYNTHETIC_LIKE
from sparsejax.methods import RunInfo, create_method
from sparsejax.methods.greg.schedule import smallest
from sparsejax.methods.slot_groups import unit_mean_magnitudes
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure.traced_model import TracedModel, build_zoo_model

_MODEL = flags.DEFINE_string("model", "resnet56", "A zoo model whose filters GReg can prune.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Batch size.")
_STAGE_PR = flags.DEFINE_list("stage_pr", ["0", "0.75", "0.75", "0.32", "0"],
                              "GReg's pruning ratios: stem, one per stage, fc.")
_STEPS = flags.DEFINE_integer("steps", 3, "Batches per timed chunk.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed chunks per network (median reported).")
_WIDTH_MULTIPLE = flags.DEFINE_integer(
    "width_multiple", 8, "Also time the slim network with widths rounded up to this multiple."
)


def prune_lowest_filters(model: TracedModel, name: str, stage_pr: tuple[float, ...]) -> None:
    """Zero, in place, the filters GReg prunes on zoo model ``name`` at ``stage_pr`` (its rules
    pick the units, the lowest by its score go), with every member of their units."""
    config = get_config("greg1")
    config.update(model=name, stage_pr=stage_pr, pretrain_epochs=0)
    method = create_method("greg1", config, RunInfo(num_train=1))
    slots = {slot.name: slot for slot in model.gate_slots}
    for layer in method.pruned_layers(model):
        slot = slots[layer.name]
        pruned = smallest(unit_mean_magnitudes(model, slot), layer.count)
        model.scale_units(slot, (~pruned).astype(jnp.float32))


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
                            num_classes=spec.num_classes, use_placements=False)
    prune_lowest_filters(model, _MODEL.value, tuple(float(r) for r in _STAGE_PR.value))
    batches = jax.random.normal(jax.random.key(0), (_STEPS.value, _BATCH.value, *spec.image_shape))
    check = np.asarray(batches[0])
    slims = {
        "slim": slim_traced_model(model, check),
        f"slim, widths multiple of {_WIDTH_MULTIPLE.value}":
            slim_traced_model(model, check, round_to=_WIDTH_MULTIPLE.value),
    }
    for name, slim in slims.items():
        difference = slim.report.max_logit_difference
        if not difference < 1e-3:
            raise AssertionError(f"{name}: the slim logits differ from the masked ones by "
                                 f"{difference}")
    runs = {"masked": forward(model), **slims}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        jax.block_until_ready(run(batches[0]))  # compiled before timing
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
    for name, slim in slims.items():
        report = slim.report
        speedup = per_second[name] / per_second["masked"]
        print(f"| {name} | {report.params_after:,.0f} | {report.flops_after / 1e6:.1f} | "
              f"{per_second[name]:.0f} | {speedup:.2f}x | {report.flops_ratio:.2f}x | "
              f"{speedup / report.flops_ratio:.2f} |")


if __name__ == "__main__":
    app.run(main)
