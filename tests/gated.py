"""Gate factories and trained-looking state for the tests of gated models."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.gates.scale import ScaleGate
from sparsejax.models.base import each_slot


@each_slot
def scale_gates(slot, rngs):
    """Scale gates (no noise, all 1 until a test sets them), one per slot."""
    return ScaleGate(slot.shape)


def randomize_batch_norms(model: nnx.Module, rng: np.random.Generator) -> None:
    """Nontrivial scale, bias and running statistics in every BatchNorm, as after training."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm):
            n = node.num_features
            node.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
            node.bias[...] = jnp.asarray(rng.normal(0, 0.2, n), jnp.float32)
            node.mean[...] = jnp.asarray(rng.normal(0, 0.3, n), jnp.float32)
            node.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
