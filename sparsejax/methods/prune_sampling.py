"""Magnitude-biased random zeroing of weights and the sparsity schedule it follows.

Stochastic weight pruning (Ziv, Goldberger & Riklin Raviv, Neurocomputing 2021; arXiv 2012.03827)
zeroes, after every update, weights *sampled* with a probability that favours small magnitudes.
The papers' probability function and schedule were not available; this module implements the
following reconstruction.

For the surviving weights w_i of a layer, with s = mean |w| over the survivors and temperature T,

    e_i = exp(-(|w_i| - min_j |w_j|) / (T * s)),    q_i = min(1, c * e_i),   sum_i q_i = k,

and each survivor is zeroed independently with probability q_i. The constant c is found exactly
(sort the e_i; the largest ones saturate at 1), so the expected number zeroed is exactly k. T
sets how strongly small weights are preferred (T -> 0: magnitude pruning; T -> inf: uniform);
dividing by s makes it scale free. Subtracting the smallest magnitude changes nothing but the
range of the exponentials.

k follows a target sparsity: k = max(0, s_t * n - zeros) for a layer of n weights of which
``zeros`` are already pruned, with s_t the cubic schedule of Zhu & Gupta (2017, eq. 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cubic_sparsity(
    step: jax.Array, *, initial: float, final: float, start: float, end: float
) -> jax.Array:
    """s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^3 on [t_0, t_1]; s_i before t_0 and
    s_f after t_1 (Zhu & Gupta 2017, "To prune, or not to prune", eq. 1)."""
    if end < start:
        raise ValueError(f"the schedule ends (step {end}) before it starts (step {start})")
    step = jnp.asarray(step, jnp.float32)
    if end == start:
        progress = (step >= start).astype(jnp.float32)
    else:
        progress = jnp.clip((step - start) / (end - start), 0.0, 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


SMALLEST_EXPONENT = -80.0
"""e_i never underflows to 0 in float32 (e^-80 ~ 2e-35 is a normal number): every survivor keeps
a positive probability, so the expected count k is always met, however cold T is (a large spread
of magnitudes at a small T would otherwise leave fewer positive weights than k)."""


def zeroing_weights(kernel: jax.Array, survivors: jax.Array, temperature: float) -> jax.Array:
    """e_i = exp(-(|w_i| - min |w|) / (T * mean |w|)) over the survivors (exponent at least
    :data:`SMALLEST_EXPONENT`), 0 elsewhere."""
    if temperature <= 0:
        raise ValueError(f"the pruning temperature must be positive, got {temperature}")
    magnitude = jnp.abs(kernel)
    count = jnp.sum(survivors)
    scale = jnp.sum(jnp.where(survivors, magnitude, 0.0)) / jnp.maximum(count, 1)
    scale = jnp.where(scale > 0, scale, 1.0)
    smallest = jnp.min(jnp.where(survivors, magnitude, jnp.inf))
    exponent = jnp.maximum(-(magnitude - smallest) / (temperature * scale), SMALLEST_EXPONENT)
    return jnp.where(survivors, jnp.exp(exponent), 0.0)


def inclusion_probabilities(weights: jax.Array, count: jax.Array) -> jax.Array:
    """q_i = min(1, c * weights_i) with sum_i q_i = count, for weights >= 0.

    ``count`` is clipped to [0, number of positive weights]. When count * max(w) <= sum(w) no
    probability saturates and c = count / sum(w). Otherwise, with the weights sorted in
    decreasing order e_(1) >= e_(2) >= ..., the m largest saturate, where m is the smallest
    integer with (count - m) e_(m+1) <= sum_{j > m} e_(j), and c = (count - m) / sum_{j > m} e_(j).
    (The sort runs only in that case: it costs far more than the step on a CPU.)
    """
    flat = weights.reshape(-1)
    count = jnp.clip(count, 0.0, jnp.sum(flat > 0).astype(flat.dtype))
    total = jnp.sum(flat)

    def proportional(_):
        return jnp.where(total > 0, count / jnp.where(total > 0, total, 1.0), 0.0)

    def water_filling(_):
        descending = -jnp.sort(-flat)
        tails = jnp.cumsum(descending[::-1])[::-1]
        saturated = jnp.arange(flat.size, dtype=flat.dtype)
        fits = ((count - saturated) * descending <= tails) & (descending > 0)
        m = jnp.argmax(fits)
        tail = tails[m]
        return jnp.where(tail > 0, (count - saturated[m]) / jnp.where(tail > 0, tail, 1.0), 0.0)

    scale = jax.lax.cond(count * jnp.max(flat) <= total, proportional, water_filling, None)
    return jnp.minimum(1.0, scale * weights)


def sample_zeroed(
    key: jax.Array, kernel: jax.Array, survivors: jax.Array, count: jax.Array, temperature: float
) -> jax.Array:
    """A boolean draw of the survivors to zero: independent Bernoulli(q_i), E[sum] = count."""
    probabilities = inclusion_probabilities(zeroing_weights(kernel, survivors, temperature), count)
    return jax.random.uniform(key, kernel.shape) < probabilities
