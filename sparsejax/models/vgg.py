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

Gates: the VGGs are plain NNX modules, gated from their trace
(:class:`~sparsejax.structure.traced_model.TracedModel`); their ``gate_placements`` put one
channel gate on the output of every convolution (slot ``"conv{l}"``, the Dep-L0 placement,
initial drop rate 0.5). The gates act on the channels' readers: since a gate z >= 0 commutes
with ReLU and max pooling, this is multiplying after the BatchNorm and before the ReLU, as the
reference does. A gate's group ``|g|`` is the channel's kernel slice and, where the convolution
has one, its bias: 9 * C_in (+ 1) parameters (the bias is redundant before BatchNorm but kept as
in the Dep-L0 reference); slimming a closed channel also removes its BatchNorm entries and the
next layer's rows that read it. The dense layer reads the last map flattened (each channel tiled
over the positions of the last map: one for CIFAR VGG-16) or averaged. With
``granularity="weight"`` every kernel, the dense one included, gets weight gates.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.cifar_resnet import CIFAR_SHAPE, batch_norm
from sparsejax.models.layers import Conv, Dense
from sparsejax.models.placement import GatePlacement
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


class VGG(nnx.Module):
    """A VGG-BN for small images: 3x3 convolutions ("M": 2x2 max pooling) given by ``config``,
    each followed by BatchNorm and ReLU, then one dense layer on the last map, flattened
    (``head="flatten"``) or averaged over its positions (``"average"``). A plain NNX module
    (BatchNorm's mode from ``train()`` / ``eval()``) whose ``gate_placements`` gate every
    convolution's output channels (module docstring)."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        config: tuple[int | str, ...],
        num_classes: int = 10,
        input_shape: tuple[int, ...] = CIFAR_SHAPE,
        conv_bias: bool = True,
        head: Head = "flatten",
    ):
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.config = tuple(config)
        self.head = head
        height, width, channels = input_shape
        pools = sum(1 for c in self.config if c == "M")
        if height >> pools == 0 or width >> pools == 0:
            raise ValueError(
                f"VGG with {pools} poolings needs images of at least {2 ** pools} pixels a side, "
                f"got {height}x{width}"
            )
        widths = [c for c in self.config if c != "M"]
        self.num_convs = len(widths)
        for index, out in enumerate(widths, start=1):
            setattr(self, f"conv{index}", Conv(channels, out, 3, padding="SAME",
                                               use_bias=conv_bias, rngs=rngs))
            setattr(self, f"bn{index}", batch_norm(out, rngs))
            channels = out
        positions = (height >> pools) * (width >> pools) if head == "flatten" else 1
        self.fc = Dense(positions * channels, num_classes, rngs=rngs)
        self.gate_placements = tuple(
            GatePlacement(f"conv{index}", f"conv{index}", "output", DROPRATE)
            for index in range(1, self.num_convs + 1)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h, index = x, 0
        for item in self.config:
            if item == "M":
                h = max_pool(h)
                continue
            index += 1
            h = getattr(self, f"conv{index}")(h)
            h = nnx.relu(getattr(self, f"bn{index}")(h))
        if self.head == "average":
            h = jnp.mean(h, axis=(1, 2))
        return self.fc(h.reshape(h.shape[0], -1))


class VGG16(VGG):
    """VGG-16-BN of the Dep-L0 code: convolutions with bias, the 1x1 map flattened."""

    def __init__(self, *, config: tuple[int | str, ...] = VGG16_CONFIG, **kwargs):
        super().__init__(config=config, conv_bias=True, head="flatten", **kwargs)


class VGG19(VGG):
    """VGG-19-BN of the GReg code: convolutions without bias, the last map averaged."""

    def __init__(self, *, config: tuple[int | str, ...] = VGG19_CONFIG, **kwargs):
        super().__init__(config=config, conv_bias=False, head="average", **kwargs)
