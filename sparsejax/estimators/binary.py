"""Unbiased gradients for stochastic binary gates: ARM and AR.

Each gate is z ~ Bernoulli(pi) with pi = g(phi) a gate function of a real
parameter phi (Li & Ji 2019, "L0-ARM: Network Sparsification via Stochastic
Binary Optimization", arXiv:1904.04432). The gradient of E[f(z)] with respect to
phi is estimated with the Augment-REINFORCE-Merge (ARM) estimator or its
single-evaluation variant AR (Yin & Zhou 2019, "ARM: Augment-REINFORCE-Merge
Gradient for Stochastic Binary Networks", arXiv:1807.11143), both stated for the
logit psi of pi = sigmoid(psi) and carried to phi by the chain rule.
"""

from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp

# Default scale k of the gate parameter, pi = g(k * phi) (Li & Ji 2019 use k = 7).
DEFAULT_K: float = 7.0
# The hard sigmoid is clip(k * phi / HARD_SIGMOID_DIVISOR + 1/2, 0, 1): slope k / 7.
HARD_SIGMOID_DIVISOR: float = 7.0
GATE_FNS: tuple[str, ...] = ("sigmoid", "hard_sigmoid")
ESTIMATORS: tuple[str, ...] = ("arm", "ar")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; valid choices are {choices}.")


def gate_probability(
    phi: jax.Array, *, gate_fn: str = "sigmoid", k: float = DEFAULT_K
) -> jax.Array:
    """Probability pi = P(z = 1) of a binary gate, pi = g(phi) (Li & Ji 2019).

        "sigmoid":       pi = sigmoid(k * phi)
        "hard_sigmoid":  pi = min(1, max(0, k * phi / 7 + 1/2))

    Args:
      phi: gate parameters.
      gate_fn: "sigmoid" or "hard_sigmoid".
      k: scale of phi.

    Returns:
      pi, of the shape of ``phi``.

    Raises:
      ValueError: for an unknown ``gate_fn``.
    """
    _check_choice("gate_fn", gate_fn, GATE_FNS)
    if gate_fn == "sigmoid":
        return jax.nn.sigmoid(k * phi)
    return jnp.clip(k * phi / HARD_SIGMOID_DIVISOR + 0.5, 0.0, 1.0)


def logit_derivative(
    phi: jax.Array, *, gate_fn: str = "sigmoid", k: float = DEFAULT_K
) -> jax.Array:
    """Derivative dpsi/dphi of the logit psi = log(pi / (1 - pi)) of pi = g(phi).

        dpsi/dphi = g'(phi) / (pi * (1 - pi))

    "sigmoid":      exactly k.
    "hard_sigmoid": (k / 7) / (pi * (1 - pi)) where 0 < pi < 1, and 0 where pi
                    is saturated at 0 or 1 (there E[f(z)] is locally constant
                    in phi). The division is guarded, so the result is finite.

    Multiplying an unbiased estimate of dE[f]/dpsi by this factor gives an
    unbiased estimate of dE[f]/dphi.

    Args:
      phi: gate parameters.
      gate_fn: "sigmoid" or "hard_sigmoid".
      k: scale of phi.

    Returns:
      dpsi/dphi, of the shape of ``phi``.

    Raises:
      ValueError: for an unknown ``gate_fn``.
    """
    pi = gate_probability(phi, gate_fn=gate_fn, k=k)
    if gate_fn == "sigmoid":
        return jnp.full_like(pi, k)
    unsaturated = (pi > 0.0) & (pi < 1.0)
    bernoulli_variance = jnp.where(unsaturated, pi * (1.0 - pi), 1.0)
    return jnp.where(unsaturated, (k / HARD_SIGMOID_DIVISOR) / bernoulli_variance, 0.0)


