"""Where a training step's time goes on this machine: XLA's own per-op trace of the jitted step.

    python -m benchmarks.step_breakdown --model=lenet5 --batch_size=100 --methods=dense,l0_hc,l0_arm

Each method's step (that of ``benchmarks.step_time``: compiled, random batches already on the
device) is timed over ``repeats`` chunks of ``steps`` steps (median ms per step), then one more
chunk runs under ``jax.profiler``. XLA's CPU runtime records one trace event per executed op
(thunk) of the compiled HLO, named after the HLO instruction; the events of the chunk are summed
per instruction and divided by ``steps``. Each instruction is labelled from the optimized HLO
(``compile().as_text()``): the heaviest operation it contains (convolution, dot, reduce,
gather/scatter, random bits, else elementwise) and whether JAX's metadata places it in the
backward pass (``transpose(...)``). Three figures frame the ops:

- *op time summed*: the ops' durations added over XLA's threads (ops on different threads may
  overlap, so it can exceed the step);
- *no op running*: the step's wall time during which no op ran on any thread (dispatch, host
  work, waiting), from the union of the op intervals within the traced chunk;
- *trivial dispatch*: one call of a jitted function that takes the same state and batch and
  returns the state's step counter, i.e. the per-step cost of argument handling and dispatch.

The float32 matmul peak (a ``PEAK_SIZE``-square ``jnp.dot``) and the step's GFLOP/s (FLOPs as in
``benchmarks.torch_compare``: ``6 * dense MACs * batch``) are measured in the same run. For
LeNet-5, its pieces are also timed jitted alone (median of single calls): each convolution
forward and its kernel and input gradients at the step's shapes, the dense layers forward and
backward, max pooling with its gradient, and the Adam update of the network's parameters.

Caveat: an op that XLA's CPU runtime runs asynchronously on its Eigen thread pool (a convolution
it does not hand to YNNPACK) is recorded only for its launch; its work shows up under *no op
running*, and its time alone among the pieces.
"""

from __future__ import annotations

from sparsejax import host

host.configure()

import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.common import (  # noqa: E402
    PEAK_SIZE,
    dataset_like,
    matmul_peak,
    step_flops,
    step_parts,
)
from sparsejax.models.pooling import max_pool  # noqa: E402
from sparsejax.train.step import make_train_step  # noqa: E402


def define_flags() -> None:
    """The command line's flags; defined only when the module runs, so that importing its
    pieces (as the tests do, next to other benchmarks) defines no flag twice."""
    flags.DEFINE_string("model", "lenet5", "Model name.")
    flags.DEFINE_integer("batch_size", 100, "Batch size.")
    flags.DEFINE_list("methods", ["dense", "l0_hc", "l0_arm"], "Methods to profile.")
    flags.DEFINE_integer("steps", 20, "Steps per timed chunk.")
    flags.DEFINE_integer("repeats", 7, "Timed chunks per method (median reported).")
    flags.DEFINE_integer("top", 12, "Heaviest ops listed per method.")


KINDS = (
    ("convolution", "convolution"), ("dot", "dot"), ("gather", "gather/scatter"),
    ("scatter", "gather/scatter"), ("threefry", "random bits"), ("reduce", "reduce"),
)
"""(HLO opcode, label) in priority order: an instruction is labelled by the first it contains."""

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$")
COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def parse_hlo(text: str) -> dict[str, tuple[str, str, str]]:
    """Instruction name -> (label, pass, output shape) of an optimized HLO text.

    The label comes from the opcodes of the instruction and, recursively, of the computations it
    calls; fusions named after a transpose or copy are layout changes. The pass: a convolution or
    dot whose output has the dimensions of a parameter (in any order) is a weight gradient; else
    an instruction whose metadata (or that of what it calls) names ``transpose(...)`` belongs to
    the backward pass, one with other metadata to the forward pass ("?" without metadata)."""
    computations: dict[str, list[tuple[str, str, str, str]]] = {}
    current, entry_signature = None, ""
    for line in text.splitlines():
        if match := COMPUTATION.match(line):
            current = computations.setdefault(match.group(1), [])
            if line.startswith("ENTRY"):
                entry_signature = line
        elif current is not None and (match := INSTRUCTION.match(line)):
            current.append(match.groups())
    parameter_dims = {
        tuple(sorted(dims.split(",")))
        for name, dims in re.findall(r"([\w.]+): f32\[([\d,]+)\]", entry_signature)
        if "params" in name
    }

    def contents(rest: str, opcode: str, seen: frozenset = frozenset()) -> tuple[set, set]:
        found, op_names = {opcode}, set(re.findall(r'op_name="([^"]*)"', rest))
        if "threefry" in rest and opcode != "constant":  # XLA shares constants across ops
            found.add("threefry")
        for called in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest):
            if called not in seen:
                for _, _, inner, inner_rest in computations.get(called, []):
                    inner_found, inner_names = contents(inner_rest, inner, seen | {called})
                    found |= inner_found
                    op_names |= inner_names
        return found, op_names

    labels = {}
    for instructions in computations.values():
        for name, shape, opcode, rest in instructions:
            found, op_names = contents(rest, opcode)
            if "transpose" in name or name.startswith("copy"):
                label = "copy/transpose"
            else:
                label = next((label for op, label in KINDS if op in found), "elementwise")
            dims_text = re.sub(r"\{.*", "", shape).partition("[")[2].rstrip("]")
            dims = tuple(sorted(dims_text.split(",")))
            if label in ("convolution", "dot") and dims in parameter_dims:
                direction = "weight grad"
            elif any("transpose(" in op_name for op_name in op_names):
                direction = "backward"
            else:
                direction = "forward" if op_names else "?"
            labels[name] = (label, direction, shape.split("{")[0])
    return labels


