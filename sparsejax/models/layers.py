"""Dense and convolution layers of the zoo's plain modules.

Kernels use the Flax layouts: dense ``(in, out)``, convolution ``HWIO`` on ``NHWC`` inputs.
Initialisation is He-normal for kernels, N(0, 2 / fan) with fan = fan-in (in, or k*k*in) unless a
convolution is given ``kernel_fan="fan_out"`` (k*k*out), and zero for biases. This is the L0
reference codes' initialisation: L0-HC's ``kaiming_normal`` fan-in on convolutions and, on dense
``(in, out)`` weights, a "fan_out" that PyTorch reads from dimension 0, i.e. the fan-in; L0-ARM's
dense layers the same, its convolutions fan-out.

The layers take no gates: the zoo's models are plain modules gated from their trace
(:class:`~sparsejax.structure.traced_model.TracedModel`), which multiplies the gate values into
the parameters they gate (a dense layer's input gates into its kernel rows, as the L0 reference
code does: the gradient for z is then sum_o W * (x^T g), from the weight gradient the backward
pass computes anyway).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.batch_chunks import convolve

he_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
KERNEL_FANS: tuple[str, ...] = ("fan_in", "fan_out")


class Dense(nnx.Module):
    """y = x @ W + b; ``kernel_init`` draws W (He-normal by default)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        kernel_init: nnx.Initializer = he_normal,
    ):
        self.in_features, self.out_features = in_features, out_features
        shape = (in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]


class Conv(nnx.Module):
    """y = conv(x, W) + b: 2-D convolution, NHWC input, HWIO kernel. ``then`` (an activation
    and pooling, per example) is applied to y; on CPU batch slices it runs on each slice before
    they are concatenated (:func:`~sparsejax.models.batch_chunks.convolve`).

    ``groups`` splits the channels into feature groups; the kernel is then
    ``(k, k, in / groups, out)`` and ``groups == in == out`` is a depthwise convolution.
    ``kernel_fan``: the fan of the He-normal initialisation (fan_in | fan_out).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        rngs: nnx.Rngs,
        stride: int = 1,
        padding: str | tuple[tuple[int, int], tuple[int, int]] = "VALID",
        use_bias: bool = True,
        groups: int = 1,
        kernel_fan: str = "fan_in",
    ):
        if kernel_fan not in KERNEL_FANS:
            raise ValueError(f"kernel_fan must be one of {KERNEL_FANS}, got {kernel_fan!r}")
        if in_features % groups or out_features % groups:
            raise ValueError(
                f"groups={groups} must divide both in_features={in_features} and "
                f"out_features={out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.groups = groups
        shape = (kernel_size, kernel_size, in_features // groups, out_features)
        init = nnx.initializers.variance_scaling(2.0, kernel_fan, "normal")
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None

    def __call__(
        self, x: jax.Array, *, then: Callable[[jax.Array], jax.Array] | None = None
    ) -> jax.Array:
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        options = dict(
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )
        if then is not None:
            return convolve(
                x, kernel, then=lambda y: then(y if bias is None else y + bias), **options
            )
        y = convolve(x, kernel, **options)
        return y if bias is None else y + bias

