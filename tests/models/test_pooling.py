import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.models.pooling import max_pool


@pytest.mark.parametrize("shape,size", [((3, 8, 6, 4), 2), ((2, 7, 9, 3), 2), ((2, 9, 10, 5), 3)])
def test_values_and_gradients_equal_reduce_window_with_ties(shape, size):
    x = jnp.round(jax.random.normal(jax.random.key(0), shape))
    x = jnp.maximum(x, 0.0)
    x = x.at[0, :size, :size, 0].set(1.0)

    def reference(x):
        return nnx.max_pool(x, (size, size), strides=(size, size))

    g = jax.random.normal(jax.random.key(1), reference(x).shape)
    np.testing.assert_array_equal(max_pool(x, size), reference(x))
    got = jax.grad(lambda x: jnp.sum(max_pool(x, size) * g))(x)
    want = jax.grad(lambda x: jnp.sum(reference(x) * g))(x)
    np.testing.assert_array_equal(got, want)


def test_jit_and_second_window_position():
    x = jnp.zeros((1, 2, 2, 1)).at[0, 1, 0, 0].set(2.0)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(max_pool(x))))(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[0.0, 0.0], [1.0, 0.0]])
