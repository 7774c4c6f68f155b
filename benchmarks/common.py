"""Pieces shared by the benchmarks: timing one method's jitted training step."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from experiments.configs import lm as lm_config
from experiments.configs.mnist import get_config
from sparsejax.data.synthetic import SYNTHETIC_LIKE, ImageSpec
from sparsejax.data.text import DEFAULT_SEQ_LEN, TEXT_DATASETS
from sparsejax.methods import Method, RunInfo, create_method
from sparsejax.methods.base import cross_entropy
from sparsejax.models.batch_chunks import column_gradients, fixed_chunks
from sparsejax.structure.accounting import count_network
from sparsejax.structure.traced_model import build_any_model
from sparsejax.train.config import resolve_config
from sparsejax.train.dispatch import dispatch_counts, model_steps_per_dispatch
from sparsejax.train.sharding import batch_sharded, block_sharded, create_mesh, replicate
from sparsejax.train.state import init_state, merge_model
from sparsejax.train.step import make_train_step

IMAGENET_MODELS = ("resnet34", "resnet50", "mobilenet_v2")
MNIST_MODELS = ("mlp", "lenet5", "vit_tiny")
TEXT_MODELS = ("lm_tiny",)
BYTE_VOCABULARY = 256
PEAK_SIZE = 2048
"""The side of the square float32 ``jnp.dot`` whose rate is the machine's matmul peak."""
STEP_FLOPS_PER_MAC = 6
"""FLOPs of a training step per multiply-accumulate of the dense forward pass: forward, input
gradient and weight gradient, 2 FLOPs per multiply-accumulate each."""
FORWARD_FLOPS_PER_MAC = 2
"""FLOPs of a forward pass per multiply-accumulate."""
CONV_CHUNKS_OVERRIDE = "conv_chunks"
"""The method-spec field (``dense@conv_chunks=1``) that sets the batch slices of the step's
convolutions instead of a config field."""
CONV_COLUMNS_OVERRIDE = "conv_columns"
"""The method-spec field (``dense@conv_columns=0``) that turns the column input gradients of the
sliced convolutions off (0) or on (1) instead of a config field."""
LOSS_PASS = "loss pass"
"""The row of the dense training-mode loss alone (:func:`make_loss_passes`)."""
DENSE_AND_LOSS_PASS = "dense + loss pass"
"""The row of a dense step plus the loss pass."""
STEPS_PER_DISPATCH = "steps_per_dispatch"
"""The config field (``dense@steps_per_dispatch=1``) of the steps each dispatch runs, given as
a count."""


def dataset_like(model_name: str) -> str:
    """The dataset whose shapes ``model_name`` is usually trained on."""
    if model_name in MNIST_MODELS:
        return "fashion_mnist"
    if model_name in TEXT_MODELS:
        return "python_docs"
    return "imagenet2012" if model_name in IMAGENET_MODELS else "cifar10"


def input_spec(like: str) -> ImageSpec:
    """The example shape and classes of dataset ``like``: byte sequences of the default length
    (inputs and targets both ``(seq_len,)``, 256 classes) for a text dataset."""
    if like in TEXT_DATASETS:
        return ImageSpec((DEFAULT_SEQ_LEN,), BYTE_VOCABULARY)
    return SYNTHETIC_LIKE[like]


