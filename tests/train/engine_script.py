"""Runs engine pieces in a fresh process (device count set by the caller's environment) and
prints one JSON line; used by the multi-device tests."""

import json
import sys

import jax
import numpy as np
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.data import load_dataset
from sparsejax.data.sources import ArraySource
from sparsejax.methods import RunInfo, create_method
from sparsejax.structure.traced_model import build_zoo_model
from sparsejax.train import train_and_evaluate
from sparsejax.train.input import Input
from sparsejax.train.sharding import create_mesh, place_state
from sparsejax.train.state import init_state
from sparsejax.train.step import make_train_step


def small_config(**overrides):
    config = get_config()
    config.update(
        dataset="synthetic", model="mlp", method="dense", batch_size=64, num_train=512,
        num_test=128, eval_batch_size=64, epochs=1, log_every=4,
    )
    config.update(overrides)
    return config


def steps(method_name: str, count: int, per_example: bool, **overrides) -> dict:
    config = small_config(method=method_name, per_example_gates=per_example, **overrides)
    data = load_dataset("synthetic", num_train=512, num_test=128)
    run = RunInfo(num_train=data.num_train, steps_per_epoch=100)
    method = create_method(method_name, config, run)
    model = build_zoo_model("mlp", rngs=nnx.Rngs(params=0), gate_factory=method.make_gates)
    method_state = method.init(model)
    mesh = create_mesh(config.fsdp)
    tx = method.optimizer()
    graphdef, state = init_state(model, method_state, tx, jax.random.key(0))
    state = place_state(state, mesh)
    inputs = Input(ArraySource(data), mesh, batch_size=64, eval_batch_size=64, steps_per_epoch=8)
    train_step = make_train_step(graphdef, method, tx, mesh)
    losses = []
    for batch in inputs.train_batches(0, count):
        state, metrics = train_step(state, *batch)
        losses.append(float(metrics["loss"]))
    leaves = jax.tree.leaves(state.params)
    identical = all(
        np.array_equal(np.asarray(shard.data), np.asarray(first.data))
        for leaf in leaves
        for shard in leaf.addressable_shards
        for first in [next(s for s in leaf.addressable_shards if s.index == shard.index)]
    )
    replicas = min(
        sum(s.index == shard.index for s in leaf.addressable_shards)
        for leaf in leaves
        for shard in leaf.addressable_shards
    )
    return {
        "losses": losses,
        "identical": identical,
        "replicas": replicas,
        "params": layout(state.params),
        "opt_state": layout(state.opt_state),
    }


def layout(tree) -> list[dict]:
    """Each array leaf's global shape, the shape of every device's shard and the bytes of the
    shards on each device."""
    result = []
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        shards = leaf.addressable_shards
        result.append({
            "shape": list(leaf.shape),
            "shard_shapes": sorted({tuple(s.data.shape) for s in shards}),
            "devices": len(shards),
            "bytes_per_device": shards[0].data.nbytes,
            "bytes": leaf.nbytes,
        })
    return result


def run(workdir: str, epochs: int, **overrides) -> dict:
    return train_and_evaluate(small_config(epochs=epochs, **overrides), workdir)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "steps":
        overrides = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
        result = steps(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "per_example", **overrides)
    else:
        result = run(sys.argv[2], int(sys.argv[3]), **json.loads(sys.argv[4]))
    result["devices"] = jax.device_count()
    print("RESULT " + json.dumps(result))
