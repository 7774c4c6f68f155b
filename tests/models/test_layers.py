import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.gates.apply import gate_units
from sparsejax.models.layers import Dense


def test_folded_output_gates_compute_the_gated_output_and_its_gradients():
    dense = Dense(3, 4, rngs=nnx.Rngs(0))
    dense.bias[...] = jax.random.normal(jax.random.key(2), (4,))
    x = jax.random.normal(jax.random.key(1), (2, 3))
    z = jnp.array([0.0, 0.3, 1.0, 0.7])

    graphdef, params = nnx.split(dense)

    def loss(params, z, folded):
        model = nnx.merge(graphdef, params)
        y = model(x, output_gate=z) if folded else gate_units(model(x), z)
        return jnp.sum(jnp.sin(y))

    out = dense(x, output_gate=z)
    assert np.all(out[..., 0] == 0.0)
    np.testing.assert_allclose(out, gate_units(dense(x), z), rtol=1e-5, atol=1e-6)
    got = jax.tree.leaves(jax.grad(loss, argnums=(0, 1))(params, z, True))
    want = jax.tree.leaves(jax.grad(loss, argnums=(0, 1))(params, z, False))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_per_example_output_gates_multiply_the_outputs():
    dense = Dense(3, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3))
    z = jax.random.uniform(jax.random.key(3), (2, 4))
    np.testing.assert_array_equal(dense(x, output_gate=z), gate_units(dense(x), z))
