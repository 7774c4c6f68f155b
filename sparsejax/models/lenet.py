"""LeNet-300-100 (the MLP 784-300-100-10) and LeNet-5-Caffe (20-50-800-500).

Gate placement follows Louizos et al. (2018) and Li & Ji (2019):
- MLP: gates on the inputs of each of the three dense layers (784, 300 and 100 gates); initial
  drop rate 0.2 on the pixels and 0.5 elsewhere. The MLP is a plain NNX module with these
  placements (:mod:`sparsejax.models.placement`); its slots, counts and slimming come from its
  trace (:class:`~sparsejax.structure.traced_model.TracedModel`).
- LeNet-5-Caffe: gates on the output channels of both convolutions (20, 50) and on the inputs of
  both dense layers (800, 500); initial drop rate 0.5. The architecture string "a-b-c-d" counts
  the active gates of these four slots.
With ``granularity="weight"`` every kernel entry gets its own gate instead.

Initialisation as the reference codes (:mod:`sparsejax.models.layers`): kernels He-normal with
the fan-in, N(0, 2 / fan_in), biases zero; LeNet-5's convolutions take ``conv_fan="fan_out"``
(N(0, 2 / (25 * out))) for L0-ARM, whose code initialises them so
(:meth:`sparsejax.methods.base.Method.model_options`).

LeNet-5's ``reads`` (the producer of each layer's input): every layer reads the one before it,
the first reads the image. fc1 reads conv2's map flattened (NHWC order, channel fastest): its
inputs are the 50 channels of conv2 at the 4 * 4 positions left after pooling (800 = 50 * 16, the
tile count of ``conv2`` in its inputs). The dense layers read their input through an input
selection, so that a slimmed model drops the flattened positions whose own input gates are
closed.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from sparsejax.models.base import (
    MODEL_INPUT,
    GatedModel,
    GateFactory,
    GateSlot,
    Granularity,
    Layer,
    check_granularity,
)
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


class LeNet5(GatedModel):
    """LeNet-5-Caffe: conv5x5(20) - pool - conv5x5(50) - pool - dense 800-500-classes;
    ``conv_fan`` is the fan of the convolutions' He-normal initialisation (fan_in | fan_out).

    Batch-shared gates z >= 0 on conv1's channels multiply conv2's input rows: for z >= 0,
    max_pool(relu(z y)) = z max_pool(relu(y)) exactly (in floats too: rounding z y is
    monotone in y), and conv2 is linear in its input, so conv2(z p, W) = conv2(p, z[:, None] W).
    The network up to conv2 is then the same for every gate sample, and the kernel multiply is
    as cheap as on conv1's outputs; L0-ARM's step became faster with it (XLA still compiles
    conv1 once per forward pass: the two passes' copies are not merged).
    Every gate of the package is nonnegative. Gates drawn per example multiply conv1's outputs.
    conv1's ReLU and pooling run on each CPU batch slice of it before the slices are joined
    (``Conv(then=...)``), so only the pooled quarter of its output is copied.
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = MNIST_SHAPE,
        channels: tuple[int, int] = (20, 50),
        hidden: int = 500,
        gate_factory: GateFactory | None = None,
        granularity: Granularity = "unit",
        conv_fan: str = "fan_in",
    ):
        check_granularity(granularity)
        self.granularity = granularity
        height, width, in_channels = input_shape
        c1, c2 = channels
        kernel = 5
        h1, w1 = height - kernel + 1, width - kernel + 1
        h2, w2 = h1 // 2 - kernel + 1, w1 // 2 - kernel + 1
        positions = (h2 // 2) * (w2 // 2)
        flat = positions * c2
        self.conv1 = Conv(in_channels, c1, kernel, rngs=rngs, kernel_fan=conv_fan)
        self.conv2 = Conv(c1, c2, kernel, rngs=rngs, kernel_fan=conv_fan)
        self.fc1 = Dense(flat, hidden, rngs=rngs)
        self.fc2 = Dense(hidden, num_classes, rngs=rngs)
        layers = [
            Layer("conv1", (kernel, kernel, in_channels, c1), h1 * w1,
                  outputs=self._unit_sources(("conv1", 1)), kernel_slot=self._kernel_slot("conv1"),
                  reads=(MODEL_INPUT,)),
            Layer("conv2", (kernel, kernel, c1, c2), h2 * w2,
                  inputs=self._unit_sources(("conv1", 1)),
                  outputs=self._unit_sources(("conv2", 1)),
                  kernel_slot=self._kernel_slot("conv2"), reads=("conv1",)),
            Layer("fc1", (flat, hidden),
                  inputs=self._unit_sources(("fc1", 1), ("conv2", positions)),
                  outputs=self._unit_sources(("fc2", 1)), kernel_slot=self._kernel_slot("fc1"),
                  reads=("conv2",), input_selection=True),
            Layer("fc2", (hidden, num_classes), inputs=self._unit_sources(("fc2", 1)),
                  kernel_slot=self._kernel_slot("fc2"), reads=("fc1",), input_selection=True),
        ]
        unit_slots = [
            GateSlot("conv1", "conv1", (c1,), 3, True, HIDDEN_DROPRATE, layers[0].kernel_shape),
            GateSlot("conv2", "conv2", (c2,), 3, True, HIDDEN_DROPRATE, layers[1].kernel_shape),
            GateSlot("fc1", "fc1", (flat,), 0, False, HIDDEN_DROPRATE, layers[2].kernel_shape),
            GateSlot("fc2", "fc2", (hidden,), 0, False, HIDDEN_DROPRATE, layers[3].kernel_shape),
        ]
        self._declare(layers, unit_slots, droprate_init=HIDDEN_DROPRATE,
                      gate_factory=gate_factory, rngs=rngs)

    def forward(self, x: jax.Array, z: dict[str, jax.Array], *, train: bool) -> jax.Array:
        first = self.output_gate(z, "conv1")
        shared = first is not None and first.ndim == 1
        h = self.conv1(
            x, self.kernel_gate(z, "conv1"), None if shared else first,
            then=lambda y: max_pool(nnx.relu(y)),
        )
        h = self.conv2(
            h, self.kernel_gate(z, "conv2"), self.output_gate(z, "conv2"),
            first if shared else None,
        )
        h = max_pool(nnx.relu(h))
        h = self.select_inputs(h.reshape(h.shape[0], -1), "fc1")
        h = nnx.relu(self.fc1(h, self.kernel_gate(z, "fc1"), self.input_gate(z, "fc1")))
        h = self.select_inputs(h, "fc2")
        return self.fc2(h, self.kernel_gate(z, "fc2"), self.input_gate(z, "fc2"))
