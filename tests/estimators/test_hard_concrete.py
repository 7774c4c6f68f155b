"""Tests for sparsejax.estimators.hard_concrete (Louizos et al. 2018)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.estimators import hard_concrete

NUM_SAMPLES = 200_000
NUM_STANDARD_ERRORS = 5.0
LOG_ALPHAS = jnp.array([-3.0, -1.0, 0.0, 0.7, 2.5])
LN_11 = math.log(11.0)


def binomial_tolerance(p: np.ndarray, n: int) -> np.ndarray:
    return NUM_STANDARD_ERRORS * np.sqrt(p * (1.0 - p) / n) + 1e-4


def draw_samples(seed: int = 0) -> np.ndarray:
    key = jax.random.key(seed)
    samples = hard_concrete.sample(key, LOG_ALPHAS, shape=(NUM_SAMPLES,) + LOG_ALPHAS.shape)
    return np.asarray(samples)


def test_prob_nonzero_matches_monte_carlo_frequency():
    nonzero_frequency = (draw_samples() != 0.0).mean(axis=0)
    expected = np.asarray(hard_concrete.prob_nonzero(LOG_ALPHAS))
    np.testing.assert_array_less(
        np.abs(nonzero_frequency - expected), binomial_tolerance(expected, NUM_SAMPLES)
    )


def test_prob_nonzero_closed_form_at_defaults():
    offset = (2.0 / 3.0) * LN_11
    assert offset == pytest.approx(1.5986, abs=1e-4)
    np.testing.assert_allclose(
        hard_concrete.prob_nonzero(LOG_ALPHAS), jax.nn.sigmoid(LOG_ALPHAS + offset), rtol=1e-6
    )


def test_prob_nonzero_follows_hyperparameters():
    log_alpha = jnp.array([-1.0, 0.5])
    beta, gamma, zeta = 0.5, -0.2, 1.3
    samples = hard_concrete.sample(
        jax.random.key(4), log_alpha, beta=beta, gamma=gamma, zeta=zeta, shape=(NUM_SAMPLES, 2)
    )
    expected = np.asarray(hard_concrete.prob_nonzero(log_alpha, beta=beta, gamma=gamma, zeta=zeta))
    np.testing.assert_allclose(
        expected, jax.nn.sigmoid(log_alpha - beta * math.log(-gamma / zeta)), rtol=1e-6
    )
    frequency = (np.asarray(samples) != 0.0).mean(axis=0)
    np.testing.assert_array_less(
        np.abs(frequency - expected), binomial_tolerance(expected, NUM_SAMPLES)
    )


def test_exact_zeros_and_ones_have_their_closed_form_frequencies():
    samples = draw_samples(seed=1)
    assert samples.min() == 0.0 and samples.max() == 1.0
    prob_zero = 1.0 - np.asarray(hard_concrete.prob_nonzero(LOG_ALPHAS))
    prob_one = np.asarray(jax.nn.sigmoid(LOG_ALPHAS - (2.0 / 3.0) * LN_11))
    zero_frequency = (samples == 0.0).mean(axis=0)
    one_frequency = (samples == 1.0).mean(axis=0)
    assert np.all(zero_frequency > 0.0) and np.all(one_frequency > 0.0)
    np.testing.assert_array_less(
        np.abs(zero_frequency - prob_zero), binomial_tolerance(prob_zero, NUM_SAMPLES)
    )
    np.testing.assert_array_less(
        np.abs(one_frequency - prob_one), binomial_tolerance(prob_one, NUM_SAMPLES)
    )
    interior = (samples > 0.0) & (samples < 1.0)
    assert np.all(interior.mean(axis=0) > 0.0)


def test_monte_carlo_mean_increases_with_log_alpha():
    mean_gate = draw_samples(seed=2).mean(axis=0)
    assert np.all(np.diff(mean_gate) > 0.01)


def test_deterministic_closed_form():
    small = 1e-3
    log_alpha = jnp.array([-10.0, -LN_11 - small, 0.0, LN_11 + small, 10.0])
    np.testing.assert_allclose(
        hard_concrete.deterministic(log_alpha), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6
    )
    assert float(hard_concrete.deterministic(-LN_11 + 0.1)) > 0.0
    assert float(hard_concrete.deterministic(LN_11 - 0.1)) < 1.0
    grid = jnp.linspace(-5.0, 5.0, 101)
    expected = jnp.clip(jax.nn.sigmoid(grid) * 1.2 - 0.1, 0.0, 1.0)
    np.testing.assert_allclose(hard_concrete.deterministic(grid), expected, rtol=1e-6, atol=1e-7)
    assert np.all(np.diff(np.asarray(hard_concrete.deterministic(grid))) >= 0.0)


def test_gradient_of_sample_reaches_log_alpha():
    key = jax.random.key(3)

    def total_gate(log_alpha):
        return jnp.sum(hard_concrete.sample(key, log_alpha, shape=(64,) + log_alpha.shape))

    grad = np.asarray(jax.jit(jax.grad(total_gate))(LOG_ALPHAS))
    assert np.all(np.isfinite(grad))
    assert np.all(grad >= 0.0)
    assert np.all(grad > 0.0)


def test_gradient_is_zero_where_clip_saturates():
    u = jnp.array([1e-3, 0.5, 1.0 - 1e-3])
    log_alpha = jnp.zeros(3)
    z = hard_concrete.sample_from_uniform(u, log_alpha)
    np.testing.assert_array_equal(np.asarray(z)[[0, 2]], [0.0, 1.0])
    grad = jax.grad(lambda a: jnp.sum(hard_concrete.sample_from_uniform(u, a)))(log_alpha)
    np.testing.assert_array_equal(np.asarray(grad)[[0, 2]], 0.0)
    s = 0.5
    expected_interior = (1.1 - (-0.1)) * s * (1.0 - s) / (2.0 / 3.0)
    assert float(grad[1]) == pytest.approx(expected_interior, rel=1e-6)


def test_sample_from_uniform_matches_hand_computation():
    u, log_alpha, beta, gamma, zeta = 0.3, 0.5, 2.0 / 3.0, -0.1, 1.1
    s = 1.0 / (1.0 + math.exp(-(math.log(u) - math.log(1.0 - u) + log_alpha) / beta))
    expected = min(1.0, max(0.0, s * (zeta - gamma) + gamma))
    z = hard_concrete.sample_from_uniform(
        jnp.float32(u), jnp.float32(log_alpha), beta=beta, gamma=gamma, zeta=zeta
    )
    assert float(z) == pytest.approx(expected, rel=1e-6)
    z_tempered = hard_concrete.sample_from_uniform(
        jnp.float32(0.9), jnp.float32(-1.0), beta=0.5, gamma=-0.2, zeta=1.3
    )
    s = 1.0 / (1.0 + math.exp(-(math.log(0.9) - math.log(0.1) - 1.0) / 0.5))
    assert float(z_tempered) == pytest.approx(min(1.0, max(0.0, s * 1.5 - 0.2)), rel=1e-6)


def test_sample_under_jit_and_vmap_over_keys():
    keys = jax.random.split(jax.random.key(5), 8)
    batched = jax.jit(jax.vmap(lambda key: hard_concrete.sample(key, LOG_ALPHAS)))(keys)
    assert batched.shape == (8,) + LOG_ALPHAS.shape
    # Each key alone, compiled too: op by op, jax 0.12 rounds the sigmoid ~30 ulp differently.
    single = jax.jit(lambda key: hard_concrete.sample(key, LOG_ALPHAS))
    for key, row in zip(keys, batched):
        np.testing.assert_allclose(row, single(key), rtol=1e-6)
    assert len({tuple(np.asarray(row)) for row in batched}) == 8


def test_sample_shape_gives_independent_rows():
    log_alpha = jnp.zeros(6)
    samples = np.asarray(hard_concrete.sample(jax.random.key(6), log_alpha, shape=(4, 6)))
    assert samples.shape == (4, 6)
    assert np.all((samples >= 0.0) & (samples <= 1.0))
    assert len({tuple(row) for row in samples}) == 4
    assert hard_concrete.sample(jax.random.key(6), log_alpha).shape == (6,)


def test_sample_rejects_shape_that_does_not_broadcast():
    with pytest.raises(ValueError):
        hard_concrete.sample(jax.random.key(0), jnp.zeros(6), shape=(4, 5))
