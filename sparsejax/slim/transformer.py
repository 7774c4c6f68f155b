"""Slimming the declared transformer (``lm_tiny``) into a smaller one of the same class (the
ViT, a plain module, slims from its trace).

A head spans q, k, v and o, and the hidden dimension is a stream through every block, so a
transformer is cut by its own structure. The test-time gates are folded into the weights, exactly
for any gate value:

- ``hidden`` z_d multiplies everything written to the stream: the embedding table's rows (tied,
  the final norm's scale is divided by z_d on the open dimensions so the head still reads the
  unscaled table) and every branch (the o and down projections' columns and biases);
- ``attn`` / ``mlp`` multiply their branch: o's / down's columns and bias;
- ``heads`` and ``kv_groups`` multiply a head's output before o: o's rows of that head;
- ``ffn`` multiplies a hidden unit before down: down's row;
- weight gates multiply their kernel.

Then a hidden dimension goes when its gate is 0 (every norm takes its statistics over the open
dimensions, so the model without it is the same network); a query head when its o rows are 0
over the kept dimensions; a KV group when none of its heads stays (its k and v columns go); an
FFN unit when its down row is 0; a sublayer when its branch multiplier is 0 on every kept
dimension, or when it has no unit left and no bias (a bias-only branch keeps one unit with zero
output weights: a constant cannot be moved elsewhere); a block when both its sublayers go.

Grouped-query attention needs the same number M of query heads in every KV group. A slim block
keeps M' = the largest number of live heads in a kept group and fills the other groups with
their removed heads, whose o rows are zero (exact, but not minimal: the report counts them).

The slim model is built from the original's :meth:`architecture` with per-block widths
(``heads``, ``kv_heads``, ``ffn_hidden`` as tuples, 0 for a missing sublayer),
so :func:`~sparsejax.slim.store.load_slim` rebuilds it from those arguments.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.models.transformer import TransformerModel
from sparsejax.slim.folding import test_gate_values
from sparsejax.slim.result import SlimPlan, SlimResult, slim_report


@dataclasses.dataclass
class _Cut:
    """Arrays of the slim model by attribute path, and the kept rows / columns of each original
    layer (the plan)."""

    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    rows: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def layer(self, source: str, target: str, kernel: np.ndarray, bias: np.ndarray | None,
              rows: np.ndarray, columns: np.ndarray) -> None:
        self.arrays[f"{target}.kernel"] = kernel[np.ix_(rows, columns)]
        if bias is not None:
            self.arrays[f"{target}.bias"] = bias[columns]
        self.rows[source], self.columns[source] = rows, columns


class _Folded:
    """The model's arrays as numpy, with the weight gates folded into the kernels, and its unit
    gate values (1 where a slot has no gate)."""

    def __init__(self, model: TransformerModel):
        self.model = model
        values = test_gate_values(model)
        self.unit = {} if model.granularity != "unit" else values
        self.weight = values if model.granularity == "weight" else {}

    def gate(self, name: str, size: int) -> np.ndarray:
        if name not in self.unit:
            return np.ones(size, np.float32)
        value = np.asarray(self.unit[name], np.float32)
        if value.size != size:
            raise ValueError(
                f"gate slot {name!r} has per-example or misshapen test-time values {value.shape}; "
                f"slimming needs one value per unit ({size})"
            )
        return value.reshape(size)

    def kernel(self, layer: str) -> np.ndarray:
        kernel = np.asarray(self.model.module_at(layer).kernel[...], np.float32)
        if layer in self.weight:
            kernel = kernel * np.asarray(self.weight[layer], np.float32)
        return kernel

    def bias(self, layer: str) -> np.ndarray | None:
        bias = getattr(self.model.module_at(layer), "bias", None)
        return None if bias is None else np.asarray(bias[...], np.float32)

    def array(self, path: str) -> np.ndarray:
        module, _, name = path.rpartition(".")
        owner = self.model.module_at(module) if module else self.model
        return np.asarray(getattr(owner, name)[...], np.float32)


def _norm(folded: _Folded, cut: _Cut, source: str, target: str, hidden: np.ndarray) -> None:
    cut.arrays[f"{target}.scale"] = folded.array(f"{source}.scale")[hidden]
    if folded.model.module_at(source).bias is not None:
        cut.arrays[f"{target}.bias"] = folded.array(f"{source}.bias")[hidden]


def _attention(folded: _Folded, cut: _Cut, source: str, target: str, stream: np.ndarray,
               hidden: np.ndarray) -> tuple[int, int]:
    """Cut block ``source``'s attention into ``target``; (query heads, KV heads), (0, 0) if it
    goes. ``stream`` is the branch's multiplier per hidden dimension."""
    attn = folded.model.module_at(f"{source}.attn")
    heads, groups, dh = attn.heads, attn.kv_heads, attn.head_dim
    per_group = heads // groups
    if not np.any(stream[hidden] != 0):
        return 0, 0
    z = folded.gate(f"{source}.heads", heads)
    if per_group > 1:
        z = z * folded.gate(f"{source}.kv_groups", groups)[np.arange(heads) % groups]
    o = folded.kernel(f"{source}.attn.o").reshape(dh, heads, -1) * z[None, :, None]
    o = (o * stream).reshape(dh * heads, -1)
    o_bias = folded.bias(f"{source}.attn.o")
    o_bias = None if o_bias is None else o_bias * stream
    live = np.any(o.reshape(dh, heads, -1)[:, :, hidden] != 0, axis=(0, 2))
    by_group = [[m for m in range(per_group) if live[m * groups + g]] for g in range(groups)]
    kept_groups = [g for g in range(groups) if by_group[g]]
    if not kept_groups:
        if o_bias is None or not np.any(o_bias[hidden] != 0):
            return 0, 0
        kept_groups, by_group[0] = [0], [0]  # a bias-only branch: one head with zero o rows
    kept_per_group = max(len(by_group[g]) for g in kept_groups)
    source_head = np.empty((kept_per_group, len(kept_groups)), np.int64)
    for column, g in enumerate(kept_groups):
        order = by_group[g] + [m for m in range(per_group) if m not in by_group[g]]
        source_head[:, column] = np.asarray(order[:kept_per_group]) * groups + g
    query = (np.arange(dh)[:, None, None] * heads + source_head[None]).reshape(-1)
    key = (np.arange(dh)[:, None] * groups + np.asarray(kept_groups)[None]).reshape(-1)
    for name, columns in (("q", query), ("k", key), ("v", key)):
        layer = f"{source}.attn.{name}"
        cut.layer(layer, f"{target}.attn.{name}", folded.kernel(layer), folded.bias(layer),
                  hidden, columns)
    cut.layer(f"{source}.attn.o", f"{target}.attn.o", o, o_bias, query, hidden)
    _norm(folded, cut, f"{source}.attn_norm", f"{target}.attn_norm", hidden)
    return source_head.size, len(kept_groups)


