"""Transformer blocks and where their gates go: heads, KV groups, FFN units, sublayers and the
hidden dimension.

The pieces of :mod:`sparsejax.models.vit` and :mod:`sparsejax.models.lm`, both plain NNX modules
gated from their trace (:class:`~sparsejax.structure.traced_model.TracedModel`): pre-norm blocks
h <- h + Attn(Norm(h)), h <- h + FFN(Norm(h)) (Xiong et al. 2020), with multi-head attention
(Vaswani et al. 2017) whose query heads may share key/value heads in groups (grouped-query
attention, GQA: Ainslie et al. 2023), optional rotary positions (RoPE: Su et al. 2021), a GELU
MLP or a SwiGLU FFN (Shazeer 2020), LayerNorm or RMSNorm.

Gate slot families (unit granularity), one slot per block except ``hidden`` (names
``blocks.{i}.{family}``), so that a method can give each family (and each block) its own lambda,
as CoFi (Xia et al. 2022) and Sheared LLaMA (Xia et al. 2023) do; the models place them on
their trace (:func:`block_placements`, :class:`~sparsejax.models.placement.GatePlacement`):

- ``heads`` (H per block): query head h's output, before the output projection (its rows, as
  Voita et al. 2019 gate heads). With H query heads in G groups of M = H / G (group g owns
  heads m * G + g, m < M), a closed head removes its query columns and output-projection rows;
  in multi-head attention (M = 1) also its key and value columns.
- ``kv_groups`` (G per block, only when M > 1): key/value head g and every query head it serves.
- ``ffn`` (F per block): FFN hidden unit j (after the activation, SwiGLU's product).
- ``attn`` / ``mlp`` (1 per block): the whole attention / FFN sublayer's residual branch.
- ``hidden`` (d, shared by every block): one dimension of the residual stream. Every write into
  the stream is multiplied by it, so a closed dimension is exactly 0 in the stream; the norms
  take their statistics over the open dimensions only (n = #{z_hidden != 0}), so that a closed
  dimension is the same network as one without it (as CoFi's LayerNorm).

Which families exist is the ``families`` argument of the models. At weight granularity every
kernel (embeddings, projections, FFN, head) has weight gates instead.

Layouts: the query columns and output-projection rows are ordered (head_dim, M, G) with G
fastest, the key and value columns (head_dim, G). Attention itself costs, per query head,
T * T * head_dim MACs for Q K^T and as many for A V, counted over the full T x T score matrix
even when causal (the dense computation does all of it); the trace counts them as products of
two activations, which shrink with the heads kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.base import GateSlot, SpanSlot
from sparsejax.models.layers import Dense
from sparsejax.models.placement import GatePlacement

DROPRATE = 0.1
"""Initial drop rate of the unit slots. Lower than the CNNs' 0.5: a residual branch is multiplied
by up to four gates (hidden, head, KV group, sublayer), so at 0.5 a network trained from scratch
sees a heavily corrupted forward pass (``vit_tiny`` + ``l0_hc`` on Fashion-MNIST, 30 steps: test
error 88% at 0.5, 51% at 0.1, 38% dense)."""
ROPE_BASE = 10000.0
NORM_EPSILON = 1e-6
FAMILIES: tuple[str, ...] = ("heads", "kv_groups", "ffn", "attn", "mlp", "hidden")
HIDDEN = "hidden"
NORMS: tuple[str, ...] = ("layer", "rms")
FFNS: tuple[str, ...] = ("gelu", "swiglu")


def slot_family(name: str) -> str:
    """The family of a transformer slot name (``"blocks.2.heads"`` -> ``"heads"``)."""
    return name.rsplit(".", 1)[-1]


def by_family(slots: Sequence[GateSlot]) -> bool:
    """Whether ``slots`` are a transformer's, each named by its family (``"hidden"``,
    ``"blocks.{i}.heads"``, ...): GReg reads its ratios per family then."""
    return bool(slots) and all(slot_family(slot.name) in FAMILIES for slot in slots)


def family_slots(slots: Iterable[GateSlot]) -> dict[str, tuple[str, ...]]:
    """Slot names by family, in network order."""
    families: dict[str, list[str]] = {}
    for slot in slots:
        families.setdefault(slot_family(slot.name), []).append(slot.name)
    return {family: tuple(names) for family, names in families.items()}


def lambdas_by_family(
    slots: Iterable[GateSlot], values: Mapping[str, float], default: float = 0.0
) -> tuple[float, ...]:
    """Per-slot values in slot order (the ``lambdas`` of the L0 methods) from one value per
    family, e.g. ``{"heads": 1e-3, "hidden": 1e-4}``; families not given take ``default``."""
    unknown = sorted(set(values) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown gate families {unknown}; valid: {', '.join(FAMILIES)}")
    return tuple(float(values.get(slot_family(slot.name), default)) for slot in slots)


def family_chain_order(slots: Sequence[GateSlot]) -> tuple[GateSlot, ...]:
    """Transformer slots ordered by family, then block: ``hidden``, every block's ``heads``,
    every block's ``kv_groups``, ``attn``, ``ffn``, ``mlp``; other slots keep their order.

    The order of Dep-L0's generator chain (Li & Ji 2021): its dependency "over the layers" runs
    over the blocks, so a block's head gates are generated from the previous block's head gates
    (and its FFN gates from the previous block's FFN gates), not from the one-unit sublayer gate
    that precedes them in network order."""
    if not slots or not all(isinstance(slot, SpanSlot) for slot in slots):
        return tuple(slots)
    order = {family: i for i, family in enumerate((HIDDEN, "heads", "kv_groups", "attn", "ffn",
                                                   "mlp"))}
    return tuple(sorted(slots, key=lambda slot: order[slot_family(slot.name)]))


def rope(x: jax.Array, positions: jax.Array, base: float = ROPE_BASE) -> jax.Array:
    """Rotary position embedding of queries or keys ``x`` shaped ``(batch, T, head_dim, ...)``.

    Su et al. (2021), eq. 34, "rotate-half" pairing: dimension i < head_dim / 2 and i + head_dim / 2
    form a plane rotated by the angle t * theta_i at position t, theta_i = base^(-2i / head_dim).
    Then <rope(q, t), rope(k, s)> depends on t - s only.
    """
    half = x.shape[2] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]
    shape = (1, *angles.shape, *([1] * (x.ndim - 3)))
    cos, sin = jnp.cos(angles).reshape(shape), jnp.sin(angles).reshape(shape)
    x1, x2 = x[:, :, :half], x[:, :, half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=2).astype(x.dtype)


class Norm(nnx.Module):
    """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019) over the last axis, of d
    features: layer: y = (x - mu) / sqrt(var + eps) * scale + bias; rms: y = x / sqrt(sum(x^2)
    / d + eps) * scale. Its sums over the features are what a stream placement takes over the
    open hidden units (:class:`~sparsejax.models.placement.GatePlacement`)."""

    def __init__(self, dim: int, kind: str):
        if kind not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
        self.kind = kind
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if kind == "layer" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        count = x.shape[-1]
        if self.kind == "layer":
            x = x - jnp.sum(x, axis=-1, keepdims=True) / count
        y = x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) / count + NORM_EPSILON)
        y = y * self.scale[...]
        return y if self.bias is None else y + self.bias[...]


def projection(
    in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool, scale: float = 1.0
) -> Dense:
    """A dense layer initialised N(0, scale^2 / in_features) (LeCun normal times ``scale``)."""
    init = nnx.initializers.variance_scaling(scale**2, "fan_in", "normal")
    return Dense(in_features, out_features, rngs=rngs, use_bias=use_bias, kernel_init=init)


class Attention(nnx.Module):
    """Multi-head attention with H query heads sharing G key/value heads (GQA; G = H is multi-head
    attention, Vaswani et al. 2017): softmax(Q_h K_g^T / sqrt(head_dim) + mask) V_g for query head
    h = m * G + g, then the output projection of the concatenated heads."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        kv_heads: int,
        head_dim: int,
        use_bias: bool,
        causal: bool,
        rotary: bool,
        out_scale: float,
        rngs: nnx.Rngs,
    ):
        if heads % kv_heads:
            raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
        if rotary and head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {head_dim}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.causal, self.rotary = causal, rotary
        self.q = projection(dim, heads * head_dim, rngs=rngs, use_bias=use_bias)
        self.k = projection(dim, kv_heads * head_dim, rngs=rngs, use_bias=use_bias)
        self.v = projection(dim, kv_heads * head_dim, rngs=rngs, use_bias=use_bias)
        self.o = projection(heads * head_dim, dim, rngs=rngs, use_bias=use_bias, scale=out_scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The attention output, projected back to the stream."""
        batch, length, _ = x.shape
        groups, dh = self.kv_heads, self.head_dim
        per_group = self.heads // groups
        q = self.q(x).reshape(batch, length, dh, per_group, groups)
        k = self.k(x).reshape(batch, length, dh, groups)
        v = self.v(x).reshape(batch, length, dh, groups)
        if self.rotary:
            positions = jnp.arange(length)
            q, k = rope(q, positions), rope(k, positions)
        scores = jnp.einsum("btdmg,bsdg->bmgts", q, k) / math.sqrt(dh)
        if self.causal:
            visible = jnp.tril(jnp.ones((length, length), bool))
            scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bmgts,bsdg->btdmg", weights, v)
        return self.o(out.reshape(batch, length, -1))


class FeedForward(nnx.Module):
    """GELU MLP, down(gelu(up(x))), or SwiGLU (Shazeer 2020), down(silu(gate(x)) * up(x))."""

    def __init__(
        self, dim: int, hidden: int, *, kind: str, use_bias: bool, out_scale: float, rngs: nnx.Rngs
    ):
        if kind not in FFNS:
            raise ValueError(f"ffn must be one of {FFNS}, got {kind!r}")
        self.kind = kind
        swiglu = kind == "swiglu"
        self.gate = projection(dim, hidden, rngs=rngs, use_bias=use_bias) if swiglu else None
        self.up = projection(dim, hidden, rngs=rngs, use_bias=use_bias)
        self.down = projection(hidden, dim, rngs=rngs, use_bias=use_bias, scale=out_scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gate is None:
            h = jax.nn.gelu(self.up(x), approximate=False)
        else:
            h = jax.nn.silu(self.gate(x)) * self.up(x)
        return self.down(h)


class Block(nnx.Module):
    """A pre-norm transformer block: attention and FFN residual branches. ``heads=0`` builds no
    attention sublayer, ``ffn_hidden=0`` no FFN sublayer (a slimmed model whose gates closed
    them); the missing branch adds nothing to the stream."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        kv_heads: int,
        head_dim: int,
        ffn_hidden: int,
        norm: str,
        ffn: str,
        use_bias: bool,
        causal: bool,
        rotary: bool,
        out_scale: float,
        rngs: nnx.Rngs,
    ):
        attention = heads > 0
        self.attn_norm = Norm(dim, norm) if attention else None
        self.attn = Attention(dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                              use_bias=use_bias, causal=causal, rotary=rotary,
                              out_scale=out_scale, rngs=rngs) if attention else None
        self.ffn_norm = Norm(dim, norm) if ffn_hidden > 0 else None
        self.ffn = FeedForward(dim, ffn_hidden, kind=ffn, use_bias=use_bias, out_scale=out_scale,
                               rngs=rngs) if ffn_hidden > 0 else None

    def __call__(self, h: jax.Array) -> jax.Array:
        """The stream after the block, without gates: h + Attn(Norm(h)), then + FFN(Norm(h))."""
        if self.attn is not None:
            h = h + self.attn(self.attn_norm(h))
        if self.ffn is not None:
            h = h + self.ffn(self.ffn_norm(h))
        return h


