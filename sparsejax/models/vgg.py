"""VGG networks with BatchNorm for 32x32 images: a configurable :class:`VGG`, and the two
layouts of the papers.

- :class:`VGG16`, the layout of the Dep-L0 code (Li & Ji 2021): thirteen 3x3 convolutions
  (padding "SAME", with bias), each followed by BatchNorm and ReLU, with 2x2 max pooling after
  convolutions 2, 4, 7, 10 and 13: 64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M,
  512, 512, 512, M; then the 1x1x512 map is flattened into one dense layer 512 -> classes. 14.7M
  parameters and 313M multiply-accumulates on a 32x32 image.
- :class:`VGG19`, the layout of the GReg code (Wang et al. 2021, ``model/vgg.py``, from
  EigenDamage and network slimming): sixteen 3x3 convolutions without bias, each followed by
  BatchNorm and ReLU: 64, 64, M, 128, 128, M, 256 x 4, M, 512 x 4, M, 512 x 4 (no pooling after
  the last four), then global average pooling of the 2x2x512 map and one dense layer
  512 -> classes. For CIFAR-100: 20,070,180 kernel weights and dense biases (GReg's "20.07M"),
  20,081,188 parameters with BatchNorm, and 398M multiply-accumulates on a 32x32 image.

Gates: one channel gate per convolution (slot ``"conv{l}"``), multiplied in after the BatchNorm
and before the ReLU. A closed channel removes its kernel slice and, where the convolution has
one, its bias (``gates_bias``: the bias is redundant before BatchNorm but kept as in the Dep-L0
reference, and a closed gate makes it useless), so a gate's group is 9 * C_in (+ 1) parameters.
Accounting: convolution l reads the channels of slot l-1 (the first reads the image), writes
those of slot l; the dense layer reads the channels of the last slot, each tiled over the
positions of the last map when it is flattened (one for CIFAR VGG-16), once when it is averaged.
With ``granularity="weight"`` every kernel, the dense one included, gets weight gates.
``reads``: convolution l reads convolution l-1 (the first reads the image), the dense layer reads
the last convolution (in = channels * flattened positions). ``norm``: convolution l is
normalised by ``bn{l}``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.base import (
    MODEL_INPUT,
    GatedModel,
    GateFactory,
    GateSlot,
    Granularity,
    Layer,
    apply_unit_gate,
    check_granularity,
)
from sparsejax.models.cifar_resnet import CIFAR_SHAPE, batch_norm
from sparsejax.models.layers import Conv, Dense
from sparsejax.models.pooling import max_pool

VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)
"""Output channels of each convolution; "M" is a 2x2 max pooling."""

VGG19_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
    512, 512, 512, 512,
)
"""GReg's VGG-19 (``defaultcfg[19]`` of its ``model/vgg.py``): no pooling after the last block."""

DROPRATE = 0.5

Head = Literal["flatten", "average"]
HEADS: tuple[str, ...] = ("flatten", "average")


class VGG(GatedModel):
    """A VGG-BN for small images: 3x3 convolutions ("M": 2x2 max pooling) given by ``config``,
    each followed by BatchNorm, its channel gate and ReLU, then one dense layer on the last map,
    flattened (``head="flatten"``) or averaged over its positions (``"average"``); see the module
    docstring for the gates."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        config: tuple[int | str, ...],
        num_classes: int = 10,
        input_shape: tuple[int, ...] = CIFAR_SHAPE,
        conv_bias: bool = True,
        head: Head = "flatten",
        gate_factory: GateFactory | None = None,
        granularity: Granularity = "unit",
    ):
        check_granularity(granularity)
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.granularity = granularity
        self.config = tuple(config)
        self.head = head
        height, width, channels = input_shape
        pools = sum(1 for c in self.config if c == "M")
        if height >> pools == 0 or width >> pools == 0:
            raise ValueError(
                f"VGG with {pools} poolings needs images of at least {2 ** pools} pixels a side, "
                f"got {height}x{width}"
            )

        layers, unit_slots = [], []
        previous: str | None = None
        for item in self.config:
            if item == "M":
                height, width = height // 2, width // 2
                continue
            name = f"conv{len(layers) + 1}"
            setattr(self, name, Conv(channels, item, 3, padding="SAME", use_bias=conv_bias,
                                     rngs=rngs))
            setattr(self, f"bn{len(layers) + 1}", batch_norm(item, rngs))
            layer = Layer(
                name, (3, 3, channels, item), height * width, has_bias=conv_bias,
                inputs=self._unit_sources((previous, 1)) if previous else (),
                outputs=self._unit_sources((name, 1)),
                kernel_slot=self._kernel_slot(name),
                reads=(previous or MODEL_INPUT,),
                norm=f"bn{len(layers) + 1}",
            )
            layers.append(layer)
            unit_slots.append(
                GateSlot(name, name, (item,), 3, conv_bias, DROPRATE, layer.kernel_shape)
            )
            previous, channels = name, item
        self.num_convs = len(layers)
        positions = height * width if head == "flatten" else 1
        flat = positions * channels
        self.fc = Dense(flat, num_classes, rngs=rngs)
        layers.append(Layer("fc", (flat, num_classes),
                            inputs=self._unit_sources((previous, positions)),
                            kernel_slot=self._kernel_slot("fc"), reads=(previous,)))
        self._declare(layers, unit_slots, droprate_init=DROPRATE, gate_factory=gate_factory,
                      rngs=rngs)

    def forward(self, x: jax.Array, z: dict[str, jax.Array], *, train: bool) -> jax.Array:
        unit = self.granularity == "unit"
        h, index = x, 0
        for item in self.config:
            if item == "M":
                h = max_pool(h)
                continue
            index += 1
            name = f"conv{index}"
            h = getattr(self, name)(h, self.kernel_gate(z, name))
            h = getattr(self, f"bn{index}")(h, use_running_average=not train)
            if unit:
                h = apply_unit_gate(h, z, name)
            h = nnx.relu(h)
        if self.head == "average":
            h = jnp.mean(h, axis=(1, 2))
        h = h.reshape(h.shape[0], -1)
        return self.fc(h, self.kernel_gate(z, "fc"))


class VGG16(VGG):
    """VGG-16-BN of the Dep-L0 code: convolutions with bias, the 1x1 map flattened."""

    def __init__(self, *, config: tuple[int | str, ...] = VGG16_CONFIG, **kwargs):
        super().__init__(config=config, conv_bias=True, head="flatten", **kwargs)


class VGG19(VGG):
    """VGG-19-BN of the GReg code: convolutions without bias, the last map averaged."""

    def __init__(self, *, config: tuple[int | str, ...] = VGG19_CONFIG, **kwargs):
        super().__init__(config=config, conv_bias=False, head="average", **kwargs)
