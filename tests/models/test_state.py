import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.models.state import without_state_updates


def test_without_state_updates_returns_the_new_state_and_restores_the_old():
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    x = jnp.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    output, after = without_state_updates(bn, lambda m: m(x, use_running_average=False))
    assert output.shape == (2, 3)
    np.testing.assert_array_equal(bn.mean[...], np.zeros(3))
    np.testing.assert_allclose(after["mean"][...], 0.01 * np.array([2.0, 3.0, 4.0]), rtol=1e-6)
    nnx.update(bn, after)
    np.testing.assert_allclose(bn.mean[...], 0.01 * np.array([2.0, 3.0, 4.0]), rtol=1e-6)
