"""LeNet-300-100 (the MLP 784-300-100-10) and LeNet-5-Caffe (20-50-800-500).

Both are plain NNX modules whose ``gate_placements`` (:mod:`sparsejax.models.placement`) put
the gates of Louizos et al. (2018) and Li & Ji (2019); their slots, counts and slimming come from
their trace (:class:`~sparsejax.structure.traced_model.TracedModel`):
- MLP: gates on the inputs of each of the three dense layers (784, 300 and 100 gates); initial
  drop rate 0.2 on the pixels and 0.5 elsewhere.
- LeNet-5-Caffe: gates on the output channels of both convolutions (20, 50) and on the inputs of
  both dense layers (800, 500); initial drop rate 0.5. The architecture string "a-b-c-d" counts
  the active gates of these four slots.
With ``granularity="weight"`` every kernel entry gets its own gate instead.

Initialisation as the reference codes (:mod:`sparsejax.models.layers`): kernels He-normal with
the fan-in, N(0, 2 / fan_in), biases zero; LeNet-5's convolutions take ``conv_fan="fan_out"``
(N(0, 2 / (25 * out))) for L0-ARM, whose code initialises them so
(:meth:`sparsejax.methods.base.Method.model_options`).

LeNet-5's fc1 reads conv2's map flattened (NHWC order, channel fastest): its inputs are the 50
channels of conv2 at the 4 * 4 positions left after pooling (800 = 50 * 16). Its 800 input gates
are an input selection of its rows (a flattened input is not a unit of conv2), so that a slimmed
model drops the flattened positions whose own input gates are closed, and a closed conv2 channel
removes its 16 rows too; fc2's 500 input gates are fc1's output units.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from sparsejax.models.layers import Conv, Dense
from sparsejax.models.placement import GatePlacement
from sparsejax.models.pooling import max_pool

MNIST_SHAPE = (28, 28, 1)
PIXEL_DROPRATE = 0.2
HIDDEN_DROPRATE = 0.5


class MLP(nnx.Module):
    """LeNet-300-100: dense 784-300-100-classes with ReLU, a plain NNX module whose
    ``gate_placements`` put one gate on every input of each dense layer (the pixels at drop
    rate 0.2, the hidden units at 0.5); ``|g|`` of a gate is its row of the layer's kernel."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = MNIST_SHAPE,
        hidden: tuple[int, ...] = (300, 100),
    ):
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        widths = (math.prod(input_shape), *hidden, num_classes)
        self.names = tuple(f"fc{i + 1}" for i in range(len(widths) - 1))
        for name, (a, b) in zip(self.names, zip(widths[:-1], widths[1:])):
            setattr(self, name, Dense(a, b, rngs=rngs))
        self.gate_placements = tuple(
            GatePlacement(name, name, "input", PIXEL_DROPRATE if i == 0 else HIDDEN_DROPRATE)
            for i, name in enumerate(self.names)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.reshape(x.shape[0], -1)
        for name in self.names[:-1]:
            h = nnx.relu(getattr(self, name)(h))
        return getattr(self, self.names[-1])(h)


class LeNet5(nnx.Module):
    """LeNet-5-Caffe: conv5x5(20) - ReLU - pool - conv5x5(50) - ReLU - pool - dense 800-500-
    classes, a plain NNX module whose ``gate_placements`` put one gate on every output channel of
    both convolutions and on every input of both dense layers (drop rate 0.5); ``conv_fan`` is
    the fan of the convolutions' He-normal initialisation (fan_in | fan_out).

    conv1's ReLU and pooling run on each CPU batch slice of it before the slices are joined
    (``Conv(then=...)``), so only the pooled quarter of its output is copied. The gates act on
    their readers' rows (conv1's on conv2's input rows: for z >= 0,
    max_pool(relu(z y)) = z max_pool(relu(y)) exactly, in floats too, and conv2 is linear in its
    input), so the network up to conv2 is the same for every gate sample.
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = MNIST_SHAPE,
        channels: tuple[int, int] = (20, 50),
        hidden: int = 500,
        conv_fan: str = "fan_in",
    ):
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        height, width, in_channels = input_shape
        c1, c2 = channels
        kernel = 5
        h2, w2 = (height - kernel + 1) // 2 - kernel + 1, (width - kernel + 1) // 2 - kernel + 1
        if h2 < 2 or w2 < 2:
            raise ValueError(
                f"LeNet-5 needs images of at least 16x16 pixels, got {height}x{width}"
            )
        flat = (h2 // 2) * (w2 // 2) * c2
        self.conv1 = Conv(in_channels, c1, kernel, rngs=rngs, kernel_fan=conv_fan)
        self.conv2 = Conv(c1, c2, kernel, rngs=rngs, kernel_fan=conv_fan)
        self.fc1 = Dense(flat, hidden, rngs=rngs)
        self.fc2 = Dense(hidden, num_classes, rngs=rngs)
        self.gate_placements = (
            GatePlacement("conv1", "conv1", "output", HIDDEN_DROPRATE),
            GatePlacement("conv2", "conv2", "output", HIDDEN_DROPRATE),
            GatePlacement("fc1", "fc1", "input", HIDDEN_DROPRATE),
            GatePlacement("fc2", "fc2", "input", HIDDEN_DROPRATE),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(x, then=lambda y: max_pool(nnx.relu(y)))
        h = max_pool(nnx.relu(self.conv2(h)))
        h = nnx.relu(self.fc1(h.reshape(h.shape[0], -1)))
        return self.fc2(h)
