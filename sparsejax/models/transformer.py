"""Transformer blocks with gates on heads, KV groups, FFN units, the hidden dimension and sublayers.

The pieces of :mod:`sparsejax.models.vit` and :mod:`sparsejax.models.lm`: pre-norm blocks
h <- h + z_hidden * z_attn * Attn(Norm(h)), h <- h + z_hidden * z_mlp * FFN(Norm(h)) (Xiong et
al. 2020), with multi-head attention (Vaswani et al. 2017) whose query heads may share key/value
heads in groups (grouped-query attention, GQA: Ainslie et al. 2023), optional rotary positions
(RoPE: Su et al. 2021), a GELU MLP or a SwiGLU FFN (Shazeer 2020), LayerNorm or RMSNorm.

Gate slot families (unit granularity), one slot per block except ``hidden`` (names
``blocks.{i}.{family}``), so that a method can give each family (and each block) its own lambda,
as CoFi (Xia et al. 2022) and Sheared LLaMA (Xia et al. 2023) do:

- ``heads`` (H per block): query head h's output, before the output projection. With H query
  heads in G groups of M = H / G (group g owns heads m * G + g, m < M), a closed head removes its
  query columns and output-projection rows; in multi-head attention (M = 1) also its key and value
  columns.
- ``kv_groups`` (G per block, only when M > 1): key/value head g and every query head it serves.
- ``ffn`` (F per block): FFN hidden unit j (after the activation, SwiGLU's product).
- ``attn`` / ``mlp`` (1 per block): the whole attention / FFN sublayer's residual branch.
- ``hidden`` (d, shared by every block): one dimension of the residual stream. The embedding and
  every branch are multiplied by it, so a closed dimension is exactly 0 in the stream; the norms
  take their statistics over the open dimensions only (n = #{z_hidden != 0}) and zero the closed
  ones, so that a closed dimension is the same network as one without it (as CoFi's LayerNorm).

Batch-shared gates are folded into the weights rather than multiplied into the activations, as
the CNN layers do (:mod:`sparsejax.models.layers`): a head or KV-group gate scales its heads'
rows of the output projection, an FFN unit gate its row of the down projection, a branch's
sublayer and hidden gates the columns and bias of the projection that writes the branch into the
stream (the embedding's likewise), and the norms' hidden mask their scale and bias. The gates'
gradients then come from the weight gradients the backward pass computes anyway instead of
reductions over every token. It is the same function up to float rounding and a closed unit is
still exactly 0. The hidden gate stays on the activations only inside a norm's statistics (the
count n and LayerNorm's centred values); per-example gates multiply the activations.

Which families exist is the ``families`` argument of the models. At weight granularity every
kernel (embeddings, projections, FFN, head) has weight gates instead. The LM declares these
slots and runs its blocks with the gates described here (:class:`TransformerModel`); the ViT
runs the same blocks without gates (:meth:`Block.__call__`) and places the families on its
trace (:func:`block_placements`, a stream placement for ``hidden``), where the same gates act
on the same parameters.

Accounting (:mod:`sparsejax.structure.accounting`): projections are dense layers applied at every
token, so a layer's ``out_positions`` is the number of tokens T of the declared context (FLOPs
are per sequence, as a CNN's are per image). The layouts make every slot a tiled unit source: the
query columns and output-projection rows are ordered (head_dim, M, G) with G fastest, the key and
value columns (head_dim, G). Attention itself costs, per query head, T * T * head_dim MACs for
Q K^T and as many for A V: 2 * H * head_dim * T^2 per block, counted over the full T x T score
matrix even when causal (the dense computation does all of it); they are declared as
:attr:`~sparsejax.models.base.GatedModel.activation_products` (MACs, no parameters) and scale
with the kept heads. Norm scales and biases, positional embeddings and a class token are
parameters outside the declared layers, as BatchNorm's are in the CNNs. A slot's ``group_size``
(the parameters one gate removes, |g| of the L0 penalty) is counted over all the layers it spans.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.gates.apply import gate_units
from sparsejax.models.base import (
    GatedModel,
    GateSlot,
    Layer,
    SlotMember,
    SpanSlot,
    UnitSource,
)
from sparsejax.models.layers import Dense
from sparsejax.models.placement import GatePlacement

DROPRATE = 0.1
"""Initial drop rate of the unit slots. Lower than the CNNs' 0.5: a residual branch is multiplied
by up to four gates (hidden, head, KV group, sublayer), so at 0.5 a network trained from scratch
sees a heavily corrupted forward pass (``vit_tiny`` + ``l0_hc`` on Fashion-MNIST, 30 steps: test
error 88% at 0.5, 51% at 0.1, 38% dense)."""
WEIGHT_DROPRATE = 0.5
"""Initial drop rate of weight-granularity gates (one gate per weight, the L0 papers' 0.5)."""
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
    ``"blocks.{i}.heads"``, ...), declared or placed: GReg reads its ratios per family then."""
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


def _unit_mask(gate: jax.Array, x: jax.Array) -> jax.Array:
    """1 where the hidden gate is open, broadcastable to x ``(batch, ..., d)``."""
    mask = (gate != 0).astype(x.dtype)
    return mask if mask.ndim == 1 else mask.reshape(mask.shape[0], *([1] * (x.ndim - 2)), -1)


class Norm(nnx.Module):
    """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019) over the open hidden units.

    With n the number of open units (all d without a hidden gate):
    layer: y = (x - mu) / sqrt(var + eps) * scale + bias, mu and var over the open units;
    rms: y = x / sqrt(sum(x^2) / n + eps) * scale. Closed units of y are 0.
    """

    def __init__(self, dim: int, kind: str):
        if kind not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
        self.kind = kind
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if kind == "layer" else None

    def __call__(self, x: jax.Array, hidden_gate: jax.Array | None) -> jax.Array:
        """The statistics need x's closed units to be 0 (the stream's are); the mask that zeroes
        the closed units of y is folded into the scale and bias (exact: it is 0 or 1)."""
        mask = None if hidden_gate is None else _unit_mask(hidden_gate, x)
        count = x.shape[-1] if mask is None else jnp.sum(mask, axis=-1, keepdims=True)
        if self.kind == "layer":
            x = x - jnp.sum(x, axis=-1, keepdims=True) / count
            x = x if mask is None else x * mask
        y = x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) / count + NORM_EPSILON)
        scale = self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        if mask is not None:
            scale = scale * mask
            bias = None if bias is None else bias * mask
        y = y * scale
        return y if bias is None else y + bias


def projection(
    in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool, scale: float = 1.0
) -> Dense:
    """A dense layer initialised N(0, scale^2 / in_features) (LeCun normal times ``scale``)."""
    init = nnx.initializers.variance_scaling(scale**2, "fan_in", "normal")
    return Dense(in_features, out_features, rngs=rngs, use_bias=use_bias, kernel_init=init)


def _head_multiplier(gate: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A per-example head (``(B, H)``) or group (``(B, G)``) gate, reshaped to multiply attention
    outputs ``(B, T, head_dim, M, G)``; ``shape`` is ``(M, G)`` or ``(G,)``."""
    return gate.reshape(gate.shape[0], 1, 1, *([1] * (2 - len(shape))), *shape)


