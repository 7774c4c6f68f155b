"""A Vision Transformer for small images: ``vit_tiny`` (Dosovitskiy et al. 2021).

NHWC image -> non-overlapping p x p patches, flattened (row-major, channel fastest) and projected
to dim -> [class token] + learned position embeddings -> pre-norm blocks of multi-head attention
and a GELU MLP, LayerNorm -> final LayerNorm -> the class token or the mean over tokens -> dense
logits. 28x28x1 (Fashion-MNIST, 49 patches of 4x4) and 32x32x3 (CIFAR, 64 patches) take the
default patch size 4; the image sides must be multiples of it.

Gates and accounting: :mod:`sparsejax.models.transformer` (multi-head attention, so no
``kv_groups`` family). The patch projection ``"patch_embed"`` (kernel ``(p * p * C, dim)``, at
every patch) writes the hidden units; the class token and the position embeddings are multiplied
by the hidden gate with them (a batch-shared one is folded into the projection's columns and
bias, the token and the position table); the head ``"head"`` (kernel ``(dim, classes)``) reads
them. The attention FLOPs count T = patches + 1 tokens with a class token.

Initialisation: kernels N(0, 1 / fan_in), residual output projections times 1 / sqrt(2 depth),
class token zero, position embeddings N(0, 0.02^2), biases zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.gates.apply import gate_units
from sparsejax.models.base import (
    MODEL_INPUT,
    GateFactory,
    Granularity,
    Layer,
    SlotMember,
    check_granularity,
)
from sparsejax.models.transformer import (
    FAMILIES,
    HIDDEN,
    WEIGHT_DROPRATE,
    Norm,
    TransformerModel,
    check_families,
    projection,
)

POOLINGS: tuple[str, ...] = ("cls", "mean")
POSITION_STD = 0.02


class ViT(TransformerModel):
    """Vision Transformer: ``(batch, H, W, C)`` images -> ``(batch, classes)`` logits.

    ``heads`` and ``mlp_hidden`` take one value for every block or a tuple with one per block;
    0 builds a block without that sublayer (slimmed models).
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (28, 28, 1),
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int | Sequence[int] = 4,
        head_dim: int = 16,
        mlp_hidden: int | Sequence[int] = 128,
        pooling: str = "cls",
        families: tuple[str, ...] = FAMILIES,
        gate_factory: GateFactory | None = None,
        granularity: Granularity = "unit",
    ):
        check_granularity(granularity)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if len(input_shape) != 3:
            raise ConfigError(
                f"vit_tiny reads images (input_shape (H, W, C)), got input_shape {input_shape}; "
                "train it on an image dataset"
            )
        height, width, channels = input_shape
        if height % patch_size or width % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide the image sides {input_shape}")
        self.granularity = granularity
        self.families = check_families(families)
        self.patch_size, self.pooling = patch_size, pooling
        self.input_shape, self.num_classes = (height, width, channels), num_classes
        self.dim, self.head_dim = dim, head_dim
        patches = (height // patch_size) * (width // patch_size)
        tokens = patches + (pooling == "cls")
        patch_features = patch_size * patch_size * channels
        self.patch_embed = projection(patch_features, dim, rngs=rngs, use_bias=True)
        cls_token = jnp.zeros((1, 1, dim), jnp.float32)
        self.cls_token = nnx.Param(cls_token) if pooling == "cls" else None
        self.positions = nnx.Param(
            POSITION_STD * jax.random.normal(rngs.params(), (1, tokens, dim), jnp.float32))
        self._build_blocks(depth, dim, heads=heads, kv_heads=heads, head_dim=head_dim,
                           ffn_hidden=mlp_hidden, norm="layer", ffn="gelu", use_bias=True,
                           causal=False, rotary=False, rngs=rngs)
        self.final_norm = Norm(dim, "layer")
        self.head = projection(dim, num_classes, rngs=rngs, use_bias=True)
        embed = Layer("patch_embed", (patch_features, dim), patches, True,
                      outputs=self._sources((HIDDEN, 1)),
                      kernel_slot=self._kernel_slot("patch_embed"), reads=(MODEL_INPUT,))
        layers, products, slots = [embed], [], []
        for index in range(depth):
            block_layers, block_products, block_slots = self._block_declarations(
                index, positions=tokens, use_bias=True)
            layers += block_layers
            products += block_products
            slots += block_slots
        layers.append(Layer("head", (dim, num_classes), 1, True,
                            inputs=self._sources((HIDDEN, 1)),
                            kernel_slot=self._kernel_slot("head")))
        hidden_params = patch_features + 1 + num_classes + sum(
            self._block_hidden_params(i) for i in range(depth))
        slots = self._slot(HIDDEN, embed, dim, hidden_params, axis=1) + slots
        self.activation_products = tuple(products)
        self._declare(layers, slots, droprate_init=WEIGHT_DROPRATE, gate_factory=gate_factory,
                      rngs=rngs)

    def _stream_members(self) -> list[SlotMember]:
        """The patch projection's columns and bias, the class token and position entries, the
        head's rows and the final norm's scale and bias."""
        members = [SlotMember("patch_embed.kernel", 1), SlotMember("patch_embed.bias", 0)]
        if self.cls_token is not None:
            members.append(SlotMember("cls_token", 2))
        return [*members, SlotMember("positions", 2), SlotMember("head.kernel", 0),
                SlotMember("final_norm.scale", 0), SlotMember("final_norm.bias", 0)]

    def architecture(self) -> dict:
        """The constructor arguments (without ``rngs`` and gates) that build this network's
        shapes: per-block widths, so a slimmed model rebuilds from them."""
        widths = self.block_widths()
        return {
            "num_classes": self.num_classes, "input_shape": self.input_shape,
            "patch_size": self.patch_size, "dim": self.dim, "depth": len(self.blocks),
            "heads": widths["heads"], "head_dim": self.head_dim,
            "mlp_hidden": widths["ffn_hidden"], "pooling": self.pooling,
            "families": self.families, "granularity": self.granularity,
        }

    def patchify(self, x: jax.Array) -> jax.Array:
        """``(B, H, W, C)`` -> ``(B, patches, p * p * C)``, patches row-major."""
        batch, height, width, channels = x.shape
        p = self.patch_size
        x = x.reshape(batch, height // p, p, width // p, p, channels)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, p * p * channels)

    def forward(self, x: jax.Array, z: dict[str, jax.Array], *, train: bool) -> jax.Array:
        hidden = self.hidden_gate(z)
        shared = hidden if hidden is not None and hidden.ndim == 1 else None

        def stream(parameter: jax.Array) -> jax.Array:
            return parameter if shared is None else parameter * shared

        h = self.patch_embed(self.patchify(x), self.kernel_gate(z, "patch_embed"),
                             output_gate=shared)
        if self.cls_token is not None:
            cls = jnp.broadcast_to(stream(self.cls_token[...]), (h.shape[0], 1, h.shape[-1]))
            h = jnp.concatenate([cls, h], axis=1)
        h = h + stream(self.positions[...])
        if hidden is not None and shared is None:
            h = gate_units(h, hidden)
        h = self.final_norm(self._run_blocks(h, z), hidden)
        h = h[:, 0] if self.pooling == "cls" else jnp.mean(h, axis=1)
        return self.head(h, self.kernel_gate(z, "head"))


def vit_tiny(**kwargs) -> ViT:
    """ViT of the defaults: patch 4, dim 64, 4 blocks of 4 heads of 16, MLP 128, class token;
    kwargs as :class:`ViT` (``input_shape=(32, 32, 3)`` for CIFAR)."""
    return ViT(**kwargs)