def trace_ops(run, directory: str) -> tuple[dict[str, float], float]:
    """Seconds per op name summed over the chunk ``run`` runs under the profiler, and the
    seconds of the chunk in which no op ran."""
    jax.profiler.start_trace(directory)
    started = time.perf_counter()
    run()
    wall = time.perf_counter() - started
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{directory}/plugins/profile/*/*.trace.json.gz")
    events = json.load(gzip.open(path))["traceEvents"]
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
           and not e["name"].startswith("ThunkExecutor")]
    totals: dict[str, float] = collections.Counter()
    for event in ops:
        totals[event["args"]["hlo_op"]] += event["dur"] / 1e6
    busy, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in ops):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return totals, max(0.0, wall - busy / 1e6)


def median_seconds(call, repeats: int, divisor: int = 1) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``call``, divided by ``divisor``."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) / divisor)
    return statistics.median(times)


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def lenet5_pieces(batch: int) -> dict[str, tuple[float, object]]:
    """LeNet-5's pieces jitted alone at batch ``batch``: name -> (FLOPs or 0, call)."""
    keys = iter(jax.random.split(jax.random.key(0), 16))

    def normal(*shape: int) -> jax.Array:
        return jax.random.normal(next(keys), shape, jnp.float32)

    x1, k1 = normal(batch, 28, 28, 1), normal(5, 5, 1, 20)
    x2, k2 = normal(batch, 12, 12, 20), normal(5, 5, 20, 50)
    h, w1, w2 = normal(batch, 800), normal(800, 500), normal(500, 10)
    g1, g2, p = normal(batch, 24, 24, 20), normal(batch, 8, 8, 50), normal(batch, 24, 24, 20)
    conv1_macs, conv2_macs = batch * 24 * 24 * 20 * 25, batch * 8 * 8 * 50 * 500
    dense_macs = batch * (800 * 500 + 500 * 10)
    conv_kernel_grad = jax.jit(lambda x, k, g: jax.vjp(lambda k: _conv(x, k), k)[1](g)[0])
    conv_input_grad = jax.jit(lambda k, g: jax.vjp(lambda x: _conv(x, k), x2)[1](g)[0])
    conv = jax.jit(_conv)

    def dense_loss(w1: jax.Array, w2: jax.Array, h: jax.Array) -> jax.Array:
        return jnp.sum(jnp.maximum(h @ w1, 0) @ w2)

    dense_grad = jax.jit(jax.grad(dense_loss, argnums=(0, 1, 2)))
    pool = jax.jit(lambda p: jax.grad(lambda p: jnp.sum(max_pool(p) ** 2))(p))
    params = {"k1": k1, "b1": normal(20), "k2": k2, "b2": normal(50), "w1": w1,
              "c1": normal(500), "w2": w2, "c2": normal(10)}
    adam = optax.adam(1e-3)

    @jax.jit
    def adam_step(params, opt_state):
        updates, opt_state = adam.update(params, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = adam.init(params)
    return {
        "conv1 forward": (2 * conv1_macs, lambda: conv(x1, k1)),
        "conv1 kernel grad": (2 * conv1_macs, lambda: conv_kernel_grad(x1, k1, g1)),
        "conv2 forward": (2 * conv2_macs, lambda: conv(x2, k2)),
        "conv2 kernel grad": (2 * conv2_macs, lambda: conv_kernel_grad(x2, k2, g2)),
        "conv2 input grad": (2 * conv2_macs, lambda: conv_input_grad(k2, g2)),
        "fc1+fc2 forward and backward": (6 * dense_macs, lambda: dense_grad(w1, w2, h)),
        "max pool 24x24x20 forward and backward": (0, lambda: pool(p)),
        "adam update (LeNet-5 parameters)": (0, lambda: adam_step(params, opt_state)),
    }


def time_pieces(batch: int, repeats: int) -> None:
    """Print the median time and FLOP/s of each of :func:`lenet5_pieces`."""
    print("\n| piece, jitted alone | ms | GFLOP/s |")
    print("|---|---|---|")
    for name, (flops, call) in lenet5_pieces(batch).items():
        jax.block_until_ready(call())
        seconds = median_seconds(lambda: jax.block_until_ready(call()), repeats * 3)
        rate = f"{flops / seconds / 1e9:.1f}" if flops else "-"
        print(f"| {name} | {1000 * seconds:.2f} | {rate} |")


def main(argv: list[str]) -> None:
    del argv
    options = flags.FLAGS
    steps, batch, model_name = options.steps, options.batch_size, options.model
    flops = step_flops(model_name, batch)
    peak = matmul_peak()
    print(f"model={model_name} batch={batch} jax={jax.__version__} "
          f"devices={jax.devices()} float32 matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"({PEAK_SIZE}-square jnp.dot); step {flops / 1e9:.2f} GFLOP")
    if model_name == "lenet5":
        time_pieces(batch, options.repeats)
    like = dataset_like(model_name)
    for name in options.methods:
        parts = step_parts(name, model_name, batch, steps, like)
        train_step = make_train_step(parts.graphdef, parts.method, parts.tx, parts.mesh)
        state, batches = parts.state, parts.batches
        labels = parse_hlo(train_step.lower(state, *batches[0]).compile().as_text())
        state, metrics = train_step(state, *batches[0])
        jax.block_until_ready(metrics)
        trivial = jax.jit(lambda state, x, y: state.step)

        def run() -> None:
            nonlocal state
            for images, targets in batches:
                state, metrics = train_step(state, images, targets)
            jax.block_until_ready(metrics)

        def dispatch() -> None:
            for images, targets in batches:
                out = trivial(state, images, targets)
            jax.block_until_ready(out)

        dispatch()
        step = median_seconds(run, options.repeats, steps)
        dispatch_seconds = median_seconds(dispatch, options.repeats, steps)
        with tempfile.TemporaryDirectory() as directory:
            totals, idle = trace_ops(run, directory)
        per_op = {op: seconds / steps for op, seconds in totals.items()}
        summed = sum(per_op.values())
        print(f"\n{name}: {1000 * step:.2f} ms / step (median of {options.repeats} x {steps}), "
              f"{flops / step / 1e9:.1f} GFLOP/s = {flops / step / peak:.2f} of peak; "
              f"op time summed {1000 * summed:.2f} ms, no op running {1000 * idle / steps:.2f} "
              f"ms, trivial dispatch {1000 * dispatch_seconds:.3f} ms")
        by_kind: dict[tuple[str, str], float] = collections.Counter()
        for op, seconds in per_op.items():
            label, direction, _ = labels.get(op, ("unlabelled", "-", ""))
            by_kind[(label, direction)] += seconds
        print("| kind | pass | ms / step | share of op time |")
        print("|---|---|---|---|")
        for (label, direction), seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            print(f"| {label} | {direction} | {1000 * seconds:.2f} | {seconds / summed:.0%} |")
        print(f"\n| heaviest ops ({name}) | kind | pass | output | ms / step |")
        print("|---|---|---|---|---|")
        for op, seconds in sorted(per_op.items(), key=lambda kv: -kv[1])[:options.top]:
            label, direction, shape = labels.get(op, ("unlabelled", "-", ""))
            print(f"| {op} | {label} | {direction} | {shape} | {1000 * seconds:.2f} |")


if __name__ == "__main__":
    define_flags()
    app.run(main)