def parse_method(spec: str) -> tuple[str, dict[str, float]]:
    """``NAME`` or ``NAME@FIELD=VALUE@...`` (e.g. ``l0_hc@target_flops=0.5``): the method and
    the numeric config fields its run overrides."""
    name, *settings = spec.split("@")
    overrides = {}
    for setting in settings:
        field, _, value = setting.partition("=")
        overrides[field] = float(value)
    return name, overrides


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What a benchmark's training step is built from: the split model, method, optimizer,
    mesh, the initial state (replicated) and random batches already on the devices."""

    graphdef: nnx.GraphDef
    method: Method
    tx: optax.GradientTransformation
    mesh: Mesh
    state: Any
    batches: list[tuple[jax.Array, jax.Array]]
    steps_per_dispatch: int
    """The run's ``steps_per_dispatch`` for this model and config
    (:mod:`sparsejax.train.dispatch`)."""


def step_parts(
    name: str,
    model_name: str,
    batch_size: int,
    steps: int,
    like: str,
    overrides: Mapping[str, Any] | None = None,
) -> StepParts:
    """The pieces of method ``name``'s training step on ``model_name`` and ``steps`` random
    batches, sharded over the devices, shaped like dataset ``like`` (random bytes with random
    next-byte targets for a text dataset). The config is the MNIST one (the LM one for text)
    with ``overrides``, resolved as a training run's."""
    text = like in TEXT_DATASETS
    config = lm_config.get_config(name) if text else get_config(name)
    config.method, config.model = name, model_name
    config.update(dict(overrides or {}))
    _, config = resolve_config(config)
    spec = input_spec(like)
    num_train = 60000
    method = create_method(name, config, RunInfo(num_train=num_train, steps_per_epoch=100))
    model = build_any_model(
        model_name, rngs=nnx.Rngs(0), gate_factory=method.make_gates,
        input_shape=spec.image_shape, num_classes=spec.num_classes,
    )
    input_dtype = jnp.int32 if text else jnp.float32
    example = jax.ShapeDtypeStruct((batch_size, *spec.image_shape), input_dtype)
    steps_per_dispatch = model_steps_per_dispatch(config.steps_per_dispatch, model, example)
    method_state = method.init(model)
    tx = method.optimizer()
    mesh = create_mesh()
    graphdef, state = init_state(model, method_state, tx, jax.random.key(0))
    state = replicate(state, mesh)
    if text:
        shape = (steps, batch_size, *spec.image_shape)
        images = jax.random.randint(jax.random.key(1), shape, 0, spec.num_classes)
        labels = jax.random.randint(jax.random.key(2), shape, 0, spec.num_classes)
    else:
        images = jax.random.uniform(jax.random.key(1), (steps, batch_size, *spec.image_shape))
        labels = jnp.arange(steps * batch_size, dtype=jnp.int32).reshape(steps, batch_size)
        labels = labels % spec.num_classes
    sharding = batch_sharded(mesh)
    batches = [jax.device_put((images[index], labels[index]), sharding) for index in range(steps)]
    return StepParts(graphdef, method, tx, mesh, state, batches, steps_per_dispatch)


def dispatches(parts: StepParts) -> list[tuple[Callable[..., Any], tuple[jax.Array, ...]]]:
    """The batches of ``parts`` as a training run dispatches them: each jitted program with its
    arguments after the state, blocks of ``steps_per_dispatch`` stacked batches in a scanned
    program (:func:`~sparsejax.train.dispatch.dispatch_counts`), the rest single steps."""
    programs = {
        stacked: make_train_step(
            parts.graphdef, parts.method, parts.tx, parts.mesh, stacked=stacked
        )
        for stacked in (False, True)
    }
    sharding = block_sharded(parts.mesh)
    calls, first = [], 0
    for count in dispatch_counts(0, len(parts.batches), parts.steps_per_dispatch):
        block = parts.batches[first : first + count]
        first += count
        if count == 1:
            calls.append((programs[False], block[0]))
        else:
            stacked = tuple(jax.device_put(jnp.stack(field), sharding) for field in zip(*block))
            calls.append((programs[True], stacked))
    return calls


def make_steps(
    name: str,
    model_name: str,
    batch_size: int,
    steps: int,
    like: str,
    overrides: Mapping[str, Any] | None = None,
) -> Callable[[], None]:
    """A function that runs ``steps`` training steps of method ``name`` (compiled, on the
    batches of :func:`step_parts`), dispatched as a training run dispatches them
    (:func:`dispatches`; ``NAME@steps_per_dispatch=1`` times one step per dispatch), and waits
    for the last.

    The overrides ``conv_chunks=N`` and ``conv_columns=0|1`` are not config fields: the step is
    compiled with its convolutions on ``N`` slices of the batch
    (:func:`sparsejax.models.batch_chunks.fixed_chunks`), and with the sliced convolutions'
    input gradients by columns or XLA's (:func:`~sparsejax.models.batch_chunks.column_gradients`),
    so that one run can time a step with and without each."""
    overrides = dict(overrides or {})
    chunks = overrides.pop(CONV_CHUNKS_OVERRIDE, None)
    columns = overrides.pop(CONV_COLUMNS_OVERRIDE, None)
    if STEPS_PER_DISPATCH in overrides:
        overrides[STEPS_PER_DISPATCH] = int(overrides[STEPS_PER_DISPATCH])
    parts = step_parts(name, model_name, batch_size, steps, like, overrides)
    calls = dispatches(parts)
    state = parts.state
    with contextlib.ExitStack() as settings:
        if chunks is not None:
            settings.enter_context(fixed_chunks(int(chunks)))
        if columns is not None:
            settings.enter_context(column_gradients(bool(columns)))
        compiled = set()
        for program, arguments in calls:
            if id(program) not in compiled:
                compiled.add(id(program))
                state, metrics = program(state, *arguments)
    jax.block_until_ready(metrics)

    def run() -> None:
        nonlocal state
        for program, arguments in calls:
            state, metrics = program(state, *arguments)
        jax.block_until_ready(metrics)

    return run


