"""Tests for sparsejax.estimators.binary (ARM / AR gradients of binary gates)."""

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.estimators import binary

NUM_MC_KEYS = 200_000
NUM_STANDARD_ERRORS = 5.0
ABS_TOL = 1e-4
K = 7.0
WEIGHTS = jnp.array([0.7, -0.4, 1.1, 0.5])
# Inside the linear region of the hard sigmoid at k = 7: pi = [0.3, 0.65, 0.6, 0.4].
PHI = jnp.array([-0.2, 0.15, 0.1, -0.1])
TARGETS = jnp.array([1.3, 0.2, -0.5])


def nonlinear_f(z: jax.Array, weights: jax.Array = WEIGHTS, target: float = 1.3) -> jax.Array:
    return (z @ weights - target) ** 2 + jnp.sin(3.0 * z[..., 0] * z[..., 1])


def exact_expectation(f: Callable[[jax.Array], jax.Array], pi: jax.Array) -> jax.Array:
    """E[f(z)] for independent z_i ~ Bernoulli(pi_i), by enumerating all 2^n settings."""
    settings = jnp.array(list(itertools.product([0.0, 1.0], repeat=pi.shape[-1])))
    probabilities = jnp.prod(jnp.where(settings == 1.0, pi, 1.0 - pi), axis=-1)
    return probabilities @ jax.vmap(f)(settings)


def exact_gradient(
    f: Callable[[jax.Array], jax.Array], phi: jax.Array, gate_fn: str
) -> np.ndarray:
    def expected_f(p):
        return exact_expectation(f, binary.gate_probability(p, gate_fn=gate_fn, k=K))

    return np.asarray(jax.grad(expected_f)(phi), dtype=np.float64)


def monte_carlo_gradients(loss, phi, num_keys: int = NUM_MC_KEYS, seed: int = 0):
    """Per-key gradients of loss(phi, key) in phi, stacked along a leading axis."""
    keys = jax.random.split(jax.random.key(seed), num_keys)
    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(phi, keys)
    return jax.tree_util.tree_map(lambda g: np.asarray(g, dtype=np.float64), grads)


def mean_and_standard_error(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return samples.mean(axis=0), samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])


def assert_matches_exact(samples: np.ndarray, exact: np.ndarray) -> None:
    mean, standard_error = mean_and_standard_error(samples)
    np.testing.assert_array_less(
        np.abs(mean - exact), NUM_STANDARD_ERRORS * standard_error + ABS_TOL
    )


@pytest.mark.parametrize("gate_fn", binary.GATE_FNS)
@pytest.mark.parametrize("estimator", binary.ESTIMATORS)
def test_gradient_matches_exact_enumeration(estimator, gate_fn):
    def loss(phi, key):
        return binary.expectation(
            nonlinear_f, phi, key, estimator=estimator, gate_fn=gate_fn, k=K
        )

    pi = binary.gate_probability(PHI, gate_fn=gate_fn, k=K)
    assert bool(jnp.all((pi > 0.05) & (pi < 0.95)))
    exact = exact_gradient(nonlinear_f, PHI, gate_fn)
    assert np.all(np.abs(exact) > 0.1)
    assert_matches_exact(monte_carlo_gradients(loss, PHI), exact)


def test_reference_k_scaling_for_hard_sigmoid_is_detectably_biased():
    def loss(phi, key):
        return binary.expectation(nonlinear_f, phi, key, gate_fn="hard_sigmoid", k=K)

    pi = np.asarray(binary.gate_probability(PHI, gate_fn="hard_sigmoid", k=K), dtype=np.float64)
    reference_scaled = monte_carlo_gradients(loss, PHI) * 7.0 * pi * (1.0 - pi)
    mean, standard_error = mean_and_standard_error(reference_scaled)
    exact = exact_gradient(nonlinear_f, PHI, "hard_sigmoid")
    assert np.any(np.abs(mean - exact) > NUM_STANDARD_ERRORS * standard_error + ABS_TOL)


