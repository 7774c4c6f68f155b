import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.common import (
    DENSE_AND_LOSS_PASS,
    LOSS_PASS,
    dispatches,
    make_loss_passes,
    make_steps,
    step_flops,
    step_parts,
)
from sparsejax.models import batch_chunks
from sparsejax.train.step import make_train_step


def test_step_flops_follow_the_stated_convention():
    assert step_flops("lenet5", 100) == 6 * 100 * (
        24 * 24 * 25 * 20 + 8 * 8 * 25 * 20 * 50 + 800 * 500 + 500 * 10)
    assert step_flops("resnet20", 2) == 2 * step_flops("resnet20", 1)
    assert step_flops("lm_tiny", 2) is None


def test_a_conv_chunks_override_compiles_the_step_on_that_many_slices(monkeypatch):
    seen = []
    chosen = batch_chunks.batch_chunks

    def recording(batch, **options):
        seen.append(chosen(batch, **options))
        return seen[-1]

    def built_unseen(*args):  # building a traced model traces it on the whole batch
        built = step_parts(*args)
        seen.clear()
        return built

    monkeypatch.setattr(batch_chunks, "batch_chunks", recording)
    monkeypatch.setattr(common, "step_parts", built_unseen)
    for chunks in (3, 1):
        make_steps("l0_hc", "lenet5", 6, 1, "fashion_mnist", {"conv_chunks": chunks})()
        assert seen and set(seen) == {chunks}


def test_a_conv_columns_override_compiles_the_step_with_or_without_column_gradients(
    monkeypatch,
):
    seen = []
    chosen = batch_chunks.sliced_convolution

    def recording(*args):
        seen.append(args[-1])
        return chosen(*args)

    monkeypatch.setattr(batch_chunks, "sliced_convolution", recording)
    make_steps("l0_hc", "lenet5", 6, 1, "fashion_mnist", {"conv_chunks": 3, "conv_columns": 0})()
    assert not seen
    make_steps("l0_hc", "lenet5", 6, 1, "fashion_mnist", {"conv_chunks": 3, "conv_columns": 1})()
    assert seen == [3]  # conv2; conv1 pools on its slices (`Conv(then=...)`)


def test_a_plain_nnx_model_is_timed_and_counted_from_its_trace(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "examples"))
    assert step_flops("traced_model:small_vit", 2, "fashion_mnist") == 6 * 2 * (
        16 * 49 * 64 + 2 * (16 * (4 * 64 * 64 + 2 * 64 * 128) + 2 * 64 * 16 * 16) + 64 * 10)
    make_steps("dep_l0", "traced_model:small_cnn", 4, 1, "fashion_mnist")()


def test_steps_are_timed_as_a_run_dispatches_them():
    mlp = step_parts("l0_hc", "mlp", 4, 23, "fashion_mnist")
    shapes = [args[0].shape for _, args in dispatches(mlp)]
    assert shapes == [(10, 4, 28, 28, 1)] * 2 + [(4, 28, 28, 1)] * 3  # two scanned blocks
    single = step_parts("l0_hc", "mlp", 4, 3, "fashion_mnist", {"steps_per_dispatch": 1})
    assert [args[0].shape for _, args in dispatches(single)] == [(4, 28, 28, 1)] * 3
    lenet5 = step_parts("l0_hc", "lenet5", 4, 2, "fashion_mnist")
    assert lenet5.steps_per_dispatch == 1


def test_the_loss_pass_is_the_dense_steps_training_mode_loss_and_leaves_the_state_alone():
    parts = step_parts("dense", "resnet20", 4, 2, "cifar10")  # BatchNorm: train mode matters
    step = make_train_step(parts.graphdef, parts.method, parts.tx, parts.mesh)
    fresh = [jax.tree.map(jnp.copy, parts.state) for _ in parts.batches]  # the step donates
    stepped = [
        float(step(state, *batch)[1]["data_loss"]) for state, batch in zip(fresh, parts.batches)
    ]
    run = make_loss_passes("resnet20", 4, 2, "cifar10")
    first, again = [float(x) for x in run()], [float(x) for x in run()]
    np.testing.assert_allclose(first, stepped, rtol=1e-5)
    assert first == again
    assert first[0] != first[1]


def test_step_time_adds_the_loss_pass_to_the_dense_step():
    command = [sys.executable, "-m", "benchmarks.step_time", "--model=mlp", "--batch_size=64",
               "--methods=dense,l0_arm", "--steps=2", "--repeats=1", "--loss_pass", "--peak"]
    output = subprocess.run(command, capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[2]).stdout
    rows = re.findall(r"^\| ([a-z0-9_ +]+) \| ([0-9.]+) \|.*\| ([0-9.]+) \| [0-9.]+ \|$",
                      output, re.MULTILINE)
    milliseconds = {name: float(ms) for name, ms, _ in rows}
    gigaflops = {name: float(rate) * float(ms) for name, ms, rate in rows}  # 1e6 FLOPs
    total = milliseconds["dense"] + milliseconds[LOSS_PASS]
    assert abs(milliseconds[DENSE_AND_LOSS_PASS] - total) <= 0.016  # 3 roundings
    ratio = milliseconds["l0_arm"] / milliseconds[DENSE_AND_LOSS_PASS]
    line = re.search(rf"step time vs {re.escape(DENSE_AND_LOSS_PASS)}: (.*)", output).group(1)
    assert abs(float(re.search(r"l0_arm ([0-9.]+)x", line).group(1)) - ratio) <= 0.02
    # a forward pass is a third of a training step's FLOPs (2 and 6 per multiply-accumulate)
    assert abs(gigaflops[LOSS_PASS] / gigaflops["dense"] - 1 / 3) < 0.02
    assert abs(gigaflops[DENSE_AND_LOSS_PASS] / gigaflops["dense"] - 4 / 3) < 0.02
    assert abs(gigaflops["l0_arm"] / gigaflops["dense"] - 1) < 0.02  # model FLOPs: dense step's
