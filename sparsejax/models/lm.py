"""A decoder-only byte-level language model: ``lm_tiny``.

Tokens -> embedding -> pre-norm blocks of causal grouped-query attention (Ainslie et al. 2023)
with rotary positions (Su et al. 2021) and a SwiGLU FFN (Shazeer 2020), RMSNorm (Zhang & Sennrich
2019) -> final RMSNorm -> next-token logits, as in LLaMA (Touvron et al. 2023) at a small size.
No biases. The output head is the embedding matrix (tied, Press & Wolf 2017) or a separate one.
``input_shape`` is ``(T,)``, the context length the FLOPs are counted at (shorter sequences
also run); ``num_classes`` is the vocabulary (next-token classes).

Gates: the LM is a plain NNX module gated from its trace
(:class:`~sparsejax.structure.traced_model.TracedModel`), its blocks those of
:mod:`sparsejax.models.transformer`. Its ``gate_placements`` give the families of ``families``:
per block the query heads (inside the key/value groups: the trace tags them), the key/value
groups, the sublayers ``attn`` and ``mlp`` and the FFN units ``ffn``
(:func:`~sparsejax.models.transformer.block_placements`), and the hidden dimension ``hidden``,
the residual stream that the embedding lookup starts, every block writes, every norm reads and
the head reads: a stream placement on the head's inputs (the tied embedding's, or the separate
head's). The methods that prune units (GReg, gmp) take these slots too (``prunes_placed``).

The embedding is a ``(dim, vocab)`` kernel whose column t is token t's embedding (the lookup
reads ``W^T[t]``); tied, the head is ``h @ W``.

Initialisation: every kernel N(0, 1 / fan_in) (the embedding's fan-in is dim, so a lookup has
entries of variance 1 / dim and tied logits of unit variance), the residual branches' output
projections additionally times 1 / sqrt(2 depth) (GPT-2, Radford et al. 2019).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.models.base import GatedModel
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

BYTE_VOCAB = 256


class DecoderLM(nnx.Module):
    """Causal LM: ``(batch, T)`` int tokens -> ``(batch, T, vocab)`` next-token logits, with the
    ``gate_placements`` of ``families`` (module docstring)."""

    input_dtype = jnp.int32

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        num_classes: int = BYTE_VOCAB,
        input_shape: tuple[int, ...] = (128,),
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        kv_heads: int = 2,
        head_dim: int = 32,
        ffn_hidden: int = 384,
        tied: bool = True,
        families: tuple[str, ...] = FAMILIES,
    ):
        if len(input_shape) != 1:
            raise ConfigError(
                f"lm_tiny reads token sequences (input_shape (T,)), got input_shape {input_shape}; "
                "train it on a text dataset (python_docs, python_sources)"
            )
        (context,) = input_shape
        self.input_shape, self.num_classes = (int(context),), num_classes
        self.embed = projection(dim, num_classes, rngs=rngs, use_bias=False)
        self.blocks = transformer_blocks(
            depth, dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, ffn_hidden=ffn_hidden,
            norm="rms", ffn="swiglu", use_bias=False, causal=True, rotary=True, rngs=rngs)
        self.final_norm = Norm(dim, "rms")
        self.head = None if tied else projection(dim, num_classes, rngs=rngs, use_bias=False)
        families = check_families(families)
        hidden = [GatePlacement(HIDDEN, "embed" if tied else "head", "input", DROPRATE,
                                stream=norm_paths(self))] if HIDDEN in families else []
        self.gate_placements = tuple(hidden + block_placements(self.blocks, families))
        self.prunes_placed = True

    def __call__(self, x: jax.Array) -> jax.Array:
        table = self.embed.kernel[...]
        h = table.T[x]
        for block in self.blocks:
            h = block(h)
        h = self.final_norm(h)
        return h @ table if self.head is None else self.head(h)


def lm_tiny(**kwargs) -> DecoderLM:
    """The byte-level LM of the defaults: dim 128, 4 blocks, 4 query heads in 2 KV groups of
    head_dim 32, SwiGLU 384, tied embeddings, context 128 (0.82M parameters)."""
    return DecoderLM(**kwargs)


def _logits_of(model) -> tuple[Callable[[object, jax.Array], jax.Array], object, int]:
    """The evaluation logits of ``model`` as a function of its state and a batch of tokens, its
    state, and its context: a gated LM (``model(x, train=False)``: test-time gates; its
    network's context), a plain LM, or a slim function
    (:class:`~sparsejax.structure.slim_trace.SlimFunction`, at the context it was traced at)."""
    if not isinstance(model, nnx.Module):  # a slim function
        return (lambda _, tokens: model(tokens)), None, model.input_spec.shape[1]
    graphdef, state = nnx.split(model)
    gated = isinstance(model, GatedModel)

    def logits(state: nnx.State, tokens: jax.Array) -> jax.Array:
        merged = nnx.merge(graphdef, state)
        return merged(tokens, train=False) if gated else merged(tokens)

    return logits, state, (model.net if gated else model).input_shape[0]


def generate(model, prompt: bytes, steps: int, *, window: int | None = None) -> bytes:
    """Greedy decoding: ``steps`` bytes after ``prompt``, each the argmax of the evaluation
    logits of ``model`` (a gated LM with its test-time gates, a plain LM, or a slim function)
    at the last position given everything before it (the prompt and the bytes generated so
    far; the last ``window`` of them, default the model's context, when longer).

    Every step runs the model on a fixed-length buffer (the tokens, right-padded; causal
    attention makes the padding invisible to earlier positions), so it compiles once. The same
    inputs give the same bytes.
    """
    if not prompt:
        raise ValueError("generate needs a prompt of at least one byte")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    logits, state, context = _logits_of(model)
    window = window or context

    @jax.jit
    def next_token(state, tokens: jax.Array, last: jax.Array) -> jax.Array:
        return jnp.argmax(logits(state, tokens[None])[0, last])

    tokens = list(prompt)
    for _ in range(steps):
        recent = tokens[-window:]
        buffer = np.zeros(window, np.int32)
        buffer[:len(recent)] = recent
        tokens.append(int(next_token(state, jnp.asarray(buffer), len(recent) - 1)))
    return bytes(tokens[len(prompt):])
