"""DenseNet for CIFAR without bottlenecks or compression (Huang et al. 2017, section 3-4).

Architecture of DenseNet-(3m + 4), growth rate k: a 3x3 convolution 3 -> 2k, then three dense
blocks of m layers joined by two transitions, then BN - ReLU - global average pooling - dense
layer -> classes. The initial width 2k is that of the network-slimming code (Liu et al. 2017);
Huang et al. use 16 (``initial_features=16``: 1,019,722 parameters for DenseNet-40, the
"1.0M"/"1.02M" of the papers, where 2k = 24 gives 1,059,298, the "1.06M").

- Dense layer: BN - ReLU - conv3x3(C -> k) on the concatenation of every feature map of its block
  so far (the block input, then each earlier layer's k new channels, in order); its k channels are
  appended, so layer j of a block reads C_0 + (j - 1) k channels.
- Transition: BN - ReLU - conv1x1(C -> C) - 2x2 average pooling (no compression).
Convolutions have no bias and pad one pixel (3x3). DenseNet-40 (m = 12, k = 12) has widths
24 -> 168 | 168 -> 312 | 312 -> 456, 1,059,298 parameters for 10 classes (BatchNorm included)
and 282.9M multiply-accumulates on a 32x32 image.

Gate placement (network slimming's ``channel_selection``, pre-activation): one channel gate
right after every BatchNorm that precedes a convolution or the classifier, i.e.
BN -> gate -> ReLU -> conv. The gate slot of a dense layer, a transition or the classifier is
named after that consumer (``"block{b}.layer{j}"``, ``"trans{b}"``, ``"fc"``) and has one gate per
*input* channel of it. Gating after the BatchNorm means no normalisation undoes the gate, and a
nonnegative gate commutes with the ReLU. Each consumer normalises and gates the shared features on
its own, so a closed gate removes one input channel (kernel slice) of that consumer only; the
producer's channel lives on as long as another consumer reads it, and is therefore not declared
as gated.

Declarations (for :mod:`sparsejax.structure.accounting` and slimming):
- every dense layer, transition and the classifier: ``inputs`` = its own slot, ``outputs`` = none;
- the initial convolution (``"stem"``): no gated units;
- ``reads``: the stem reads :data:`~sparsejax.models.base.MODEL_INPUT`; a consumer in block b reads
  the block input (``"stem"`` for block 1, ``"trans{b-1}"`` after) followed by the earlier dense
  layers of its block in order; ``trans{b}`` and ``fc`` read the whole of block b that way.
- ``input_norm``: each consumer's own BatchNorm (``final_bn`` for the classifier); every consumer
  reads its input through an input selection, so that a slimmed model drops the features its gates
  closed while later consumers still read them.
With ``granularity="weight"`` every kernel gets its own weight gates instead and no unit is gated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.gates.apply import gate_units
from sparsejax.models.base import (
    MODEL_INPUT,
    GatedModel,
    GateFactory,
    GateSlot,
    Granularity,
    Layer,
    check_granularity,
)
from sparsejax.models.cifar_resnet import CIFAR_SHAPE, PAD_ONE, batch_norm
from sparsejax.models.layers import Conv, Dense

NUM_BLOCKS = 3
NON_BLOCK_LAYERS = 4
"""The initial convolution, two transitions and the classifier: depth = 3m + 4."""

GROWTH_RATE = 12
DROPRATE = 0.5
POOL = 2
"""Transitions halve the spatial size with 2x2 average pooling."""


def _normalized_and_gated(
    bn: nnx.BatchNorm, x: jax.Array, train: bool, unit_gate: jax.Array | None
) -> jax.Array:
    """ReLU(gate * BN(x)): the pre-activation of a consumer, gated after its BatchNorm."""
    h = bn(x, use_running_average=not train)
    if unit_gate is not None:
        h = gate_units(h, unit_gate)
    return nnx.relu(h)


class DenseLayer(nnx.Module):
    """BN - [gate] - ReLU - conv3x3(C -> k); returns the input with the k new channels appended."""

    def __init__(self, in_features: int, growth_rate: int, *, rngs: nnx.Rngs):
        self.bn = batch_norm(in_features, rngs)
        self.conv = Conv(in_features, growth_rate, 3, padding=PAD_ONE, use_bias=False, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        unit_gate: jax.Array | None = None,
        kernel_gate: jax.Array | None = None,
        reads: jax.Array | None = None,
    ) -> jax.Array:
        """``reads``: the channels of x that the layer reads (all of x when None)."""
        h = _normalized_and_gated(self.bn, x if reads is None else reads, train, unit_gate)
        return jnp.concatenate([x, self.conv(h, kernel_gate)], axis=-1)


class Transition(nnx.Module):
    """BN - [gate] - ReLU - conv1x1(C -> C) - 2x2 average pooling."""

    def __init__(self, features: int, *, rngs: nnx.Rngs):
        self.bn = batch_norm(features, rngs)
        self.conv = Conv(features, features, 1, use_bias=False, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        unit_gate: jax.Array | None = None,
        kernel_gate: jax.Array | None = None,
    ) -> jax.Array:
        h = self.conv(_normalized_and_gated(self.bn, x, train, unit_gate), kernel_gate)
        return nnx.avg_pool(h, window_shape=(POOL, POOL), strides=(POOL, POOL))


def _dense_layer_name(block: int, index: int) -> str:
    return f"block{block}.layer{index}"


class DenseNet(GatedModel):
    """DenseNet-(3m + 4) for CIFAR, no bottleneck or compression; see the module docstring."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        depth: int = 40,
        growth_rate: int = GROWTH_RATE,
        initial_features: int | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = CIFAR_SHAPE,
        gate_factory: GateFactory | None = None,
        granularity: Granularity = "unit",
    ):
        check_granularity(granularity)
        if depth < NON_BLOCK_LAYERS + NUM_BLOCKS or (depth - NON_BLOCK_LAYERS) % NUM_BLOCKS:
            raise ValueError(f"a DenseNet has depth 3m + 4 with m >= 1, got {depth}")
        if growth_rate < 1:
            raise ValueError(f"growth_rate must be a positive integer, got {growth_rate}")
        height, width, in_channels = input_shape
        shrink = POOL ** (NUM_BLOCKS - 1)
        if height < shrink or width < shrink:
            raise ValueError(
                f"DenseNet's {NUM_BLOCKS - 1} transitions need images of at least {shrink} pixels "
                f"a side, got {height}x{width}"
            )
        self.granularity = granularity
        self.depth = depth
        self.layers_per_block = (depth - NON_BLOCK_LAYERS) // NUM_BLOCKS
        unit = granularity == "unit"
        channels = 2 * growth_rate if initial_features is None else initial_features

        self.stem = Conv(in_channels, channels, 3, padding=PAD_ONE, use_bias=False, rngs=rngs)
        layers = [
            Layer("stem", (3, 3, in_channels, channels), height * width, has_bias=False,
                  kernel_slot=self._kernel_slot("stem"), reads=(MODEL_INPUT,)),
        ]
        unit_slots: list[GateSlot] = []

        def add_consumer(layer: Layer, axis: int) -> None:
            """Declare a layer whose inputs are gated by the slot named after it."""
            if unit:
                layer = dataclasses.replace(layer, inputs=((layer.name, 1),))
                unit_slots.append(GateSlot(layer.name, layer.name, (layer.in_units,), axis,
                                           False, DROPRATE, layer.kernel_shape))
            else:
                layer = dataclasses.replace(layer, kernel_slot=layer.name)
            layers.append(dataclasses.replace(layer, input_selection=True))

        blocks, transitions = [], []
        block_input = "stem"
        for b in range(1, NUM_BLOCKS + 1):
            block, features = [], [block_input]
            for j in range(1, self.layers_per_block + 1):
                block.append(DenseLayer(channels, growth_rate, rngs=rngs))
                add_consumer(Layer(_dense_layer_name(b, j), (3, 3, channels, growth_rate),
                                   height * width, has_bias=False, reads=tuple(features),
                                   input_norm=f"blocks.{b - 1}.{j - 1}.bn"), axis=2)
                features.append(_dense_layer_name(b, j))
                channels += growth_rate
            blocks.append(nnx.List(block))
            if b < NUM_BLOCKS:
                transitions.append(Transition(channels, rngs=rngs))
                add_consumer(Layer(f"trans{b}", (1, 1, channels, channels), height * width,
                                   has_bias=False, reads=tuple(features),
                                   input_norm=f"transitions.{b - 1}.bn"), axis=2)
                block_input = f"trans{b}"
                height, width = height // POOL, width // POOL
        self.blocks = nnx.List(blocks)
        self.transitions = nnx.List(transitions)
        self.final_bn = batch_norm(channels, rngs)
        self.fc = Dense(channels, num_classes, rngs=rngs)
        add_consumer(Layer("fc", (channels, num_classes), reads=tuple(features),
                           input_norm="final_bn"), axis=0)
        self._declare(layers, unit_slots, droprate_init=DROPRATE, gate_factory=gate_factory,
                      rngs=rngs)

    def layer_module(self, name: str) -> nnx.Module:
        """``"stem"``, ``"fc"``, ``"trans{b}"`` or ``"block{b}.layer{j}"``."""
        if name.startswith("block"):
            block, index = name.split(".")
            return self.blocks[int(block.removeprefix("block")) - 1][
                int(index.removeprefix("layer")) - 1
            ].conv
        if name.startswith("trans"):
            return self.transitions[int(name.removeprefix("trans")) - 1].conv
        return getattr(self, name)

    def forward(self, x: jax.Array, z: dict[str, jax.Array], *, train: bool) -> jax.Array:
        unit = self.granularity == "unit"

        def unit_gate(slot: str) -> jax.Array | None:
            return z.get(slot) if unit else None

        h = self.stem(x, self.kernel_gate(z, "stem"))
        for b, block in enumerate(self.blocks, start=1):
            for j, layer in enumerate(block, start=1):
                name = _dense_layer_name(b, j)
                h = layer(h, train=train, unit_gate=unit_gate(name),
                          kernel_gate=self.kernel_gate(z, name),
                          reads=self.select_inputs(h, name))
            if b < NUM_BLOCKS:
                name = f"trans{b}"
                h = self.transitions[b - 1](self.select_inputs(h, name), train=train,
                                            unit_gate=unit_gate(name),
                                            kernel_gate=self.kernel_gate(z, name))
        h = self.select_inputs(h, "fc")
        h = jnp.mean(_normalized_and_gated(self.final_bn, h, train, unit_gate("fc")), axis=(1, 2))
        return self.fc(h, self.kernel_gate(z, "fc"))


def densenet40(**kwargs) -> DenseNet:
    """DenseNet-40, growth rate 12 (Huang et al. 2017); kwargs as :class:`DenseNet`."""
    return DenseNet(depth=40, growth_rate=GROWTH_RATE, **kwargs)
