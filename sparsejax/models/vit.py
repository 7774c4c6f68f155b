"""A Vision Transformer for small images: ``vit_tiny`` (Dosovitskiy et al. 2021).

NHWC image -> non-overlapping p x p patches, flattened (row-major, channel fastest) and projected
to dim -> [class token] + learned position embeddings -> pre-norm blocks of multi-head attention
and a GELU MLP, LayerNorm -> final LayerNorm -> the class token or the mean over tokens -> dense
logits. 28x28x1 (Fashion-MNIST, 49 patches of 4x4) and 32x32x3 (CIFAR, 64 patches) take the
default patch size 4; the image sides must be multiples of it.

Gates: the ViT is a plain NNX module gated from its trace
(:class:`~sparsejax.structure.traced_model.TracedModel`), its blocks those of
:mod:`sparsejax.models.transformer`. Its ``gate_placements`` give the families of ``families``
(multi-head attention, so no ``kv_groups``): per block the heads, the sublayers ``attn`` and
``mlp`` and the MLP units ``ffn`` (:func:`~sparsejax.models.transformer.block_placements`), and
the hidden dimension ``hidden``, the residual stream that the patch projection ``patch_embed``
starts (with the class token and the position embeddings), every block writes and every norm
reads: a stream placement (``stream`` naming the norms), whose gates multiply every write into
the stream and whose norms take their statistics over the open dimensions, so that a closed
dimension is the network without it. The methods that prune units (GReg, gmp) take these
slots too (``prunes_placed``): heads and FFN units, as Voita et al. (2019) and CoFi prune them.
The attention products count T = patches + 1 tokens with
a class token. Initial drop rate 0.1 (:data:`~sparsejax.models.transformer.DROPRATE`).

Initialisation: kernels N(0, 1 / fan_in), residual output projections times 1 / sqrt(2 depth),
class token zero, position embeddings N(0, 0.02^2), biases zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.models.placement import GatePlacement
from sparsejax.models.transformer import (
    DROPRATE,
    FAMILIES,
    HIDDEN,
    Norm,
    block_placements,
    check_families,
    norm_paths,
    projection,
    transformer_blocks,
)

POOLINGS: tuple[str, ...] = ("cls", "mean")
POSITION_STD = 0.02


class ViT(nnx.Module):
    """Vision Transformer: ``(batch, H, W, C)`` images -> ``(batch, classes)`` logits, with the
    ``gate_placements`` of ``families`` (module docstring)."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (28, 28, 1),
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        head_dim: int = 16,
        mlp_hidden: int = 128,
        pooling: str = "cls",
        families: tuple[str, ...] = FAMILIES,
    ):
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
        self.patch_size, self.pooling = patch_size, pooling
        self.input_shape, self.num_classes = (height, width, channels), num_classes
        patches = (height // patch_size) * (width // patch_size)
        tokens = patches + (pooling == "cls")
        self.patch_embed = projection(patch_size * patch_size * channels, dim, rngs=rngs,
                                      use_bias=True)
        cls_token = jnp.zeros((1, 1, dim), jnp.float32)
        self.cls_token = nnx.Param(cls_token) if pooling == "cls" else None
        self.positions = nnx.Param(
            POSITION_STD * jax.random.normal(rngs.params(), (1, tokens, dim), jnp.float32))
        self.blocks = transformer_blocks(
            depth, dim, heads=heads, kv_heads=heads, head_dim=head_dim, ffn_hidden=mlp_hidden,
            norm="layer", ffn="gelu", use_bias=True, causal=False, rotary=False, rngs=rngs)
        self.final_norm = Norm(dim, "layer")
        self.head = projection(dim, num_classes, rngs=rngs, use_bias=True)
        families = check_families(families)
        hidden = [GatePlacement(HIDDEN, "patch_embed", "output", DROPRATE,
                                stream=norm_paths(self))] if HIDDEN in families else []
        self.gate_placements = tuple(hidden + block_placements(self.blocks, families))
        self.prunes_placed = True

    def patchify(self, x: jax.Array) -> jax.Array:
        """``(B, H, W, C)`` -> ``(B, patches, p * p * C)``, patches row-major."""
        batch, height, width, channels = x.shape
        p = self.patch_size
        x = x.reshape(batch, height // p, p, width // p, p, channels)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, p * p * channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.patch_embed(self.patchify(x))
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...], (h.shape[0], 1, h.shape[-1]))
            h = jnp.concatenate([cls, h], axis=1)
        h = h + self.positions[...]
        for block in self.blocks:
            h = block(h)
        h = self.final_norm(h)
        h = h[:, 0] if self.pooling == "cls" else jnp.mean(h, axis=1)
        return self.head(h)


def vit_tiny(**kwargs) -> ViT:
    """ViT of the defaults: patch 4, dim 64, 4 blocks of 4 heads of 16, MLP 128, class token;
    kwargs as :class:`ViT` (``input_shape=(32, 32, 3)`` for CIFAR)."""
    return ViT(**kwargs)
