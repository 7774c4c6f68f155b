"""A decoder-only byte-level language model: ``lm_tiny``.

Tokens -> embedding -> pre-norm blocks of causal grouped-query attention (Ainslie et al. 2023)
with rotary positions (Su et al. 2021) and a SwiGLU FFN (Shazeer 2020), RMSNorm (Zhang & Sennrich
2019) -> final RMSNorm -> next-token logits, as in LLaMA (Touvron et al. 2023) at a small size.
No biases. The output head is the embedding matrix (tied, Press & Wolf 2017) or a separate one.

Gates and accounting: :mod:`sparsejax.models.transformer`. The embedding is declared as the
layer ``"embed"`` with kernel ``(dim, vocab)`` (the lookup reads its column per token, ``W^T[t]``),
inputs gated by ``hidden``: tied, it is also the head and costs dim * vocab MACs per token
(``out_positions`` = T); untied, the lookup costs nothing (``out_positions`` = 0) and the head is
the layer ``"head"``. ``input_shape`` is ``(T,)``, the context length the FLOPs are counted at
(shorter sequences also run); ``num_classes`` is the vocabulary (next-token classes).

Initialisation: every kernel N(0, 1 / fan_in) (the embedding's fan-in is dim, so a lookup has
entries of variance 1 / dim and tied logits of unit variance), the residual branches' output
projections additionally times 1 / sqrt(2 depth) (GPT-2, Radford et al. 2019).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.gates.apply import gate_units
from sparsejax.models.base import (
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

BYTE_VOCAB = 256


class DecoderLM(TransformerModel):
    """Causal LM: ``(batch, T)`` int tokens -> ``(batch, T, vocab)`` next-token logits.

    ``heads``, ``kv_heads`` and ``ffn_hidden`` take one value for every block or a tuple with one
    per block; 0 heads (or FFN units) builds a block without that sublayer (slimmed models).
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        num_classes: int = BYTE_VOCAB,
        input_shape: tuple[int, ...] = (128,),
        dim: int = 128,
        depth: int = 4,
        heads: int | Sequence[int] = 4,
        kv_heads: int | Sequence[int] = 2,
        head_dim: int = 32,
        ffn_hidden: int | Sequence[int] = 384,
        tied: bool = True,
        families: tuple[str, ...] = FAMILIES,
        gate_factory: GateFactory | None = None,
        granularity: Granularity = "unit",
    ):
        check_granularity(granularity)
        self.granularity = granularity
        self.families = check_families(families)
        if len(input_shape) != 1:
            raise ConfigError(
                f"lm_tiny reads token sequences (input_shape (T,)), got input_shape {input_shape}; "
                "train it on a text dataset (python_docs, python_sources)"
            )
        (context,) = input_shape
        vocab = num_classes
        self.tied = tied
        self.input_shape, self.num_classes = (int(context),), vocab
        self.dim, self.head_dim = dim, head_dim
        self.embed = projection(dim, vocab, rngs=rngs, use_bias=False)
        self._build_blocks(depth, dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                           ffn_hidden=ffn_hidden, norm="rms", ffn="swiglu", use_bias=False,
                           causal=True, rotary=True, rngs=rngs)
        self.final_norm = Norm(dim, "rms")
        self.head = None if tied else projection(dim, vocab, rngs=rngs, use_bias=False)
        embed = Layer("embed", (dim, vocab), context if tied else 0, False,
                      inputs=self._sources((HIDDEN, 1)), kernel_slot=self._kernel_slot("embed"))
        layers, products, slots = [embed], [], []
        for index in range(depth):
            block_layers, block_products, block_slots = self._block_declarations(
                index, positions=context, use_bias=False)
            layers += block_layers
            products += block_products
            slots += block_slots
        if not tied:
            layers.append(Layer("head", (dim, vocab), context, False,
                                inputs=self._sources((HIDDEN, 1)),
                                kernel_slot=self._kernel_slot("head")))
        hidden_params = vocab * (1 if tied else 2) + sum(
            self._block_hidden_params(i) for i in range(depth))
        slots = self._slot(HIDDEN, embed, dim, hidden_params) + slots
        self.activation_products = tuple(products)
        self._declare(layers, slots, droprate_init=WEIGHT_DROPRATE, gate_factory=gate_factory,
                      rngs=rngs)

    def _stream_members(self) -> list[SlotMember]:
        """The embedding's rows (the table and, tied, the head), an untied head's rows and the
        final norm's scale."""
        members = [SlotMember("embed.kernel", 0)]
        if self.head is not None:
            members.append(SlotMember("head.kernel", 0))
        return [*members, SlotMember("final_norm.scale", 0)]

    def architecture(self) -> dict:
        """The constructor arguments (without ``rngs`` and gates) that build this network's
        shapes: per-block widths, so a slimmed model rebuilds from them."""
        return {
            "num_classes": self.num_classes, "input_shape": self.input_shape, "dim": self.dim,
            "depth": len(self.blocks), **self.block_widths(), "head_dim": self.head_dim,
            "tied": self.tied, "families": self.families, "granularity": self.granularity,
        }

    def forward(self, x: jax.Array, z: dict[str, jax.Array], *, train: bool) -> jax.Array:
        hidden = self.hidden_gate(z)
        table = self.embed.kernel[...]
        embed_gate = self.kernel_gate(z, "embed")
        if embed_gate is not None:
            table = table * embed_gate
        if hidden is not None and hidden.ndim == 1:
            h = (table.T * hidden)[x]  # the batch-shared gate folded into the looked-up rows
        else:
            h = table.T[x]
            h = h if hidden is None else gate_units(h, hidden)
        h = self.final_norm(self._run_blocks(h, z), hidden)
        if self.head is None:
            return h @ table
        return self.head(h, self.kernel_gate(z, "head"))


def lm_tiny(**kwargs) -> DecoderLM:
    """The byte-level LM of the defaults: dim 128, 4 blocks, 4 query heads in 2 KV groups of
    head_dim 32, SwiGLU 384, tied embeddings, context 128 (0.82M parameters)."""
    return DecoderLM(**kwargs)


def generate(model: DecoderLM, prompt: bytes, steps: int, *, window: int | None = None) -> bytes:
    """Greedy decoding: ``steps`` bytes after ``prompt``, each the argmax of the model's
    evaluation logits at the last position given everything before it (the prompt and the bytes
    generated so far; the last ``window`` of them, default the model's context, when longer).

    Every step runs the model on a fixed-length buffer (the tokens, right-padded; causal
    attention makes the padding invisible to earlier positions), so it compiles once. Works on
    gated models (test-time gates) and slim ones alike; the same inputs give the same bytes.
    """
    if not prompt:
        raise ValueError("generate needs a prompt of at least one byte")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    window = window or model.input_shape[0]
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state: nnx.State, tokens: jax.Array, last: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, state)(tokens[None], train=False)
        return jnp.argmax(logits[0, last])

    tokens = list(prompt)
    for _ in range(steps):
        recent = tokens[-window:]
        buffer = np.zeros(window, np.int32)
        buffer[:len(recent)] = recent
        tokens.append(int(next_token(state, jnp.asarray(buffer), len(recent) - 1)))
    return bytes(tokens[len(prompt):])
