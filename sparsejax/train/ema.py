"""Temporal averaging: an exponential moving average (EMA) of the parameters, evaluated in their
place.

After update t (t = 1, 2, ...), on the parameters the method's after-update left (clamped,
masked), with ema_0 = 0::

    ema_t = beta * ema_{t-1} + (1 - beta) * theta_t
    average_t = ema_t / (1 - beta^t)

The division removes the bias towards ema_0 = 0 (Adam's correction). Every parameter is
averaged, gate parameters included. Source: Louizos et al. (2018), "temporal averaging" for the
MNIST networks; their code's ``update_ema`` / ``load_ema_params`` (models.py), which swaps the
average in for validation only. Training always continues from the raw parameters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparsejax.methods.base import Params


def init(params: Params, decay: float) -> Params:
    """ema_0: zeros shaped like ``params``, or ``{}`` (nothing stored) when ``decay`` is 0."""
    return jax.tree.map(jnp.zeros_like, params) if decay else {}


def update(ema: Params, params: Params, decay: float) -> Params:
    """ema_t = decay * ema_{t-1} + (1 - decay) * theta_t."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def average(ema: Params, params: Params, step: jax.Array, decay: float) -> Params:
    """The bias-corrected average ema_t / (1 - decay^t) after ``step`` = t updates; before the
    first update (t = 0), where it is undefined, ``params``. 1 - decay^t is computed as
    -expm1(t log decay): in float32, 1 - 0.999^t loses about 1e-5 of its value for small t."""
    t = jnp.maximum(step, 1).astype(jnp.float32)
    correction = -jnp.expm1(t * math.log(decay))
    return jax.tree.map(lambda e, p: jnp.where(step > 0, e / correction, p), ema, params)
