"""Which layers GReg prunes and at which ratio (Wang et al., ICLR 2021, code ``meta_pruner.py``).

**Layers** (weight granularity: every kernel's single weights): one ratio per layer index
``0..L-1``, given as a sequence, a mapping ``{index or "a-b": ratio}`` or the reference's string
``"[1-15:0.7]"`` (unlisted layers: 0), or a single float for every layer. On a traced network of
residual blocks a sequence is a *stage list* instead (below). Layers at ratio 0 are not pruned.
Filter granularity prunes the units of gate slots (below), never a layer's outputs directly.

**Transformers** (``vit_tiny``, ``lm_tiny``) with filter granularity prune the units of their
gate slots instead of kernel filters (:func:`slot_ratios`): a head, KV group, FFN unit or hidden
dimension is the group of every parameter entry it spans. ``stage_pr`` is a float for the
``heads`` and ``ffn`` families of every block (:data:`DEFAULT_SLOT_FAMILIES`) or one ratio per
family, ``{"heads": 0.5, "hidden": 0.25}`` or ``"heads:0.5,hidden:0.25"``.

**Traced models** (the convolutional zoo, ``--model=MODULE:FACTORY``) with filter granularity
prune the units of their gate slots, the prunable groups the trace found
(:func:`traced_slot_ratios`): ``stage_pr`` is one float for every slot (on a network of residual
blocks, every slot inside a block), one ratio per slot, ``{"conv1": 0.5}`` or
``"conv1:0.5,mix:0.25"`` (unlisted slots: 0), or one ratio per layer index of the traced layers
in network order (``"[1-15:0.7]"``, a sequence or ``{index: ratio}``), each pruning the group of
its layer's outputs. On a network of residual blocks a sequence is the stage list ``[stem,
stage 1, ..., stage k, fc]`` instead (GReg's for the ResNets): the slots inside its blocks (no
stream, read by at most one layer) at their stage's ratio, a stage being an output resolution
(:func:`~sparsejax.structure.blocks.traced_stages`). With weight granularity the traced layers
take the rules of the layers above: one ratio per layer index, or, on a network of residual
blocks, a sequence as the stage list, every kernel at the stage of the stream it writes to
(:func:`~sparsejax.structure.blocks.traced_layer_stages`), the stem at the first entry and the
classifier at the last.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from sparsejax.errors import ConfigError
from sparsejax.models.base import GateSlot, Layer
from sparsejax.models.transformer import FAMILIES, slot_family
from sparsejax.structure.blocks import inside_blocks

GROUP_GRANULARITIES: tuple[str, ...] = ("filter", "weight")

RatioSpec = float | Sequence[float] | Mapping[int | str, float] | str
"""A float, a per-layer (or per-stage) sequence, an index mapping or the reference's string."""

DEFAULT_SLOT_FAMILIES: tuple[str, ...] = ("heads", "ffn")
"""The transformer families a single ``stage_pr`` float prunes: attention heads (Voita et al.
2019) and FFN units, the two that leave the residual stream and the block count unchanged."""
_DICT_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*:\s*([0-9.eE+-]+)\s*$")


def _parse_string(spec: str) -> float | list[float] | dict[int, float]:
    """``"0.5"``, ``"[0, 0.75, 0.75, 0.32, 0]"`` or ``"[1-15:0.7, 16:0.5]"``."""
    text = spec.strip()
    inner = text.strip("[](){}")
    if ":" not in inner:
        try:
            values = [float(v) for v in inner.split(",") if v.strip()]
        except ValueError as error:
            raise ConfigError(f"cannot read pruning ratios from {spec!r}") from error
        if text[:1] in "[({":
            return values
        return values[0] if len(values) == 1 else values
    ratios: dict[int, float] = {}
    for item in inner.split(","):
        match = _DICT_ITEM.match(item)
        if match is None:
            raise ConfigError(
                f"cannot read {item!r} in pruning ratios {spec!r}; write items as "
                "'index:ratio' or 'first-last:ratio', e.g. '[1-15:0.7]'"
            )
        first, last, ratio = match.groups()
        for index in range(int(first), int(last or first) + 1):
            ratios[index] = float(ratio)
    return ratios


def _index_mapping(spec: Mapping[int | str, float]) -> dict[int, float]:
    ratios: dict[int, float] = {}
    for key, ratio in spec.items():
        first, _, last = str(key).partition("-")
        for index in range(int(first), int(last or first) + 1):
            ratios[index] = float(ratio)
    return ratios


def _check_ratio(name: str, ratio: float) -> float:
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(
            f"config.stage_pr gives layer {name!r} the pruning ratio {ratio}; ratios must lie in "
            "[0, 1) (the fraction of the layer's groups to remove)"
        )
    return ratio