def antithetic_pair(u: jax.Array, pi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Antithetic binary gates sharing one uniform (Yin & Zhou 2019, Theorem 1).

        z_main = 1[u < pi]
        z_anti = 1[u > 1 - pi]

    Both are Bernoulli(pi) for u ~ U(0, 1). The gates have the dtype of ``pi``
    and the broadcast shape of ``u`` and ``pi``.

    Args:
      u: uniform noise in [0, 1).
      pi: gate probabilities.

    Returns:
      (z_main, z_anti), gates with values 0 and 1.
    """
    z_main = (u < pi).astype(pi.dtype)
    z_anti = (u > 1.0 - pi).astype(pi.dtype)
    return z_main, z_anti


def _split_aux(output: Any, has_aux: bool) -> tuple[jax.Array, Any]:
    if has_aux:
        value, aux = output
        return jnp.asarray(value), aux
    return jnp.asarray(output), None


def _mean_over_samples(
    signal: jax.Array, weight: jax.Array, num_sample_dims: int
) -> jax.Array:
    """Mean over the leading sample axes of signal (per sample) times weight (per gate)."""
    gate_dims = weight.ndim - num_sample_dims
    per_gate_signal = jnp.reshape(signal, signal.shape + (1,) * gate_dims)
    return jnp.mean(per_gate_signal * weight, axis=tuple(range(num_sample_dims)))


def expectation(
    f: Callable[[chex.ArrayTree], Any],
    phi: chex.ArrayTree,
    key: jax.Array,
    *,
    estimator: str = "arm",
    gate_fn: str = "sigmoid",
    k: float = DEFAULT_K,
    sample_shape: Sequence[int] = (),
    has_aux: bool = False,
) -> jax.Array | tuple[jax.Array, Any]:
    """One-sample value of E[f(z)], z ~ Bernoulli(g(phi)), with ARM/AR gradients in phi.

    The gates z_main = 1[u < pi], u ~ U(0, 1), pi = g(phi) (``gate_probability``)
    are drawn from ``key`` (split over the leaves of ``phi``), one u per gate and
    per sample. The returned value is f(z_main), averaged over ``sample_shape``.

    ``jax.grad`` of the returned value with respect to ``phi`` is the estimate

        ARM (Yin & Zhou 2019, Theorem 1):
            c = mean_b[(f_b(z_anti) - f_b(z_main)) * (u_b - 1/2)] * dpsi/dphi
        AR (Yin & Zhou 2019, the single-evaluation AR estimator):
            c = mean_b[f_b(z_main) * (1 - 2 u_b)] * dpsi/dphi

    with z_anti = 1[u > 1 - pi] (``antithetic_pair``), b running over
    ``sample_shape`` (each per-sample value f_b paired with its own u_b), and
    dpsi/dphi the chain-rule factor from the logit psi of pi to phi
    (``logit_derivative``). Both are unbiased for
    d/dphi mean_b E[f_b(z)] (Li & Ji 2019). Gradients with respect to
    anything f closes over are the ordinary gradients of f(z_main).

    This is realised with the surrogate

        value = mean_b f_b(z_main) + (S - stop_gradient(S)),
        S = sum over gates of stop_gradient(c) * phi,

    where pi is held constant in the sampler, so f gives phi no pathwise
    gradient, and f(z_anti) is stop_gradient'ed, so under jit ARM costs two
    forward passes of f and one backward pass (AR: one forward, one backward).

    For the hard sigmoid dpsi/dphi = (k / 7) / (pi (1 - pi)) inside the linear
    region and 0 where pi is saturated. The reference PyTorch code of Li & Ji
    multiplies by k for the hard sigmoid as well, which is biased: its
    expectation is the true gradient times 7 pi (1 - pi). This implementation is
    unbiased.

    Args:
      f: maps a pytree of gates with the structure of ``phi`` (each leaf of
        shape ``sample_shape + leaf.shape``, dtype of pi, values 0 and 1) to an
        array of shape ``sample_shape`` (a scalar when ``sample_shape`` is
        empty), or to ``(value, aux)`` when ``has_aux``.
      phi: pytree of gate parameters.
      key: PRNG key.
      estimator: "arm" or "ar".
      gate_fn: "sigmoid" or "hard_sigmoid".
      k: scale of phi.
      sample_shape: leading shape of independent gate samples, e.g. ``(batch,)``
        for per-example gates with a per-example f.
      has_aux: whether f returns ``(value, aux)``.

    Returns:
      The mean of f(z_main) over ``sample_shape``, or ``(value, aux)`` with the
      aux of the z_main evaluation when ``has_aux``.

    Raises:
      ValueError: for an unknown ``estimator`` or ``gate_fn``, or when f returns
        a value whose shape is not ``sample_shape``.
    """
    _check_choice("estimator", estimator, ESTIMATORS)
    _check_choice("gate_fn", gate_fn, GATE_FNS)
    sample_shape = tuple(sample_shape)
    num_sample_dims = len(sample_shape)

    phi_leaves, treedef = jax.tree_util.tree_flatten(phi)
    phi_leaves = [jnp.asarray(leaf) for leaf in phi_leaves]
    leaf_keys = jax.random.split(key, len(phi_leaves))
    fixed_phi = [jax.lax.stop_gradient(leaf) for leaf in phi_leaves]
    probabilities = [gate_probability(leaf, gate_fn=gate_fn, k=k) for leaf in fixed_phi]
    uniforms = [
        jax.random.uniform(leaf_keys[i], sample_shape + pi.shape, dtype=pi.dtype)
        for i, pi in enumerate(probabilities)
    ]
    gate_pairs = [antithetic_pair(u, pi) for u, pi in zip(uniforms, probabilities)]

    main_value, aux = _split_aux(
        f(jax.tree_util.tree_unflatten(treedef, [z_main for z_main, _ in gate_pairs])),
        has_aux,
    )
    if main_value.shape != sample_shape:
        raise ValueError(
            f"f must return an array of shape sample_shape={sample_shape}, "
            f"got shape {main_value.shape}."
        )
    fixed_main_value = jax.lax.stop_gradient(main_value)

    if estimator == "arm":
        anti_value, _ = _split_aux(
            f(jax.tree_util.tree_unflatten(treedef, [z_anti for _, z_anti in gate_pairs])),
            has_aux,
        )
        signal = jax.lax.stop_gradient(anti_value) - fixed_main_value
        weights = [u - 0.5 for u in uniforms]
    else:
        signal = fixed_main_value
        weights = [1.0 - 2.0 * u for u in uniforms]

    surrogate = jnp.zeros((), dtype=main_value.dtype)
    for leaf, fixed_leaf, weight in zip(phi_leaves, fixed_phi, weights):
        logit_grad = _mean_over_samples(signal, weight, num_sample_dims)
        phi_grad = logit_grad * logit_derivative(fixed_leaf, gate_fn=gate_fn, k=k)
        surrogate = surrogate + jnp.sum(jax.lax.stop_gradient(phi_grad) * leaf)
    value = jnp.mean(main_value) + (surrogate - jax.lax.stop_gradient(surrogate)).astype(
        main_value.dtype
    )
    if has_aux:
        return value, aux
    return value
