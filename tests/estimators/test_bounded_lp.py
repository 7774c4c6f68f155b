import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.estimators.bounded_lp import (
    bounded_norm,
    prox_bounded_l1,
    safe_norm,
    soft_threshold,
)

X = jnp.array([0.0, 0.3, -1.2, 2.5, 0.0, -0.01, 4.0])


def test_bounded_norm_tends_to_the_l0_count_as_sigma_vanishes():
    assert float(bounded_norm(X, sigma=1e-4, p=1.0)) == pytest.approx(5.0, abs=1e-6)
    assert float(bounded_norm(X, sigma=1e-6, p=2.0)) == pytest.approx(5.0, abs=1e-6)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0])
def test_bounded_norm_is_scaled_lp_for_small_entries(p):
    small = jnp.array([1e-4, -2e-4, 5e-5, 0.0])
    sigma = 0.5
    expected = float(jnp.sum(jnp.abs(small) ** p) / sigma)
    assert float(bounded_norm(small, sigma, p)) == pytest.approx(expected, rel=1e-3)


def test_bounded_norm_matches_its_definition_and_is_bounded():
    sigma, p = 0.7, 1.3
    expected = np.sum(1.0 - np.exp(-np.abs(np.asarray(X)) ** p / sigma))
    assert float(bounded_norm(X, sigma, p)) == pytest.approx(expected, rel=1e-6)
    assert float(bounded_norm(100.0 * X, sigma, p)) < X.size


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0])
def test_gradient_matches_the_analytic_one_and_is_finite_at_zero(p):
    sigma = 0.8
    grad = jax.grad(bounded_norm)(X, sigma, p)
    x = np.asarray(X)
    magnitude = np.abs(x)
    analytic = np.where(
        x != 0,
        p * magnitude ** (p - 1) / sigma * np.exp(-magnitude**p / sigma) * np.sign(x),
        0.0,
    )
    np.testing.assert_allclose(grad, analytic, rtol=1e-5, atol=1e-7)


def test_safe_norm_has_zero_gradient_at_the_zero_vector():
    rows = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(safe_norm(rows, axis=1), [5.0, 0.0])
    grad = jax.grad(lambda r: jnp.sum(safe_norm(r, axis=1)))(rows)
    np.testing.assert_allclose(grad, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)


def brute_force_prox(v, penalty):
    grid = np.linspace(-8.0, 8.0, 320001)
    return grid[np.argmin(penalty(grid) + 0.5 * (grid - v) ** 2)]


@pytest.mark.parametrize(
    "threshold,sigma",
    [(0.1, 0.5), (0.2, 1.0), (0.5, 0.1), (1.0, 0.05), (5.0, 1.0), (0.09, 0.3)],
    ids=["convex", "convex-wide", "nonconvex", "near-l0", "strong", "boundary"],
)
def test_prox_of_the_bounded_l1_penalty_is_the_grid_minimiser(threshold, sigma):
    values = np.concatenate([np.linspace(-6.0, 6.0, 121), [threshold / sigma, 0.0]])
    got = np.asarray(prox_bounded_l1(jnp.asarray(values, jnp.float32), threshold, sigma))

    def penalty(y):
        return threshold * (1.0 - np.exp(-np.abs(y) / sigma))

    for v, y in zip(values, got):
        reference = brute_force_prox(v, penalty)
        objective = penalty(y) + 0.5 * (y - v) ** 2
        best = penalty(reference) + 0.5 * (reference - v) ** 2
        assert objective <= best + 1e-5, (v, y, reference)


def test_prox_zeroes_exactly_the_entries_below_its_threshold_when_convex():
    threshold, sigma = 0.02, 0.5
    cut = threshold / sigma
    values = jnp.array([0.0, 0.5 * cut, -0.99 * cut, 1.01 * cut, -1.5 * cut, 2.0])
    result = np.asarray(prox_bounded_l1(values, threshold, sigma))
    assert np.all(result[:3] == 0.0)
    assert np.all(result[3:] != 0.0)
    assert np.all(np.sign(result[3:]) == np.sign(np.asarray(values[3:])))
    assert np.all(np.abs(result) <= np.abs(np.asarray(values)))


def test_prox_tends_to_the_l0_hard_threshold_for_small_sigma():
    """For sigma -> 0 the penalty is threshold * 1[y != 0], whose prox keeps v exactly when
    v^2 / 2 > threshold."""
    threshold, sigma = 0.5, 1e-3
    cut = np.sqrt(2 * threshold)
    values = jnp.array([0.9 * cut, 1.1 * cut, -1.1 * cut])
    np.testing.assert_allclose(
        prox_bounded_l1(values, threshold, sigma), [0.0, 1.1 * cut, -1.1 * cut], rtol=1e-4
    )


def test_soft_threshold_is_the_l1_prox():
    values = jnp.array([-2.0, -0.3, 0.0, 0.1, 0.7])
    np.testing.assert_allclose(soft_threshold(values, 0.5), [-1.5, 0.0, 0.0, 0.0, 0.2])
    for v in [-1.3, 0.2, 0.9]:
        reference = brute_force_prox(v, lambda y: 0.4 * np.abs(y))
        assert float(soft_threshold(jnp.float32(v), 0.4)) == pytest.approx(reference, abs=1e-4)


def test_prox_rejects_a_nonpositive_sigma():
    with pytest.raises(ValueError, match="sigma must be positive"):
        prox_bounded_l1(X, 0.1, 0.0)


@pytest.mark.parametrize("threshold,sigma", [(0.02, 0.5), (0.3, 0.4), (0.5, 0.1), (2.0, 1.0)])
def test_nonzero_prox_values_are_the_lambert_w_closed_form(threshold, sigma):
    """A nonzero prox value y of v > 0 solves y - v + (threshold / sigma) e^{-y / sigma} = 0, i.e.
    y = v + sigma W_0(-(threshold / sigma^2) e^{-v / sigma}) on the principal branch."""
    from scipy.special import lambertw

    values = np.linspace(0.05, 5.0, 100)
    got = np.asarray(prox_bounded_l1(jnp.asarray(values, jnp.float32), threshold, sigma))
    argument = -(threshold / sigma**2) * np.exp(-values / sigma)
    kept = got > 0
    assert kept.sum() > 10
    closed = values + sigma * np.real(lambertw(argument, 0))
    np.testing.assert_allclose(got[kept], closed[kept], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        -np.asarray(prox_bounded_l1(jnp.asarray(-values, jnp.float32), threshold, sigma)), got
    )