def _single_branch_ratios(
    layers: Sequence[Layer], spec: float | list[float] | dict[int, float]
) -> dict[str, float]:
    if isinstance(spec, float):
        spec = {i: spec for i in range(len(layers))}
    elif isinstance(spec, list):
        if len(spec) != len(layers):
            names = ", ".join(layer.name for layer in layers)
            raise ConfigError(
                f"stage_pr has {len(spec)} ratios but the model has {len(layers)} layers "
                f"({names}); give one per layer, a float or an index mapping like '[1-2:0.5]'"
            )
        spec = dict(enumerate(spec))
    unknown = sorted(i for i in spec if not 0 <= i < len(layers))
    if unknown:
        raise ConfigError(
            f"stage_pr names layer indices {unknown}; the model has 0..{len(layers) - 1}"
        )
    return {layers[i].name: ratio for i, ratio in spec.items()}


def _stage_list_ratios(spec: list[float], stages: Mapping[str, int]) -> dict[str, float]:
    """``[stem, stage 1, ..., stage k, fc]`` on a traced network: each layer at the entry
    :func:`~sparsejax.structure.blocks.traced_layer_stages` gives it."""
    entries = max(stages.values()) + 1
    if len(spec) != entries:
        raise ConfigError(
            f"stage_pr {spec} must be [stem, one ratio per stage, fc] for this traced residual "
            f"network, whose blocks have {entries - 2} stages (by output resolution), or ratios "
            "per layer index like '[3-5:0.5]'"
        )
    return {name: spec[stage] for name, stage in stages.items()}


