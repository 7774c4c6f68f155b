"""Memory per device of the parameters and optimizer state (Adam: two moments) under FSDP,
computed from the shard shapes of :func:`sparsejax.train.sharding.leaf_sharding` on a mesh of 8
devices (forced CPU devices are enough: nothing is run).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python3 -m benchmarks.fsdp_memory
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.methods import RunInfo, create_method
from sparsejax.structure.traced_model import build_zoo_model
from sparsejax.train.sharding import create_mesh, leaf_sharding
from sparsejax.train.state import init_state

MODELS = {
    "mlp": {"input_shape": (28, 28, 1), "num_classes": 10},
    "vit_tiny": {"input_shape": (28, 28, 1), "num_classes": 10},
    "lm_tiny": {},
}


def per_device_bytes(tree, mesh) -> int:
    """Bytes of ``tree``'s leaves on one device, each leaf placed by ``leaf_sharding``."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = np.shape(leaf)
        shard = leaf_sharding(shape, mesh).shard_shape(shape)
        total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return total


def main() -> None:
    config = get_config()
    config.method = "dense"
    config.optimizer = "adam"
    method = create_method("dense", config, RunInfo(num_train=60000, steps_per_epoch=100))
    sizes = [f for f in (1, 2, 4, 8) if jax.device_count() % f == 0]
    print("| model | params+opt (MB, replicated) | " + " | ".join(f"fsdp={f}" for f in sizes[1:]))
    for name, options in MODELS.items():
        model = build_zoo_model(name, rngs=nnx.Rngs(0), gate_factory=method.make_gates, **options)
        _, state = init_state(model, method.init(model), method.optimizer(), jax.random.key(0))
        tree = (state.params, state.opt_state)
        row = [per_device_bytes(tree, create_mesh(f)) / 2**20 for f in sizes]
        cells = " | ".join(f"{mb:.3f} ({row[0] / mb:.2f}x less)" for mb in row[1:])
        print(f"| {name} | {row[0]:.3f} | {cells}")


if __name__ == "__main__":
    main()