def transformer_blocks(
    depth: int, dim: int, *, heads: int, kv_heads: int, ffn_hidden: int, **block_options
) -> nnx.List:
    """``depth`` blocks of one width, the residual branches' output projections initialised
    times 1 / sqrt(2 depth) (GPT-2, Radford et al. 2019)."""
    out_scale = 1.0 / math.sqrt(2 * max(depth, 1))
    return nnx.List([
        Block(dim, heads=heads, kv_heads=kv_heads, ffn_hidden=ffn_hidden, out_scale=out_scale,
              **block_options)
        for _ in range(depth)
    ])


def block_placements(
    blocks: Sequence[Block], families: Iterable[str], droprate_init: float = DROPRATE
) -> list[GatePlacement]:
    """The gate placements of the block families in ``families``, block by block (slots
    ``blocks.{i}.{family}``, in the order heads, kv_groups, attn, ffn, mlp):

    - ``heads`` (multi-head attention): the query and value projections' outputs in H heads
      (``heads=H``): a head's gate scales its output (the output projection's rows) and
      removes its query, key and value columns;
    - ``heads`` (grouped-query attention, M > 1 query heads per key/value group): the same
      placements; a query head shares its group's keys and values, so the trace finds it by
      its tags (:mod:`~sparsejax.structure.trace.tags`): its gate scales its output (the
      output projection's rows) and removes its query columns;
    - ``kv_groups`` (grouped-query attention): the key and value projections' outputs in G
      groups, a group's gate removing its query heads too;
    - ``attn`` / ``mlp``: the output (down) projection's output with the projections before it
      as ``branch``: the whole sublayer under one gate;
    - ``ffn``: the down projection's inputs, ``whole_unit``: an FFN unit with its columns in
      the up (and gate) projections.
    """
    families = set(families)
    placements = []
    for index, block in enumerate(blocks):
        path = f"blocks.{index}"
        if block.attn is not None:
            attn = f"{path}.attn"
            grouped = block.attn.heads != block.attn.kv_heads
            if "heads" in families:
                placements += [GatePlacement(f"{path}.heads", f"{attn}.{name}", "output",
                                             droprate_init, heads=block.attn.heads)
                               for name in ("q", "v")]
            if "kv_groups" in families and grouped:
                placements += [GatePlacement(f"{path}.kv_groups", f"{attn}.{name}", "output",
                                             droprate_init, heads=block.attn.kv_heads)
                               for name in ("k", "v")]
            if "attn" in families:
                placements.append(GatePlacement(
                    f"{path}.attn", f"{attn}.o", "output", droprate_init,
                    branch=tuple(f"{attn}.{name}" for name in ("q", "k", "v"))))
        if block.ffn is not None:
            ffn = f"{path}.ffn"
            if "ffn" in families:
                placements.append(GatePlacement(f"{path}.ffn", f"{ffn}.down", "input",
                                                droprate_init, whole_unit=True))
            if "mlp" in families:
                feeding = ("gate", "up") if block.ffn.gate is not None else ("up",)
                placements.append(GatePlacement(
                    f"{path}.mlp", f"{ffn}.down", "output", droprate_init,
                    branch=tuple(f"{ffn}.{name}" for name in feeding)))
    return placements


def norm_paths(model: nnx.Module) -> tuple[str, ...]:
    """The module paths of every :class:`Norm` in ``model``: the normalisers that read its
    residual stream."""
    return tuple(".".join(map(str, path)) for path, node in nnx.iter_graph(model)
                 if isinstance(node, Norm))


def check_families(families: Iterable[str]) -> tuple[str, ...]:
    families = tuple(families)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown gate families {unknown}; valid: {', '.join(FAMILIES)}")
    return families