def layer_ratios(
    layers: Sequence[Layer],
    spec: RatioSpec,
    stages: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """``{layer name: ratio}`` for every layer whose weights GReg prunes (ratio > 0), in
    network order. ``stages`` (:func:`~sparsejax.structure.blocks.traced_layer_stages`) make a
    sequence a stage list over a traced residual network's layers."""
    if isinstance(spec, str):
        spec = _parse_string(spec)
    if isinstance(spec, (int, float)):
        spec = float(spec)
    elif isinstance(spec, Mapping):
        spec = _index_mapping(spec)
    else:
        spec = [float(v) for v in spec]
    if stages is not None and isinstance(spec, list):
        ratios = _stage_list_ratios(spec, stages)
    else:
        ratios = _single_branch_ratios(layers, spec)
    checked = {name: _check_ratio(name, r) for name, r in ratios.items()}
    order = [layer.name for layer in layers]
    return {name: checked[name] for name in order if checked.get(name, 0.0) > 0.0}


class _KeyedSpec(NamedTuple):
    """How one kind of model names its ratios in ``stage_pr``: ``key:ratio`` items matched by
    ``item``; ``kind``, ``key``, ``one`` (what a single ratio prunes) and the examples make its
    error messages."""

    item: re.Pattern
    kind: str
    key: str
    one: str
    items_example: str
    mapping_example: str


_FAMILIES = _KeyedSpec(
    re.compile(r"^\s*([a-z_]+)\s*:\s*([0-9.eE+-]+)\s*$"), "a transformer", "family",
    "(heads and FFN units)", "heads:0.5,ffn:0.25", "{'heads': 0.5, 'hidden': 0.25}",
)
_SLOTS = _KeyedSpec(
    re.compile(r"^\s*([\w.]+)\s*:\s*([0-9.eE+-]+)\s*$"), "a traced model", "slot",
    "for every gated group", "conv1:0.5,blocks.0.conv:0.25",
    "{'conv1': 0.5, 'blocks.0.conv': 0.25}",
)


def _keyed_ratios(spec: RatioSpec, form: _KeyedSpec) -> float | dict[str, float]:
    """One ratio, or ``{key: ratio}`` from a mapping or ``"key:ratio,..."``."""
    if isinstance(spec, (int, float)):
        return float(spec)
    if hasattr(spec, "items"):  # a mapping or a ConfigDict
        return {str(key): float(ratio) for key, ratio in spec.items()}
    if isinstance(spec, str):
        text = spec.strip().strip("[](){}")
        if ":" not in text:
            return float(text)
        ratios = {}
        for item in text.split(","):
            match = form.item.match(item)
            if match is None:
                raise ConfigError(
                    f"cannot read {item!r} in stage_pr {spec!r}; {form.kind} takes "
                    f"'{form.key}:ratio' items, e.g. {form.items_example!r}"
                )
            ratios[match.group(1)] = float(match.group(2))
        return ratios
    raise ConfigError(
        f"stage_pr={spec!r}: {form.kind} takes one ratio {form.one} or one per gate "
        f"{form.key}, e.g. {form.mapping_example}"
    )


def slot_ratios(slots: Sequence[GateSlot], spec: RatioSpec) -> dict[str, float]:
    """``{slot name: ratio}`` for every transformer slot GReg prunes (ratio > 0), in slot
    order: the slots of the families ``spec`` names (module docstring)."""
    ratios = _keyed_ratios(spec, _FAMILIES)
    if isinstance(ratios, float):
        ratios = dict.fromkeys(DEFAULT_SLOT_FAMILIES, ratios)
    present = {slot_family(slot.name) for slot in slots}
    unknown = sorted(set(ratios) - present)
    if unknown:
        raise ConfigError(
            f"stage_pr names the gate families {unknown}, which the model does not have "
            f"(valid: {', '.join(f for f in FAMILIES if f in present)})"
        )
    chosen = {
        slot.name: _check_ratio(slot.name, ratios[slot_family(slot.name)])
        for slot in slots
        if slot_family(slot.name) in ratios
    }
    return {name: ratio for name, ratio in chosen.items() if ratio > 0.0}


_INDEX_KEY = re.compile(r"^\s*\d+\s*(?:-\s*\d+\s*)?$")


def _layer_indexed(spec: RatioSpec) -> list[float] | dict[int, float] | None:
    """``spec`` as ratios per layer index (a sequence, an index mapping, or either written as
    the reference's string), or None when it is one ratio or keyed by slot names."""
    if isinstance(spec, str):
        items = spec.strip().strip("[](){}").split(",")
        if len(items) > 1 and all(":" not in item for item in items):
            return _parse_string(spec)
        if all(_DICT_ITEM.match(item) for item in items):
            return _parse_string(spec)
        return None
    if hasattr(spec, "items"):
        keys = [str(key) for key in spec.keys()]
        return _index_mapping(spec) if keys and all(_INDEX_KEY.match(k) for k in keys) else None
    if isinstance(spec, (list, tuple)):
        return [float(v) for v in spec]
    return None


def _traced_layer_ratios(
    slots: Sequence[GateSlot], spec: list[float] | dict[int, float], layers: Sequence[str]
) -> dict[str, float]:
    """``{slot name: ratio}`` for ratios per layer index: a layer's ratio prunes the slot of
    the group its outputs are (the single-branch rule of the zoo, on the traced layers)."""
    if isinstance(spec, list):
        if len(spec) != len(layers):
            raise ConfigError(
                f"stage_pr has {len(spec)} ratios but the traced model has {len(layers)} "
                f"layers ({', '.join(layers)}); give one per layer, a float, an index mapping "
                "like '[1-2:0.5]' or ratios per slot"
            )
        spec = dict(enumerate(spec))
    unknown = sorted(i for i in spec if not 0 <= i < len(layers))
    if unknown:
        raise ConfigError(
            f"stage_pr names layer indices {unknown}; the traced model has 0..{len(layers) - 1}"
        )
    slot_of = {slot.layer: slot.name for slot in slots}
    ratios = {}
    for index, ratio in sorted(spec.items()):
        if ratio == 0.0:
            continue
        if layers[index] not in slot_of:
            prunable = [i for i, name in enumerate(layers) if name in slot_of]
            raise ConfigError(
                f"stage_pr prunes layer {index} ({layers[index]!r}), whose outputs are not a "
                f"prunable group of the traced model; the layers with one are {prunable}"
            )
        ratios[slot_of[layers[index]]] = ratio
    return ratios


def _traced_stage_ratios(spec: list[float], stages: Mapping[str, int | None]) -> dict[str, float]:
    """``[stem, stage 1, ..., stage k, fc]``: each slot inside a block at its stage's ratio."""
    found = len({s for s in stages.values() if s is not None})
    if len(spec) - 2 != found:
        raise ConfigError(
            f"stage_pr {spec} must be [stem, one ratio per stage, fc] for this traced residual "
            f"network, whose blocks have {found} stages (by output resolution), or ratios per "
            "layer index like '[3-5:0.5]' or per slot"
        )
    if spec[0] or spec[-1]:
        raise ConfigError(
            f"stage_pr {spec}: the stem and fc ratios must be 0 with filter granularity (the "
            "stem sets the residual width, fc the classes)"
        )
    return {name: spec[1 + stage] for name, stage in stages.items() if stage is not None}


def traced_slot_ratios(
    slots: Sequence[GateSlot],
    spec: RatioSpec,
    layers: Sequence[str] = (),
    stages: Mapping[str, int | None] | None = None,
) -> dict[str, float]:
    """``{slot name: ratio}`` for every slot of a traced model GReg prunes (ratio > 0), in slot
    order: one ratio for every slot (on a residual network every slot inside a block,
    :func:`~sparsejax.structure.blocks.inside_blocks`), the slots ``spec`` names, for ratios
    per layer index (``layers``: the traced layers in network order) the slot of each layer's
    outputs, or, for a sequence on a residual network (``stages``:
    :func:`~sparsejax.structure.blocks.traced_stages`), the zoo's stage list ``[stem, stage 1,
    ..., stage k, fc]`` over the slots inside its blocks."""
    indexed = _layer_indexed(spec)
    names = [slot.name for slot in slots]
    if isinstance(indexed, list) and stages is not None:
        ratios = _traced_stage_ratios(indexed, stages)
    elif indexed is not None:
        ratios = _traced_layer_ratios(slots, indexed, layers)
    else:
        ratios = _keyed_ratios(spec, _SLOTS)
        if isinstance(ratios, float):
            ratios = dict.fromkeys(inside_blocks(names, stages), ratios)
        unknown = sorted(set(ratios) - set(names))
        if unknown:
            raise ConfigError(
                f"stage_pr names the gate slots {unknown}, which the model does not have "
                f"(valid: {', '.join(names)})"
            )
    chosen = {name: _check_ratio(name, ratios[name]) for name in names if name in ratios}
    return {name: ratio for name, ratio in chosen.items() if ratio > 0.0}