@pytest.mark.parametrize("estimator", binary.ESTIMATORS)
def test_value_is_unbiased_for_expectation(estimator):
    keys = jax.random.split(jax.random.key(1), NUM_MC_KEYS)
    values = jax.jit(
        jax.vmap(lambda key: binary.expectation(nonlinear_f, PHI, key, estimator=estimator))
    )(keys)
    mean, standard_error = mean_and_standard_error(np.asarray(values, dtype=np.float64))
    exact = float(exact_expectation(nonlinear_f, binary.gate_probability(PHI, k=K)))
    assert abs(mean - exact) < NUM_STANDARD_ERRORS * standard_error + ABS_TOL


@pytest.mark.parametrize("estimator", binary.ESTIMATORS)
def test_saturated_hard_sigmoid_gates_get_zero_gradient(estimator):
    phi = jnp.array([-1.0, 0.1, 2.0, 0.5])
    pi = binary.gate_probability(phi, gate_fn="hard_sigmoid", k=K)
    np.testing.assert_array_equal(np.asarray(pi)[[0, 2, 3]], [0.0, 1.0, 1.0])

    def loss(p, key):
        return binary.expectation(
            nonlinear_f, p, key, estimator=estimator, gate_fn="hard_sigmoid", k=K
        )

    grads = monte_carlo_gradients(loss, phi, num_keys=2_000)
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(grads[:, [0, 2, 3]], 0.0)
    assert np.any(grads[:, 1] != 0.0)
    np.testing.assert_array_equal(exact_gradient(nonlinear_f, phi, "hard_sigmoid")[[0, 2]], 0.0)


def test_logit_derivative_closed_forms():
    phi = jnp.array([-1.0, -0.3, 0.0, 0.25, 0.5, 2.0])
    np.testing.assert_array_equal(binary.logit_derivative(phi, gate_fn="sigmoid", k=K), K)
    hard = np.asarray(binary.logit_derivative(phi, gate_fn="hard_sigmoid", k=K))
    pi = np.asarray(binary.gate_probability(phi, gate_fn="hard_sigmoid", k=K))
    np.testing.assert_array_equal(hard[[0, 4, 5]], 0.0)
    np.testing.assert_allclose(hard[1:4], 1.0 / (pi[1:4] * (1.0 - pi[1:4])), rtol=1e-6)

    def logit_of_pi(p):
        return jax.scipy.special.logit(binary.gate_probability(p, gate_fn="hard_sigmoid", k=K))

    np.testing.assert_allclose(hard[1:4], jax.vmap(jax.grad(logit_of_pi))(phi[1:4]), rtol=1e-5)


def test_pytree_phi_matches_exact_enumeration():
    phi = {"first": PHI[:2], "second": PHI[2:]}

    def f(z):
        return nonlinear_f(jnp.concatenate([z["first"], z["second"]]))

    def loss(p, key):
        return binary.expectation(f, p, key, k=K)

    grads = monte_carlo_gradients(loss, phi)
    exact = exact_gradient(nonlinear_f, PHI, "sigmoid")
    assert_matches_exact(grads["first"], exact[:2])
    assert_matches_exact(grads["second"], exact[2:])


@pytest.mark.parametrize("estimator", binary.ESTIMATORS)
def test_per_example_gates_match_exact_enumeration(estimator):
    sample_shape = TARGETS.shape

    def per_example_f(z):
        assert z.shape == sample_shape + PHI.shape
        return jax.vmap(nonlinear_f, in_axes=(0, None, 0))(z, WEIGHTS, TARGETS)

    def loss(phi, key):
        return binary.expectation(
            per_example_f, phi, key, estimator=estimator, k=K, sample_shape=sample_shape
        )

    def mean_exact_expectation(phi):
        pi = binary.gate_probability(phi, k=K)
        per_example = [
            exact_expectation(lambda z, t=t: nonlinear_f(z, WEIGHTS, t), pi) for t in TARGETS
        ]
        return jnp.mean(jnp.stack(per_example))

    exact = np.asarray(jax.grad(mean_exact_expectation)(PHI), dtype=np.float64)
    assert_matches_exact(monte_carlo_gradients(loss, PHI, num_keys=100_000), exact)


