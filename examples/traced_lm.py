"""A plain Flax NNX language model, with nothing declared for sparsejax, trained by any method of
the language-model command line: ``--model=MODULE:FACTORY`` traces it on token ids and gates its
heads, head dimensions and MLP units.

    PYTHONPATH=examples python -m experiments.lm --model=traced_lm:small_lm \
        --method=l0_hc --dataset=python_docs --epochs=2 --workdir=runs/traced_lm

The factory takes ``rngs`` and ``num_classes`` (the vocabulary) by keyword and returns a module
that maps ``(batch, T)`` int32 token ids to ``(batch, T, num_classes)`` next-token logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

CONTEXT = 128
"""The longest sequence the learned positions cover (the LM datasets' sequence length)."""


class DecoderBlock(nnx.Module):
    """A pre-norm decoder block: causal self-attention on Flax's own attention, a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.RMSNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=heads, in_features=dim, use_bias=False, decode=False, rngs=rngs
        )
        self.norm2 = nnx.RMSNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, mlp, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(mlp, dim, use_bias=False, rngs=rngs)

    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        h = h + self.attention(self.norm1(h), mask=mask)
        return h + self.down(jax.nn.gelu(self.up(self.norm2(h))))


class SmallLM(nnx.Module):
    """Token and learned position embeddings, decoder blocks, a final RMSNorm and an output
    head of its own."""

    def __init__(
        self, *, rngs: nnx.Rngs, num_classes: int, dim: int = 64, depth: int = 2,
        heads: int = 4, mlp: int = 128,
    ):
        self.tokens = nnx.Embed(num_classes, dim, rngs=rngs)
        self.positions = nnx.Embed(CONTEXT, dim, rngs=rngs)
        self.blocks = nnx.List([DecoderBlock(dim, heads, mlp, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.RMSNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, use_bias=False, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        h = self.tokens(ids) + self.positions(jnp.arange(ids.shape[1]))
        mask = nnx.make_causal_mask(ids)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h))


def small_lm(*, rngs: nnx.Rngs, num_classes: int) -> SmallLM:
    """The factory named on the command line."""
    return SmallLM(rngs=rngs, num_classes=num_classes)