def _ffn(folded: _Folded, cut: _Cut, source: str, target: str, stream: np.ndarray,
         hidden: np.ndarray) -> int:
    """Cut block ``source``'s FFN into ``target``; its kept hidden units, 0 if it goes."""
    ffn = folded.model.module_at(f"{source}.ffn")
    if not np.any(stream[hidden] != 0):
        return 0
    units = ffn.up.out_features
    down = folded.kernel(f"{source}.ffn.down") * folded.gate(f"{source}.ffn", units)[:, None]
    down = down * stream
    down_bias = folded.bias(f"{source}.ffn.down")
    down_bias = None if down_bias is None else down_bias * stream
    kept = np.flatnonzero(np.any(down[:, hidden] != 0, axis=1))
    if kept.size == 0:
        if down_bias is None or not np.any(down_bias[hidden] != 0):
            return 0
        kept = np.zeros(1, np.int64)  # a bias-only branch: one unit with a zero down row
    for name in ("gate", "up") if ffn.gate is not None else ("up",):
        layer = f"{source}.ffn.{name}"
        cut.layer(layer, f"{target}.ffn.{name}", folded.kernel(layer), folded.bias(layer),
                  hidden, kept)
    cut.layer(f"{source}.ffn.down", f"{target}.ffn.down", down, down_bias, kept, hidden)
    _norm(folded, cut, f"{source}.ffn_norm", f"{target}.ffn_norm", hidden)
    return int(kept.size)


def _ends(folded: _Folded, cut: _Cut, z_hidden: np.ndarray, hidden: np.ndarray) -> None:
    """The embedding table (dim, vocab), read by rows, with the hidden gate folded into it; the
    final norm; an untied head."""
    table = folded.kernel("embed") * z_hidden[:, None]
    cut.layer("embed", "embed", table, None, hidden, np.arange(table.shape[1]))
    _norm(folded, cut, "final_norm", "final_norm", hidden)
    if folded.model.tied:
        cut.arrays["final_norm.scale"] = cut.arrays["final_norm.scale"] / z_hidden[hidden]
    else:
        head = folded.kernel("head")
        cut.layer("head", "head", head, None, hidden, np.arange(head.shape[1]))


def _assign(model: TransformerModel, arrays: dict[str, np.ndarray]) -> None:
    for path, value in arrays.items():
        module, _, name = path.rpartition(".")
        variable = getattr(model.module_at(module) if module else model, name)
        if variable[...].shape != value.shape:
            raise AssertionError(f"{path}: slim shape {variable[...].shape}, cut {value.shape}")
        variable[...] = jnp.asarray(value, variable[...].dtype)


def slim_transformer(model: TransformerModel) -> SlimResult:
    """The slim copy of ``model`` (module docstring): same class, smaller per-block widths,
    no gates, the same eval outputs. The input model is not modified."""
    folded, cut = _Folded(model), _Cut()
    z_hidden = folded.gate("hidden", model.dim)
    hidden = np.flatnonzero(z_hidden != 0)
    if hidden.size == 0:
        raise ValueError("every hidden dimension is closed: the slim network would be empty")
    widths: dict[str, list[int]] = {"heads": [], "kv_heads": [], "ffn_hidden": []}
    for index in range(len(model.blocks)):
        source, target = f"blocks.{index}", f"blocks.{len(widths['heads'])}"
        block = model.blocks[index]
        heads = kv_heads = units = 0
        if block.attn is not None:
            stream = z_hidden * folded.gate(f"{source}.attn", 1)[0]
            heads, kv_heads = _attention(folded, cut, source, target, stream, hidden)
        if block.ffn is not None:
            stream = z_hidden * folded.gate(f"{source}.mlp", 1)[0]
            units = _ffn(folded, cut, source, target, stream, hidden)
        if heads == units == 0:
            continue
        widths["heads"].append(heads)
        widths["kv_heads"].append(kv_heads)
        widths["ffn_hidden"].append(units)
    _ends(folded, cut, z_hidden, hidden)
    architecture = dict(model.architecture())
    architecture.update(dim=int(hidden.size), depth=len(widths["heads"]),
                        **{name: tuple(values) for name, values in widths.items()})
    slim = type(model)(rngs=nnx.Rngs(params=0), **architecture)
    _assign(slim, cut.arrays)
    plan = SlimPlan(
        kept_outputs={name: _indices(c) for name, c in cut.columns.items()},
        kept_inputs={name: _indices(r) for name, r in cut.rows.items()},
    )
    report = slim_report(model, slim)
    return SlimResult(slim, plan, report, architecture)


def _indices(index: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in index)