@pytest.mark.parametrize("estimator", binary.ESTIMATORS)
@pytest.mark.parametrize("gate_fn", binary.GATE_FNS)
def test_closed_over_weight_gets_pathwise_gradient_of_main_sample(estimator, gate_fn):
    key = jax.random.key(7)

    def loss(weights):
        return binary.expectation(
            lambda z: (nonlinear_f(z, weights), z),
            PHI,
            key,
            estimator=estimator,
            gate_fn=gate_fn,
            k=K,
            has_aux=True,
        )

    (value, z_main), weight_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(WEIGHTS)
    assert set(np.unique(np.asarray(z_main))) <= {0.0, 1.0}
    assert z_main.dtype == jnp.float32
    np.testing.assert_allclose(value, nonlinear_f(z_main, WEIGHTS), rtol=1e-6)
    np.testing.assert_allclose(
        weight_grad, jax.grad(nonlinear_f, argnums=1)(z_main, WEIGHTS), rtol=1e-6
    )


def test_ar_has_larger_variance_than_arm():
    variances = {}
    for estimator in binary.ESTIMATORS:

        def loss(phi, key, estimator=estimator):
            return binary.expectation(nonlinear_f, phi, key, estimator=estimator, k=K)

        variances[estimator] = monte_carlo_gradients(loss, PHI, num_keys=50_000).var(axis=0)
    assert np.all(variances["ar"] > variances["arm"])


def test_vmap_over_phi_matches_individual_calls():
    phis = jnp.stack([PHI, -PHI, 0.5 * PHI])
    key = jax.random.key(3)
    grad_fn = jax.grad(lambda p, k_: binary.expectation(nonlinear_f, p, k_, k=K))
    batched = jax.vmap(grad_fn, in_axes=(0, None))(phis, key)
    for row, phi in zip(batched, phis):
        np.testing.assert_allclose(row, grad_fn(phi, key), rtol=1e-6)


def test_antithetic_pair():
    u = jnp.array([0.1, 0.5, 0.9])
    z_main, z_anti = binary.antithetic_pair(u, jnp.float32(0.3))
    np.testing.assert_array_equal(z_main, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(z_anti, [0.0, 0.0, 1.0])
    assert z_main.dtype == z_anti.dtype == jnp.float32

    pi = jnp.array([0.2, 0.7])
    uniforms = jax.random.uniform(jax.random.key(0), (100_000, 1))
    z_main, z_anti = binary.antithetic_pair(uniforms, pi)
    tolerance = NUM_STANDARD_ERRORS * np.sqrt(0.25 / uniforms.shape[0])
    np.testing.assert_allclose(z_main.mean(axis=0), pi, atol=tolerance)
    np.testing.assert_allclose(z_anti.mean(axis=0), pi, atol=tolerance)


def test_gate_probability():
    phi = jnp.array([-1.0, -0.2, 0.0, 0.3, 1.0])
    np.testing.assert_allclose(
        binary.gate_probability(phi, k=K), jax.nn.sigmoid(K * phi), rtol=1e-6
    )
    np.testing.assert_allclose(
        binary.gate_probability(phi, gate_fn="hard_sigmoid", k=K),
        [0.0, 0.3, 0.5, 0.8, 1.0],
        atol=1e-6,
    )
    hard_slope = jax.grad(lambda p: binary.gate_probability(p, gate_fn="hard_sigmoid", k=K))
    assert float(hard_slope(0.1)) == pytest.approx(1.0)
    assert float(
        jax.grad(lambda p: binary.gate_probability(p, gate_fn="hard_sigmoid", k=3.5))(0.1)
    ) == pytest.approx(0.5)


def test_unknown_choices_raise():
    with pytest.raises(ValueError, match="hard_sigmoid"):
        binary.gate_probability(PHI, gate_fn="relu")
    with pytest.raises(ValueError, match="hard_sigmoid"):
        binary.expectation(nonlinear_f, PHI, jax.random.key(0), gate_fn="relu")
    with pytest.raises(ValueError, match="arm"):
        binary.expectation(nonlinear_f, PHI, jax.random.key(0), estimator="reinforce")


def test_wrong_output_shape_raises():
    with pytest.raises(ValueError, match="sample_shape"):
        binary.expectation(lambda z: z, PHI, jax.random.key(0))
    with pytest.raises(ValueError, match="sample_shape"):
        binary.expectation(jnp.sum, PHI, jax.random.key(0), sample_shape=(2,))
