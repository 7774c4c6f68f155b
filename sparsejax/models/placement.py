"""Where a paper puts a model's gates, written beside the model: :class:`GatePlacement`.

A plain NNX model says where its unit gates go with a ``gate_placements`` attribute, a tuple of
placements naming its own layers (the zoo's models, and a user's under ``--model``);
:class:`~sparsejax.structure.traced_model.TracedModel` resolves them against the model's traced
structure. This module holds only the description, so that a model can carry it without
depending on the tracer.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

DROPRATE_INIT = 0.5
"""Initial drop rate of every gate of a traced model (the L0 references' hidden-layer value)."""


Side = Literal["input", "output"]


@dataclasses.dataclass(frozen=True)
class GatePlacement:
    """One unit-gate slot of a
    :class:`~sparsejax.structure.traced_model.TracedModel` placed by hand, for a model whose paper
    gates other units than the default (every removable traced group):

    - ``side="output"``: the output units of ``layer``, which must be one removable traced
      group (a layer's outputs, a depthwise convolution's channels; not one whose units a
      normaliser's statistics read). The gates act as the group's
      default gates do, on its readers; ``|g|`` is the layer's kernel slice and bias, the group
      of Louizos et al. (2018) for a convolution's output channel.
    - ``side="output"`` with ``norm``, on a removable group: the group, its gates multiplying
      the output of the normaliser ``norm`` that follows ``layer`` (its scale and bias) rather
      than the group's readers, for an activation after it that a gate does not commute with
      (ReLU6: MobileNetV2's hidden channels). ``|g|`` is the layer's kernel slice and bias.
    - ``side="output"`` with ``norm``, on outputs that are no removable group: the output of
      the normaliser ``norm`` that follows ``layer``, alone: one member of a residual stream,
      whose group is not prunable (the stem of the CIFAR ResNets, Dep-L0's placement). The
      gates multiply the normaliser's scale and bias, which is multiplying its output, and the
      layers in ``readers``, which read that output before it joins the stream (on one kernel
      axis), lose the closed units' inputs in the accounting and their rows in the slim
      network; the stream keeps its width, and the layer its closed units' outputs in the slim
      network, which its counts take out. ``|g|`` is the layer's kernel slice and bias.
    - ``side="input"``: one gate per input unit of ``layer``. When those units are a removable
      group that only ``layer`` reads and no output placement gates, they are that group (its
      producers' outputs are switched off with it); otherwise an *input selection* that gates
      the layer's rows alone (the pixel gates of LeNet-300-100, the 800 flattened inputs of
      LeNet-5's first dense layer, DenseNet's concatenated inputs). ``|g|`` is one row of the
      layer's kernel (Louizos et al.'s group of a dense layer's input neuron).
    - ``side="output"`` with ``heads=H``: the output units of ``layer`` (a removable group) in
      the ``H`` heads that a product of two activations splits them into (a flat projection
      reshaped into heads, ``Q K^T`` or ``A V`` summing within each head), one gate per head.
      Placements of several layers with the same ``slot`` and ``heads`` make one slot: a
      head's queries and keys (``layer`` the query projection) and its values (the value
      projection), closed together. The gates multiply where the head's units are read by a
      layer (the output projection's rows, so a gate scales the head's output, as in Voita et
      al. 2019); the query/key units, which only the scores read, go with their head in the
      counts and when slimming. ``|g|`` is everything one head removes. On a
      ``(dim, heads, head_dim)`` kernel (``nnx.MultiHeadAttention``) the placement takes the
      output axis of ``H`` units, whose group is the heads: the query and the value
      projections name the same group, and the slot gates it once. The output columns may
      share units (a fused ``qkv`` projection, one group split by both products, placed
      once; grouped-query attention's queries, whose heads are the key/value groups).
    - ``side="output"`` with ``heads=H`` in grouped-query attention, where H query heads
      share G < H key/value heads: a query head shares its group's key and value units, so
      no split of units gives H heads; the trace tags each query head's positions instead
      (:mod:`~sparsejax.structure.trace.tags`), and ``heads=H`` on the query (or the value)
      projection gates the H tagged heads. A gate scales its head's rows of the output
      projection; its query columns and bias go with it in the counts and when slimming,
      where every key/value group keeps as many heads as the group with the most live ones
      (the query projection is reshaped into groups of one size). ``|g|`` is the head's query
      columns, bias and output rows.

    - ``side="output"`` with ``branch``: one gate for the whole output of ``layer``, the last
      layer of a residual branch (a transformer's sublayer, gated as in Fan et al. 2020's
      LayerDrop and CoFi's ``attn`` / ``mlp`` masks: the output projection, with the query,
      key and value projections as ``branch``; an FFN's down projection, with its up
      projection). The gate multiplies ``layer``'s output columns and bias, which is
      multiplying the branch's output; a closed gate removes every kernel and bias of
      ``layer`` and ``branch`` and the products of two activations that read their outputs,
      and ``|g|`` is all of those parameters, the slot's members
      (:meth:`~sparsejax.structure.traced_model.TracedModel.slot_members`). The layers of
      ``branch`` must feed no layer outside
      it but ``layer``. The slot names ``layer`` along its input axis, as a slot of heads
      does.

    - ``stream``: the units of a residual stream that normalisers read (the hidden dimension
      of a pre-norm transformer, CoFi's hidden mask, Xia et al. 2022): the units on ``side``
      of ``layer`` (a producer's outputs, or a tied output head's inputs) are the stream, and
      ``stream`` names the normalisers (module paths) whose statistics read it. The gates
      multiply every write into the stream (its producers' output columns and biases,
      parameters added or concatenated into it such as position embeddings and a class
      token, the rows of an embedding table looked up into it), so a closed unit is exactly
      0 in the stream; each reduction over the stream's units (a normaliser's mean or mean
      square) is taken over the open units only, sum(x * m) * d / n for the open mask m
      (z != 0) of n units, and the kernels that read the stream lose the closed units' rows
      (multiplied by m; a tied table, read as the head, too). A closed unit is then the
      network without it: ``|g|`` is everything one unit removes, and the slim network keeps
      exactly the open units (no ``round_to``), its reductions divided by the kept width.

    Placements give the gated methods their slots; the methods that prune filters and units
    (GReg, gmp: :attr:`~sparsejax.methods.base.Method.uses_gate_placements`) take every
    removable group instead.

    Attributes:
      slot: the slot's name (in the gates, the config's per-slot lambdas and the reports).
      layer: the traced layer, named after the module holding its kernel (``"blocks.0.conv1"``).
      side: ``"input"`` or ``"output"``.
      droprate_init: the initial drop rate of the slot's gates.
      norm: the module path of the normaliser (with ``scale`` and ``bias``) whose output the
        gates multiply, for an output that is one member of a larger group or a group read
        through an activation that its gates do not commute with; None otherwise.
      readers: the traced layers that read the normaliser's output alone (``norm`` on an
        output that is no removable group only).
      heads: the number of heads the output units are split into, one gate each; 0 for one
        gate per unit.
      whole_unit: ``|g|`` is everything a unit removes (its producers' kernel slices and
        biases and every reader's rows, as for the default slots) instead of the placed
        layer's slice or row: the transformers' FFN units. Only where the placed units are a
        traced group.
      branch: the traced layers that only feed ``layer``: with it, one residual branch under
        one gate; empty for unit gates.
      stream: the normalisers (module paths) whose statistics read the units of a residual
        stream that ``layer`` writes: its hidden dimension under one gate per unit; empty
        otherwise.
    """

    slot: str
    layer: str
    side: Side
    droprate_init: float = DROPRATE_INIT
    norm: str | None = None
    readers: tuple[str, ...] = ()
    heads: int = 0
    whole_unit: bool = False
    branch: tuple[str, ...] = ()
    stream: tuple[str, ...] = ()


