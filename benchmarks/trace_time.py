"""Time to find the prunable structure of every zoo model from its computation.

    python -m benchmarks.trace_time --repeats=3

Each model of the registry is built on shapes only (``nnx.eval_shape``) at unit granularity and
traced in evaluation mode by :func:`sparsejax.structure.trace.trace_structure` on one example
of its dataset's shape (ResNet-34/50 and MobileNetV2 at 224 x 224, the ImageNet size, unless
``--imagenet_size`` says otherwise; ``lm_tiny`` on a sequence of byte ids). The table gives
the median wall-clock seconds of ``--repeats`` traces (the jaxpr is made anew each time) with
the groups found and the dense params and FLOPs of the trace.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from benchmarks.common import dataset_like, input_spec
from sparsejax.data.text import TEXT_DATASETS
from sparsejax.models import MODELS, build_model
from sparsejax.structure.trace import TracedStructure, trace_structure


def define_flags() -> None:
    """The command line's flags; defined only when the module runs, so that importing its
    pieces (as the tests do, next to other benchmarks) defines no flag twice."""
    flags.DEFINE_list("models", sorted(MODELS), "Zoo models to trace.")
    flags.DEFINE_integer("repeats", 3, "Traces per model (median reported).")
    flags.DEFINE_integer("imagenet_size", 224, "Image side of the ImageNet models.")


def input_shape(name: str, imagenet_size: int) -> tuple[int, ...]:
    """One example's shape for model ``name``: its dataset's, the ImageNet side replaced."""
    like = dataset_like(name)
    shape = input_spec(like).image_shape
    return (imagenet_size, imagenet_size, shape[-1]) if like == "imagenet2012" else shape


def trace_once(name: str, shape: tuple[int, ...]) -> tuple[float, TracedStructure]:
    """Seconds to trace zoo model ``name``'s plain network (built on shapes only, with its
    dataset's classes, in evaluation mode) on one example of ``shape``, and the structure
    found."""
    classes = input_spec(dataset_like(name)).num_classes
    model = nnx.eval_shape(
        lambda: build_model(name, rngs=nnx.Rngs(0), num_classes=classes, input_shape=shape)
    )
    dtype = jnp.int32 if dataset_like(name) in TEXT_DATASETS else jnp.float32
    example = jax.ShapeDtypeStruct((1, *shape), dtype)
    model.eval()  # BatchNorm on its running statistics
    started = time.perf_counter()
    structure = trace_structure(model, example)
    return time.perf_counter() - started, structure


def main(argv: list[str]) -> None:
    del argv
    print("| model | input | seconds (median) | groups (prunable) | params | FLOPs (MACs) |")
    print("|---|---|---|---|---|---|")
    options = flags.FLAGS
    for name in options.models:
        shape = input_shape(name, options.imagenet_size)
        runs = [trace_once(name, shape) for _ in range(options.repeats)]
        structure = runs[-1][1]
        prunable = sum(group.prunable for group in structure.groups)
        counts = structure.count()
        seconds = statistics.median(seconds for seconds, _ in runs)
        print(f"| {name} | {'x'.join(map(str, shape))} | {seconds:.2f} | "
              f"{len(structure.groups)} ({prunable}) | {counts.params:,.0f} | "
              f"{counts.flops:,.0f} |", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
