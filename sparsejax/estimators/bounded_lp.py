"""The bounded-Lp norm and the proximal operators used to drive gates to exact zeros.

Mummadi et al. (GCPR 2019, arXiv 1908.03463) regularise group gates with a bounded variant of
the L1 norm that interpolates between L1 and L0. The form used here is

    B_{sigma,p}(x) = sum_i (1 - exp(-|x_i|^p / sigma)),

whose terms lie in [0, 1): as sigma -> 0 every nonzero entry counts 1 (the L0 count), and for
|x_i|^p << sigma a term is |x_i|^p / sigma (a scaled L1 norm when p = 1). For p = 1 its slope at
0+ is 1/sigma (an L1 kink, so a proximal step can set entries exactly to zero) and it decays as
exp(-|x|/sigma), so large entries are barely shrunk. (The paper's exact formula was not
available; this reconstruction has the properties its abstract states.)

Proximal operators, for a step ``t`` and weight ``lambda`` (``threshold = t * lambda``):

- L1: prox(v) = sign(v) max(|v| - threshold, 0), the soft threshold.
- Bounded L1 (p = 1): prox(v) = argmin_y threshold (1 - exp(-|y|/sigma)) + (y - v)^2 / 2, solved
  exactly (:func:`prox_bounded_l1`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEWTON_STEPS = 30
"""Newton iterations of :func:`prox_bounded_l1`; they converge monotonically, and float32
precision is reached in well under this many for every argument tested."""


def _safe_power(magnitude: jax.Array, p: float) -> jax.Array:
    """magnitude^p for magnitude >= 0, with derivative 0 at 0 (for p = 1: the subgradient 0)."""
    positive = magnitude > 0
    return jnp.where(positive, jnp.power(jnp.where(positive, magnitude, 1.0), p), 0.0)


def bounded_norm(x: jax.Array, sigma: float, p: float = 1.0) -> jax.Array:
    """B_{sigma,p}(x) = sum_i (1 - exp(-|x_i|^p / sigma)), for p >= 1 and sigma > 0.

    Differentiable everywhere except at x_i = 0 for p = 1, where ``jax.grad`` returns the
    subgradient 0 (the minimal-norm one); the gradient of a term elsewhere is
    (p |x|^(p-1) / sigma) exp(-|x|^p / sigma) sign(x).
    """
    magnitude = jnp.where(x == 0, 0.0, jnp.abs(x))
    return jnp.sum(-jnp.expm1(-_safe_power(magnitude, p) / sigma))


def safe_norm(x: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """Euclidean norm over ``axis`` whose gradient at the zero vector is 0 (not NaN)."""
    squares = jnp.sum(jnp.square(x), axis=axis)
    positive = squares > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def soft_threshold(v: jax.Array, threshold: jax.Array | float) -> jax.Array:
    """The proximal operator of ``threshold * |y|``: sign(v) max(|v| - threshold, 0)."""
    return jnp.sign(v) * jnp.maximum(jnp.abs(v) - threshold, 0.0)


def prox_bounded_l1(
    v: jax.Array, threshold: jax.Array | float, sigma: float, *, steps: int = NEWTON_STEPS
) -> jax.Array:
    """Exact proximal operator of y -> threshold * (1 - exp(-|y|/sigma)), elementwise.

    With a = threshold / sigma and u = |v|, the objective on y >= 0 is
    F(y) = threshold (1 - exp(-y/sigma)) + (y - u)^2 / 2, with F'(y) = h(y) = y - u + a e^{-y/sigma}.
    h is convex, with its minimum at y* = sigma ln(a / sigma) (if positive), so it increases on
    [lo, inf), lo = max(0, y*). Newton's method started at y = u (where h(u) > 0) then decreases
    monotonically to the only root of h in [lo, u] when there is one (the tangent of a convex
    function lies below it), the only candidate for a minimum other than y = 0; the result is that
    root if F(root) < F(0), else 0. For threshold <= sigma^2, F is convex and this is the usual
    soft-threshold condition (zero iff u <= a); for larger thresholds F is not convex and the
    zero region grows towards the hard threshold sqrt(2 threshold) of the L0 prox.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    u = jnp.abs(v)
    a = jnp.asarray(threshold, u.dtype) / sigma
    lower = jnp.maximum(0.0, sigma * jnp.log(jnp.maximum(a / sigma, 1.0)))

    def objective(y):
        return threshold * -jnp.expm1(-y / sigma) + 0.5 * jnp.square(y - u)

    def newton(_, y):
        decay = jnp.exp(-y / sigma)
        slope = 1.0 - (a / sigma) * decay
        value = y - u + a * decay
        moved = jnp.where(slope > 0, y - value / jnp.where(slope > 0, slope, 1.0), lower)
        return jnp.maximum(moved, lower)

    root = jax.lax.fori_loop(0, steps, newton, u)
    keep = objective(root) < objective(jnp.zeros_like(u))
    return jnp.sign(v) * jnp.where(keep, root, 0.0)
