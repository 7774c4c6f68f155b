"""Engine measurements: data-parallel throughput and the cost of checkpointing.

    python -m benchmarks.engine --model=lenet5 --method=l0_hc --batch_size=100

1. Examples per second of the training step on 1 and on 2 devices with the same global batch
   (on a CPU, forced host devices: ``--xla_force_host_platform_device_count``), each in a fresh
   process; median over repeats.
2. The time to save one checkpoint of the train state, as a percentage of the time of one
   epoch of training (60000 examples) at the measured step time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
from absl import app, flags, logging
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.data import load_dataset
from sparsejax.data.sources import ArraySource
from sparsejax.methods import RunInfo, create_method
from sparsejax.structure.traced_model import build_zoo_model
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.input import Input
from sparsejax.train.sharding import create_mesh, replicate
from sparsejax.train.state import init_state
from sparsejax.train.step import make_train_step

_MODEL = flags.DEFINE_string("model", "lenet5", "Model.")
_METHOD = flags.DEFINE_string("method", "l0_hc", "Method.")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 30, "Steps per timed repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
_DEVICES = flags.DEFINE_list("devices", ["1", "2"], "Device counts to compare.")
_WORKER = flags.DEFINE_bool("worker", False, "Measure in this process and print JSON.")
EPOCH_EXAMPLES = 60000


def measure() -> dict:
    """Seconds per step (median) and seconds per checkpoint save, in this process."""
    config = get_config()
    config.update(model=_MODEL.value, method=_METHOD.value)
    data = load_dataset("synthetic", num_train=_STEPS.value * _BATCH.value, num_test=_BATCH.value)
    run = RunInfo(num_train=EPOCH_EXAMPLES, steps_per_epoch=100)
    method = create_method(_METHOD.value, config, run)
    model = build_zoo_model(_MODEL.value, rngs=nnx.Rngs(0), gate_factory=method.make_gates)
    method_state = method.init(model)
    mesh = create_mesh()
    tx = method.optimizer()
    graphdef, state = init_state(model, method_state, tx, jax.random.key(0))
    state = replicate(state, mesh)
    inputs = Input(
        ArraySource(data), mesh, batch_size=_BATCH.value, eval_batch_size=_BATCH.value,
        steps_per_epoch=_STEPS.value,
    )
    train_step = make_train_step(graphdef, method, tx, mesh)
    batches = list(inputs.train_batches(0, _STEPS.value))
    state, metrics = train_step(state, *batches[0])
    jax.block_until_ready(metrics)
    step_seconds = []
    for _ in range(_REPEATS.value):
        started = time.perf_counter()
        for batch in batches:
            state, metrics = train_step(state, *batch)
        jax.block_until_ready(metrics)
        step_seconds.append((time.perf_counter() - started) / _STEPS.value)
    save_seconds = []
    with tempfile.TemporaryDirectory() as workdir:
        checkpointer = Checkpointer(workdir, max_to_keep=1)
        for repeat in range(_REPEATS.value):
            started = time.perf_counter()
            checkpointer.save(repeat + 1, state, {"epoch": repeat})
            save_seconds.append(time.perf_counter() - started)
        checkpointer.close()
    return {
        "devices": jax.device_count(),
        "step_seconds": statistics.median(step_seconds),
        "save_seconds": statistics.median(save_seconds),
    }


def run_worker(devices: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    args = [sys.executable, "-m", "benchmarks.engine", "--worker"] + [
        f"--{name}={flag.value}" for name, flag in
        (("model", _MODEL), ("method", _METHOD), ("batch_size", _BATCH), ("steps", _STEPS),
         ("repeats", _REPEATS))
    ]
    output = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.ERROR)
    if _WORKER.value:
        print(json.dumps(measure()))
        return
    results = [run_worker(int(n)) for n in _DEVICES.value]
    base = results[0]["step_seconds"]
    print(f"{_METHOD.value} {_MODEL.value}, global batch {_BATCH.value}, "
          f"backend {jax.default_backend()}")
    print("| devices | ms / step | examples / s | vs first | checkpoint save, % of epoch |")
    print("|---|---|---|---|---|")
    for r in results:
        epoch_seconds = r["step_seconds"] * EPOCH_EXAMPLES / _BATCH.value
        print(
            f"| {r['devices']} | {1000 * r['step_seconds']:.1f} "
            f"| {_BATCH.value / r['step_seconds']:.0f} | {base / r['step_seconds']:.2f}x "
            f"| {100 * r['save_seconds'] / epoch_seconds:.2f}% ({1000 * r['save_seconds']:.0f} ms) |"
        )


if __name__ == "__main__":
    app.run(main)
