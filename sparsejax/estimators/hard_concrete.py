"""Hard concrete gates (Louizos, Welling & Kingma 2018, arXiv:1712.01312).

A hard concrete gate is a binary concrete variable stretched to the interval
(gamma, zeta) and folded back into [0, 1] by a hard sigmoid. It takes the exact
values 0 and 1 with positive probability, yet a sample is a differentiable
function of its location log_alpha (reparameterisation), so gradients of a
loss reach log_alpha through the sampled gates.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Temperature of the binary concrete distribution (the paper's beta).
BETA: float = 2.0 / 3.0
# Lower end of the stretched interval (gamma < 0).
GAMMA: float = -0.1
# Upper end of the stretched interval (zeta > 1).
ZETA: float = 1.1
# Uniform noise is drawn from U(EPS, 1 - EPS) so that its logit stays finite.
EPS: float = 1e-6


def sample_from_uniform(
    u: jax.Array,
    log_alpha: jax.Array,
    *,
    beta: float = BETA,
    gamma: float = GAMMA,
    zeta: float = ZETA,
) -> jax.Array:
    """Hard concrete gates from given uniform noise (Louizos et al. 2018, eq. 10).

        s     = sigmoid((log u - log(1 - u) + log_alpha) / beta)
        s_bar = s * (zeta - gamma) + gamma
        z     = min(1, max(0, s_bar))

    The result has the broadcast shape of ``u`` and ``log_alpha``. It is
    differentiable in ``log_alpha``, with
    dz/dlog_alpha = (zeta - gamma) * s * (1 - s) / beta >= 0 where 0 < s_bar < 1
    and 0 where the hard sigmoid saturates.

    Args:
      u: uniform noise in (0, 1).
      log_alpha: location parameter of each gate.
      beta: temperature.
      gamma: lower end of the stretched interval.
      zeta: upper end of the stretched interval.

    Returns:
      Gates z in [0, 1].
    """
    logistic_noise = jnp.log(u) - jnp.log1p(-u)
    s = jax.nn.sigmoid((logistic_noise + log_alpha) / beta)
    s_bar = s * (zeta - gamma) + gamma
    return jnp.clip(s_bar, 0.0, 1.0)


def sample(
    key: jax.Array,
    log_alpha: jax.Array,
    *,
    beta: float = BETA,
    gamma: float = GAMMA,
    zeta: float = ZETA,
    shape: Sequence[int] | None = None,
) -> jax.Array:
    """Sample hard concrete gates by reparameterisation (Louizos et al. 2018, eq. 10).

        u     ~ U(EPS, 1 - EPS)
        s     = sigmoid((log u - log(1 - u) + log_alpha) / beta)
        s_bar = s * (zeta - gamma) + gamma
        z     = min(1, max(0, s_bar))

    See ``sample_from_uniform`` for the maths given ``u``.

    Args:
      key: PRNG key.
      log_alpha: location parameter of each gate.
      beta: temperature.
      gamma: lower end of the stretched interval.
      zeta: upper end of the stretched interval.
      shape: shape of the noise ``u``; it must broadcast with
        ``log_alpha.shape``, e.g. ``(batch,) + log_alpha.shape`` for one
        independent gate per example. Defaults to ``log_alpha.shape``.

    Returns:
      Gates z in [0, 1] of the broadcast shape of ``shape`` and
      ``log_alpha.shape``, in at least float32 precision.

    Raises:
      ValueError: if ``shape`` does not broadcast with ``log_alpha.shape``.
    """
    log_alpha = jnp.asarray(log_alpha)
    noise_shape = log_alpha.shape if shape is None else tuple(shape)
    jnp.broadcast_shapes(noise_shape, log_alpha.shape)
    dtype = jnp.promote_types(log_alpha.dtype, jnp.float32)
    u = jax.random.uniform(key, noise_shape, dtype=dtype, minval=EPS, maxval=1.0 - EPS)
    return sample_from_uniform(u, log_alpha, beta=beta, gamma=gamma, zeta=zeta)


def deterministic(
    log_alpha: jax.Array,
    *,
    gamma: float = GAMMA,
    zeta: float = ZETA,
) -> jax.Array:
    """Test-time gate (Louizos et al. 2018, eq. 13).

        z_hat = min(1, max(0, sigmoid(log_alpha) * (zeta - gamma) + gamma))

    At the defaults z_hat is 0 iff log_alpha <= -ln 11, 1 iff
    log_alpha >= ln 11, and 1/2 at log_alpha = 0.

    Args:
      log_alpha: location parameter of each gate.
      gamma: lower end of the stretched interval.
      zeta: upper end of the stretched interval.

    Returns:
      Gates z_hat in [0, 1].
    """
    return jnp.clip(jax.nn.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def prob_nonzero(
    log_alpha: jax.Array,
    *,
    beta: float = BETA,
    gamma: float = GAMMA,
    zeta: float = ZETA,
) -> jax.Array:
    """Probability that a hard concrete gate is nonzero (Louizos et al. 2018, eq. 12).

        P(z != 0) = 1 - Q(s_bar <= 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))

    which is sigmoid(log_alpha + 1.5986...) at the defaults. Summed over gates
    this is the expected L0 norm of the gated parameters, the paper's
    complexity penalty.

    Args:
      log_alpha: location parameter of each gate.
      beta: temperature.
      gamma: lower end of the stretched interval.
      zeta: upper end of the stretched interval.

    Returns:
      P(z != 0) for each gate.
    """
    return jax.nn.sigmoid(log_alpha - beta * jnp.log(-gamma / zeta))
