"""Multiplying gate values into activations.

Unit gates (neurons of a dense layer's input, channels of a conv's output) scale the last axis of
an activation. A batch-shared draw has shape ``(units,)``; a per-example draw ``(batch, units)``
is broadcast over the spatial axes of NHWC activations.
"""

import jax


def gate_units(x: jax.Array, z: jax.Array) -> jax.Array:
    """x * z along the last (feature / channel) axis of x, per example when z is batched."""
    if z.ndim == 1:
        return x * z
    if z.ndim != 2 or z.shape[0] != x.shape[0]:
        raise ValueError(f"unit gates of shape {z.shape} do not fit activations of shape {x.shape}")
    return x * z.reshape(z.shape[0], *([1] * (x.ndim - 2)), z.shape[1])