def make_loss_passes(
    model_name: str, batch_size: int, steps: int, like: str
) -> Callable[[], list[jax.Array]]:
    """A function that evaluates the dense network's training-mode loss (BatchNorm on batch
    statistics, no gradient, the state unchanged) on each of the ``steps`` batches of
    :func:`step_parts`, one jitted call per batch, and returns the losses once computed.

    This is the one extra network evaluation per step that the ARM estimator makes (its
    antithetic pass, :func:`sparsejax.methods.l0_arm.binary_gate_data_loss`), so a dense step
    plus this pass is what an ``l0_arm`` step costs when none of that pass runs beside the rest
    of the step."""
    parts = step_parts("dense", model_name, batch_size, steps, like)
    graphdef, state = parts.graphdef, parts.state

    @jax.jit
    def loss(params: Any, model_state: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
        model = merge_model(graphdef, params, model_state)
        return jnp.mean(cross_entropy(model(images, train=True), labels))

    def run() -> list[jax.Array]:
        losses = [loss(state.params, state.model_state, *batch) for batch in parts.batches]
        return jax.block_until_ready(losses)

    run()
    return run


def forward(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
    """The jitted eval-mode forward pass of ``model``."""
    graphdef, state = nnx.split(model)
    apply = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, train=False))
    return lambda x: apply(state, x)


def matmul_peak() -> float:
    """FLOP/s of a float32 ``PEAK_SIZE``-square ``jnp.dot`` at JAX's default precision on the
    default backend (median of 5 calls)."""
    a = jax.random.normal(jax.random.key(0), (PEAK_SIZE, PEAK_SIZE), jnp.float32)
    dot = jax.jit(jnp.dot)

    def run() -> None:
        dot(a, a).block_until_ready()

    run()
    return 2 * PEAK_SIZE**3 / statistics.median(seconds_per_step(run, 1) for _ in range(5))


def step_flops(model_name: str, batch_size: int, like: str | None = None) -> float | None:
    """FLOPs of one training step of the dense network on inputs shaped like dataset ``like``
    (default: the model's usual one): ``STEP_FLOPS_PER_MAC`` x the forward pass's
    multiply-accumulates of its layers and activation products (attention's ``Q K^T`` and
    ``A V``; :func:`sparsejax.structure.accounting.count_network`) x ``batch_size``; gates,
    normalisation, pooling, activations and the optimizer are not counted, and the first
    layer's unneeded input gradient is. None for a text model."""
    like = like or dataset_like(model_name)
    if like in TEXT_DATASETS:
        return None
    spec = input_spec(like)
    model = build_any_model(
        model_name, rngs=nnx.Rngs(0), input_shape=spec.image_shape, num_classes=spec.num_classes
    )
    macs = count_network(model.layers, {}, model.activation_products)["flops"]
    return STEP_FLOPS_PER_MAC * float(macs) * batch_size


def seconds_per_step(run: Callable[[], None], steps: int) -> float:
    """Wall-clock seconds per step of one call of ``run`` (which runs ``steps`` steps)."""
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) / steps


def interleaved_medians(
    runs: Mapping[str, Callable[[], Any]], repeats: int, divisor: int = 1
) -> dict[str, float]:
    """Median wall-clock seconds of each run / ``divisor``, the runs called in turn ``repeats``
    times (round robin), so that a change in the machine's load touches every run alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - started) / divisor)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def time_method(
    name: str, model_name: str, batch_size: int, steps: int, repeats: int, like: str
) -> float:
    """Median seconds per training step of ``name``."""
    run = make_steps(name, model_name, batch_size, steps, like)
    return statistics.median(seconds_per_step(run, steps) for _ in range(repeats))