def _product(gates: Sequence[jax.Array]) -> jax.Array | None:
    """The elementwise product of ``gates`` (broadcast), None for none."""
    product = None
    for gate in gates:
        product = gate if product is None else product * gate
    return product


def gated_projection(
    layer: Dense,
    x: jax.Array,
    *,
    kernel_gate: jax.Array | None = None,
    input_gate: jax.Array | None = None,
    output_gates: Sequence[jax.Array | None] = (),
) -> jax.Array:
    """``layer(x)`` with input gates and times every gate of ``output_gates`` (a residual
    branch's sublayer and hidden gates). Batch-shared gates are folded into the kernel's rows
    (inputs) and its columns and bias (outputs, their product), per-example ones multiply the
    activations (:class:`~sparsejax.models.layers.Dense`): the same function up to float
    rounding, and a closed unit is still exactly 0."""
    given = [gate for gate in output_gates if gate is not None]
    shared = _product([gate for gate in given if gate.ndim == 1])
    y = layer(x, kernel_gate, input_gate=input_gate, output_gate=shared)
    for gate in given:
        if gate.ndim != 1:
            y = gate_units(y, gate)
    return y


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

    def __call__(
        self,
        x: jax.Array,
        *,
        head_gate: jax.Array | None = None,
        group_gate: jax.Array | None = None,
        output_gates: Sequence[jax.Array | None] = (),
        kernel_gates: Mapping[str, jax.Array | None] | None = None,
    ) -> jax.Array:
        """The attention output projected to the stream, times ``output_gates`` (the branch's
        gates). Batch-shared head and group gates scale their heads' rows of the output
        projection (row d * H + h of head h), per-example ones the heads' outputs."""
        kernel_gates = kernel_gates or {}
        batch, length, _ = x.shape
        groups, dh = self.kv_heads, self.head_dim
        per_group = self.heads // groups
        q = self.q(x, kernel_gates.get("q")).reshape(batch, length, dh, per_group, groups)
        k = self.k(x, kernel_gates.get("k")).reshape(batch, length, dh, groups)
        v = self.v(x, kernel_gates.get("v")).reshape(batch, length, dh, groups)
        if self.rotary:
            positions = jnp.arange(length)
            q, k = rope(q, positions), rope(k, positions)
        scores = jnp.einsum("btdmg,bsdg->bmgts", q, k) / math.sqrt(dh)
        if self.causal:
            visible = jnp.tril(jnp.ones((length, length), bool))
            scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bmgts,bsdg->btdmg", weights, v)
        rows = []
        for gate, shape in ((head_gate, (per_group, groups)), (group_gate, (groups,))):
            if gate is not None and gate.ndim == 1:
                rows.append(jnp.tile(gate, self.heads * dh // gate.shape[0]))
            elif gate is not None:
                out = out * _head_multiplier(gate, shape)
        return gated_projection(self.o, out.reshape(batch, length, -1),
                                kernel_gate=kernel_gates.get("o"), input_gate=_product(rows),
                                output_gates=output_gates)


class FeedForward(nnx.Module):
    """GELU MLP, down(gelu(up(x))), or SwiGLU (Shazeer 2020), down(silu(gate(x)) * up(x)); the
    FFN unit gates multiply the hidden units (batch-shared ones folded into the rows of
    ``down``), ``output_gates`` (the branch's gates) the output."""

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

    def __call__(
        self,
        x: jax.Array,
        *,
        unit_gate: jax.Array | None = None,
        output_gates: Sequence[jax.Array | None] = (),
        kernel_gates: Mapping[str, jax.Array | None] | None = None,
    ) -> jax.Array:
        kernel_gates = kernel_gates or {}
        up = self.up(x, kernel_gates.get("up"))
        if self.gate is None:
            h = jax.nn.gelu(up, approximate=False)
        else:
            h = jax.nn.silu(self.gate(x, kernel_gates.get("gate"))) * up
        return gated_projection(self.down, h, kernel_gate=kernel_gates.get("down"),
                                input_gate=unit_gate, output_gates=output_gates)


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
            h = h + self.attn(self.attn_norm(h, None))
        if self.ffn is not None:
            h = h + self.ffn(self.ffn_norm(h, None))
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


def _periodic(size: int, period: int) -> tuple[int, ...]:
    """Unit i % period of each index 0..size-1: the query columns / output-projection rows
    (head_dim, M, G) of the heads (period H) or of the KV groups (period G), the key / value
    columns (head_dim, G) of the groups."""
    return tuple(i % period for i in range(size))


def _projection_members(
    module: Dense, path: str, axis: int, units: tuple[int, ...] | None
) -> list[SlotMember]:
    """A projection's kernel along ``axis`` (0: its inputs, 1: its outputs) and, for its
    outputs, its bias."""
    members = [SlotMember(f"{path}.kernel", axis, units)]
    if axis == 1 and module.bias is not None:
        members.append(SlotMember(f"{path}.bias", 0, units))
    return members


def _whole(module: nnx.Module, path: str) -> list[SlotMember]:
    """Every entry of a module's kernel / bias / norm scale as unit 0 (a whole sublayer)."""
    members = []
    for name in ("kernel", "bias", "scale"):
        value = getattr(module, name, None)
        if value is not None:
            members.append(SlotMember(f"{path}.{name}", 0, (0,) * value.shape[0]))
    return members


def _norm_members(norm: Norm, path: str) -> list[SlotMember]:
    """A norm's scale (and bias) entries, one per hidden dimension."""
    names = ("scale",) if norm.bias is None else ("scale", "bias")
    return [SlotMember(f"{path}.{name}", 0) for name in names]


def per_block(value: int | Sequence[int], depth: int, name: str) -> tuple[int, ...]:
    """A width given once for every block, or per block (a tuple of ``depth`` values)."""
    if isinstance(value, int):
        return (value,) * depth
    values = tuple(int(v) for v in value)
    if len(values) != depth:
        raise ValueError(f"{name} gives {len(values)} values for {depth} blocks: {values}")
    return values


class TransformerModel(GatedModel):
    """A transformer that declares its gates (the LM; the ViT is a plain module gated from its
    trace): the blocks, their declarations and their gated forward pass.

    Subclasses build ``self.blocks`` with :meth:`_build_blocks`, declare their embedding and head
    layers around :meth:`_block_declarations` and call :meth:`_run_blocks`.
    """

    families: tuple[str, ...]

    def _build_blocks(
        self,
        depth: int,
        dim: int,
        *,
        heads: int | Sequence[int],
        kv_heads: int | Sequence[int],
        ffn_hidden: int | Sequence[int],
        **block_options,
    ) -> None:
        """``depth`` blocks; ``heads``, ``kv_heads`` and ``ffn_hidden`` are one value for every
        block or one per block (0 heads / 0 FFN units: no such sublayer); no blocks at all
        when ``depth`` is 0 (a slimmed model whose every sublayer gate closed)."""
        out_scale = 1.0 / math.sqrt(2 * max(depth, 1))
        widths = zip(per_block(heads, depth, "heads"), per_block(kv_heads, depth, "kv_heads"),
                     per_block(ffn_hidden, depth, "ffn_hidden"), strict=True)
        self.blocks = nnx.List([
            Block(dim, heads=h, kv_heads=g, ffn_hidden=f, out_scale=out_scale, **block_options)
            for h, g, f in widths
        ])

    def block_widths(self) -> dict[str, tuple[int, ...]]:
        """Per block: query heads, KV heads and FFN units (0 where the sublayer is absent)."""
        return {
            "heads": tuple(b.attn.heads if b.attn is not None else 0 for b in self.blocks),
            "kv_heads": tuple(b.attn.kv_heads if b.attn is not None else 0 for b in self.blocks),
            "ffn_hidden": tuple(b.ffn.up.out_features if b.ffn is not None else 0
                                for b in self.blocks),
        }

    def layer_module(self, name: str) -> nnx.Module:
        """Declared layers are named by their attribute path (``"blocks.0.attn.q"``)."""
        return self.module_at(name)

    def _sources(self, *sources: tuple[str, int]) -> UnitSource:
        """Unit sources limited to the slots of the enabled families (none at weight
        granularity)."""
        kept = tuple((s, t) for s, t in sources if slot_family(s) in self.families)
        return self._unit_sources(*kept)

    def _slot(
        self, name: str, layer: Layer, units: int, params_per_gate: int, axis: int = 0
    ) -> list[SpanSlot]:
        """The slot ``name`` if its family is enabled; ``layer`` and ``axis`` name the kernel
        axis its units index where one does (``hidden``: the embedding's, ``ffn``: the down
        projection's rows)."""
        if slot_family(name) not in self.families:
            return []
        return [SpanSlot(name, layer.name, (units,), axis, False, DROPRATE, layer.kernel_shape,
                         group_params=params_per_gate)]

    def _block_declarations(
        self, index: int, *, positions: int, use_bias: bool
    ) -> tuple[list[Layer], list[Layer], list[SpanSlot]]:
        """Layers, activation products and slots of block ``index`` (module docstring); a
        sublayer the block lacks declares nothing."""
        block = self.blocks[index]
        s = {family: f"{path}.{family}" for path in (f"blocks.{index}",)
             for family in FAMILIES if family != HIDDEN}
        attn = ([], [], []) if block.attn is None else self._attention_declarations(
            index, s, positions=positions, use_bias=use_bias)
        ffn = ([], []) if block.ffn is None else self._ffn_declarations(
            index, s, positions=positions, use_bias=use_bias)
        return attn[0] + ffn[0], attn[1], attn[2] + ffn[1]

    def _attention_declarations(
        self, index: int, s: Mapping[str, str], *, positions: int, use_bias: bool
    ) -> tuple[list[Layer], list[Layer], list[SpanSlot]]:
        attn = self.blocks[index].attn
        path = f"blocks.{index}"
        heads, groups, dh = attn.heads, attn.kv_heads, attn.head_dim
        per_group = heads // groups
        dim = attn.q.in_features
        mha = per_group == 1
        bias = int(use_bias)
        kernel = self._kernel_slot

        def head_sources(tile: int) -> tuple[tuple[str, int], ...]:
            heads_source = ((s["heads"], tile),)
            return heads_source if mha else (*heads_source, (s["kv_groups"], tile * per_group))

        kv_outputs = (((s["heads"], dh),) if mha else ((s["kv_groups"], dh),))
        layers = [
            Layer(f"{path}.attn.q", (dim, heads * dh), positions, use_bias,
                  inputs=self._sources((HIDDEN, 1)),
                  outputs=self._sources(*head_sources(dh), (s["attn"], heads * dh)),
                  kernel_slot=kernel(f"{path}.attn.q")),
            *[Layer(f"{path}.attn.{kv}", (dim, groups * dh), positions, use_bias,
                    inputs=self._sources((HIDDEN, 1)),
                    outputs=self._sources(*kv_outputs, (s["attn"], groups * dh)),
                    kernel_slot=kernel(f"{path}.attn.{kv}"))
              for kv in ("k", "v")],
            Layer(f"{path}.attn.o", (heads * dh, dim), positions, use_bias,
                  inputs=self._sources(*head_sources(dh)),
                  outputs=self._sources((HIDDEN, 1), (s["attn"], dim)),
                  kernel_slot=kernel(f"{path}.attn.o")),
        ]
        products = [
            Layer(f"{path}.attn.{name}", (heads * dh, positions), positions, False,
                  inputs=self._sources(*head_sources(dh)),
                  outputs=self._sources((s["attn"], positions)))
            for name in ("scores", "mix")
        ]
        head_params = (dim * dh + bias * dh) + dh * dim
        kv_params = 2 * (dim * dh + bias * dh)
        attn_params = (dim * heads * dh * 2 + 2 * dim * groups * dh
                       + bias * (heads * dh + 2 * groups * dh + dim))
        o = layers[3]
        slots = [
            *self._slot(s["heads"], o, heads, head_params + (kv_params if mha else 0)),
            *([] if mha else
              self._slot(s["kv_groups"], o, groups, kv_params + per_group * head_params)),
            *self._slot(s["attn"], o, 1, attn_params),
        ]
        return layers, products, slots

    def _ffn_declarations(
        self, index: int, s: Mapping[str, str], *, positions: int, use_bias: bool
    ) -> tuple[list[Layer], list[SpanSlot]]:
        ffn = self.blocks[index].ffn
        path = f"blocks.{index}"
        dim = ffn.up.in_features
        hidden_units = ffn.up.out_features
        bias = int(use_bias)
        kernel = self._kernel_slot
        ffn_in = ("gate", "up") if ffn.gate is not None else ("up",)
        layers = [
            Layer(f"{path}.ffn.{name}", (dim, hidden_units), positions, use_bias,
                  inputs=self._sources((HIDDEN, 1)),
                  outputs=self._sources((s["ffn"], 1), (s["mlp"], hidden_units)),
                  kernel_slot=kernel(f"{path}.ffn.{name}"))
            for name in ffn_in
        ]
        layers.append(
            Layer(f"{path}.ffn.down", (hidden_units, dim), positions, use_bias,
                  inputs=self._sources((s["ffn"], 1)),
                  outputs=self._sources((HIDDEN, 1), (s["mlp"], dim)),
                  kernel_slot=kernel(f"{path}.ffn.down"))
        )
        ffn_params = len(ffn_in) * (dim + bias) + dim
        mlp_params = hidden_units * ffn_params + bias * dim
        down = layers[-1]
        slots = [
            *self._slot(s["ffn"], down, hidden_units, ffn_params),
            *self._slot(s["mlp"], down, 1, mlp_params),
        ]
        return layers, slots

    def _block_hidden_params(self, index: int) -> int:
        """The parameters of block ``index`` that one hidden dimension removes."""
        block = self.blocks[index]
        attn, ffn = block.attn, block.ffn
        params = 0
        if attn is not None:
            bias = int(attn.q.bias is not None)
            projected = attn.heads * attn.head_dim + 2 * attn.kv_heads * attn.head_dim
            params += projected + attn.heads * attn.head_dim + bias
        if ffn is not None:
            bias = int(ffn.up.bias is not None)
            ffn_in = 2 if ffn.gate is not None else 1
            hidden_units = ffn.up.out_features
            params += ffn_in * hidden_units + hidden_units + bias
        return params

    def slot_members(self, slot: GateSlot) -> tuple[SlotMember, ...]:
        """The parameter groups of a slot (:class:`~sparsejax.models.base.SlotMember`), every
        parameter entry one of its gates removes, by unit:

        - ``heads``: the head's query columns (and query bias), its output-projection rows and,
          in multi-head attention, its key and value columns;
        - ``kv_groups``: the group's key and value columns and the query columns and
          output-projection rows of its heads;
        - ``ffn``: the unit's ``gate`` / ``up`` columns (and biases) and its ``down`` row;
        - ``attn`` / ``mlp``: every kernel, bias and norm entry of the sublayer (one unit);
        - ``hidden``: the dimension's row or column of every kernel reading or writing the
          stream, the output biases writing it, every norm's scale (and bias) entry, and the
          model's own stream parameters (:meth:`_stream_members`).

        Weight-granularity slots are one kernel each (the default).
        """
        if slot.axis is None:
            return super().slot_members(slot)
        if slot.name == HIDDEN:
            return self._hidden_members()
        _, index, family = slot.name.split(".")
        path = f"blocks.{index}"
        block = self.blocks[int(index)]
        if family in ("heads", "kv_groups", "attn"):
            return tuple(_attention_members(block, path, family))
        return tuple(_ffn_members(block, path, family))

    def _stream_members(self) -> list[SlotMember]:
        """The hidden dimension's entries outside the blocks (embeddings, head, final norm)."""
        raise NotImplementedError

    def _hidden_members(self) -> tuple[SlotMember, ...]:
        members = []
        for index, block in enumerate(self.blocks):
            path = f"blocks.{index}"
            if block.attn is not None:
                members += _norm_members(block.attn_norm, f"{path}.attn_norm")
                for name in ("q", "k", "v"):
                    members += _projection_members(
                        getattr(block.attn, name), f"{path}.attn.{name}", 0, None)
                members += _projection_members(block.attn.o, f"{path}.attn.o", 1, None)
            if block.ffn is not None:
                members += _norm_members(block.ffn_norm, f"{path}.ffn_norm")
                for name in ("gate", "up"):
                    if getattr(block.ffn, name) is not None:
                        members += _projection_members(
                            getattr(block.ffn, name), f"{path}.ffn.{name}", 0, None)
                members += _projection_members(block.ffn.down, f"{path}.ffn.down", 1, None)
        return tuple(self._stream_members() + members)

    def _block_gates(self, z: Mapping[str, jax.Array], index: int) -> dict[str, jax.Array | None]:
        path = f"blocks.{index}"
        unit = self.granularity == "unit"
        return {family: z.get(f"{path}.{family}") if unit else None
                for family in FAMILIES if family != HIDDEN}

    def _kernel_gates(self, z: Mapping[str, jax.Array], prefix: str, names: Iterable[str]):
        return {name: self.kernel_gate(dict(z), f"{prefix}.{name}") for name in names}

    def hidden_gate(self, z: Mapping[str, jax.Array]) -> jax.Array | None:
        return z.get(HIDDEN) if self.granularity == "unit" else None

    def _run_blocks(self, h: jax.Array, z: Mapping[str, jax.Array]) -> jax.Array:
        """The residual stream after every block, h given with the hidden gate applied. Each
        branch's sublayer and hidden gates multiply its output projection's output
        (:func:`gated_projection`)."""
        hidden = self.hidden_gate(z)
        for index, block in enumerate(self.blocks):
            gates = self._block_gates(z, index)
            path = f"blocks.{index}"
            if block.attn is not None:
                a = block.attn(
                    block.attn_norm(h, hidden),
                    head_gate=gates["heads"],
                    group_gate=gates["kv_groups"],
                    output_gates=(gates["attn"], hidden),
                    kernel_gates=self._kernel_gates(z, f"{path}.attn", "qkvo"),
                )
                h = h + a
            if block.ffn is not None:
                f = block.ffn(
                    block.ffn_norm(h, hidden),
                    unit_gate=gates["ffn"],
                    output_gates=(gates["mlp"], hidden),
                    kernel_gates=self._kernel_gates(z, f"{path}.ffn", ("gate", "up", "down")),
                )
                h = h + f
        return h


def _attention_members(block: Block, path: str, family: str) -> list[SlotMember]:
    attn, prefix = block.attn, f"{path}.attn"
    if family == "attn":
        return [member for name in ("q", "k", "v", "o")
                for member in _whole(getattr(attn, name), f"{prefix}.{name}")
                ] + _whole(block.attn_norm, f"{path}.attn_norm")
    heads, groups, dh = attn.heads, attn.kv_heads, attn.head_dim
    period = heads if family == "heads" else groups
    members = _projection_members(attn.q, f"{prefix}.q", 1, _periodic(heads * dh, period))
    if family == "kv_groups" or heads == groups:
        for name in ("k", "v"):
            members += _projection_members(getattr(attn, name), f"{prefix}.{name}", 1,
                                           _periodic(groups * dh, groups))
    return members + _projection_members(attn.o, f"{prefix}.o", 0, _periodic(heads * dh, period))


def _ffn_members(block: Block, path: str, family: str) -> list[SlotMember]:
    ffn, prefix = block.ffn, f"{path}.ffn"
    names = [name for name in ("gate", "up", "down") if getattr(ffn, name) is not None]
    if family == "mlp":
        return [member for name in names
                for member in _whole(getattr(ffn, name), f"{prefix}.{name}")
                ] + _whole(block.ffn_norm, f"{path}.ffn_norm")
    members = []
    for name in names:
        axis = 0 if name == "down" else 1
        members += _projection_members(getattr(ffn, name), f"{prefix}.{name}", axis, None)
    return members


def check_families(families: Iterable[str]) -> tuple[str, ...]:
    families = tuple(families)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown gate families {unknown}; valid: {', '.join(FAMILIES)}")
    return families
