"""Which units of a pruned network can be removed exactly: the slimming plan.

The plan is computed from the declarations of the layers (:attr:`Layer.reads`,
:class:`ChannelCoupling`, ``norm`` / ``input_norm``, ``groups``) and from their weights after the
deterministic gates have been folded in (:mod:`sparsejax.slim.folding`). Every producer (a layer,
or a residual stream: the members of a coupling share one keep vector) keeps output unit c unless
every layer that reads it can do without it:

- the reader *ignores* c: its kernel rows for c are zero (towards its kept outputs), or its input
  BatchNorm has scale and bias zero at c (so the normalised input is zero);
- the producer's output c is identically *zero* (BatchNorm scale and bias zero; without a
  BatchNorm, kernel column over the live inputs and bias zero) and the reader has no input
  BatchNorm (which would turn 0 into a constant) and is not a depthwise convolution;
- the producer is a dense layer without BatchNorm whose output c is a *constant* (kernel column
  zero over the live inputs, bias b_c nonzero) and the reader is a dense layer without input norm
  that reads only this producer: it absorbs relu(b_c) * W[c, :] into its bias (hidden dense layers
  are followed by ReLU in every model of the library).

A producer nobody reads (the classifier), the model input and a ``fixed`` stream keep every unit.
A depthwise convolution (``groups == in == out``) keeps exactly the channels it receives, and its
readers' verdict on its output c decides whether it ignores its input c. A reader that ignores a
unit its producer still delivers (another reader needs it) drops it through an input selection
when it declares ``input_selection``, and otherwise keeps the (zero) rows. The rules feed each
other (a removed unit can leave a column without live inputs), so they are iterated to a fixed
point; every step only removes units, so it terminates.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np

from sparsejax.models.base import MODEL_INPUT, ChannelCoupling, Layer


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """What the plan needs to know about one layer's (folded) weights.

    Attributes:
      kernel: ``(in, out)`` or ``(kh, kw, in / groups, out)``.
      bias: ``(out,)`` or None.
      norm_zero: per output unit, whether the output BatchNorm's scale and bias are both zero;
        None without an output BatchNorm.
      input_norm_zero: the same for the input BatchNorm, per input unit; None without one.
    """

    kernel: np.ndarray
    bias: np.ndarray | None
    norm_zero: np.ndarray | None
    input_norm_zero: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class SlimPlan:
    """Kept units per layer, as indices of the original network's units.

    Attributes:
      kept_outputs: per layer, its kept output units.
      kept_inputs: per layer, its kept input units (kernel rows, times groups).
      selections: per layer that reads only part of what its producers still deliver, the
        positions of its kept inputs within the delivered units.
      absorbed: per dense reader, the units of its producer whose constant output it absorbs
        into its bias.
    """

    kept_outputs: dict[str, tuple[int, ...]]
    kept_inputs: dict[str, tuple[int, ...]]
    selections: dict[str, tuple[int, ...]]
    absorbed: dict[str, tuple[int, ...]]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SlimPlan:
        fields = json.loads(text)
        return cls(**{
            name: {layer: tuple(index) for layer, index in value.items()}
            for name, value in fields.items()
        })


@dataclasses.dataclass(frozen=True)
class _Segment:
    """Where a producer's units sit in a reader's input: ``offset + c + k * total``."""

    producer: str
    offset: int
    width: int


class _Graph:
    """Producers, their widths and readers, from the layer declarations."""

    def __init__(self, layers: tuple[Layer, ...], couplings: tuple[ChannelCoupling, ...]):
        self.layers = {layer.name: layer for layer in layers}
        self.couplings = {c.name: c for c in couplings}
        self.stream_of = {member: c.name for c in couplings for member in c.layers}
        self.segments: dict[str, tuple[_Segment, ...]] = {}
        self.tiles: dict[str, int] = {}
        self.readers: dict[str, list[str]] = {}
        for layer in layers:
            self._add_reader(layer)

    def width(self, producer: str) -> int:
        if producer in self.couplings:
            return self.layers[self.couplings[producer].layers[0]].out_units
        return self.layers[producer].out_units

    def producer_of(self, layer: str) -> str:
        """The producer whose keep vector a layer's outputs follow: its stream, or itself."""
        return self.stream_of.get(layer, layer)

    def members(self, producer: str) -> tuple[str, ...]:
        return self.couplings[producer].layers if producer in self.couplings else (producer,)

    def _add_reader(self, layer: Layer) -> None:
        if not layer.reads:
            raise ValueError(
                f"layer {layer.name!r} declares no reads; slimming needs every layer's producers "
                "(Layer.reads) to slice its input"
            )
        if MODEL_INPUT in layer.reads:
            if layer.reads != (MODEL_INPUT,):
                raise ValueError(f"layer {layer.name!r} reads the model input with other producers")
            self.segments[layer.name] = ()
            self.tiles[layer.name] = 1
            return
        segments, offset = [], 0
        for producer in layer.reads:
            if producer not in self.layers and producer not in self.couplings:
                raise ValueError(f"layer {layer.name!r} reads unknown producer {producer!r}")
            segments.append(_Segment(producer, offset, self.width(producer)))
            offset += self.width(producer)
            self.readers.setdefault(producer, []).append(layer.name)
        tiles, remainder = divmod(layer.in_units, offset)
        if remainder:
            raise ValueError(
                f"layer {layer.name!r} has {layer.in_units} inputs, not a multiple of the "
                f"{offset} channels of {layer.reads}"
            )
        self.segments[layer.name] = tuple(segments)
        self.tiles[layer.name] = tiles


def _rows(kernel: np.ndarray) -> np.ndarray:
    """The kernel as ``(positions, in / groups, out)``."""
    return kernel.reshape(-1, *kernel.shape[-2:])


class _Planner:
    """Keep vectors per producer and ignored inputs per layer, refined to the fixed point."""

    def __init__(
        self,
        graph: _Graph,
        weights: Mapping[str, LayerWeights],
        keep: Mapping[str, np.ndarray],
    ):
        self.graph, self.weights, self.explicit = graph, weights, keep
        producers = {graph.producer_of(name) for name in graph.layers}
        self.keep = {p: np.ones(graph.width(p), bool) for p in producers}
        self.ignored = {
            name: np.zeros(layer.in_units, bool) for name, layer in graph.layers.items()
        }

    def delivered(self, name: str) -> np.ndarray:
        """Per input unit of layer ``name``: whether its producers still produce it."""
        segments = self.graph.segments[name]
        if not segments:
            return np.ones(self.graph.layers[name].in_units, bool)
        units = np.concatenate([self.keep[s.producer] for s in segments])
        return np.tile(units, self.graph.tiles[name])

    def kept_outputs(self, name: str) -> np.ndarray:
        """Per output unit of layer ``name``: whether it stays."""
        layer = self.graph.layers[name]
        if layer.groups > 1:
            return self.delivered(name)
        return self.keep[self.graph.producer_of(name)]

    def _is_depthwise(self, layer: Layer) -> bool:
        if layer.groups == 1:
            return False
        if not layer.groups == layer.in_units == layer.out_units:
            raise ValueError(
                f"layer {layer.name!r} is a grouped convolution that is not depthwise "
                f"(groups={layer.groups}, in={layer.in_units}, out={layer.out_units}); only "
                "depthwise convolutions can be slimmed"
            )
        return True

    def column_zero(self, name: str) -> np.ndarray:
        """Per output unit: no live input reaches it through a nonzero weight."""
        layer, kernel = self.graph.layers[name], _rows(self.weights[name].kernel)
        live = self.delivered(name) & ~self.ignored[name]
        if self._is_depthwise(layer):
            return ~np.any(kernel[:, 0, :] != 0, axis=0) | ~live
        return ~np.any(kernel[:, live, :] != 0, axis=(0, 1))

    def zero_output(self, name: str) -> np.ndarray:
        weights = self.weights[name]
        if weights.norm_zero is not None:
            return weights.norm_zero
        zero = self.column_zero(name)
        return zero if weights.bias is None else zero & (weights.bias == 0)

    def constant_output(self, name: str) -> np.ndarray:
        weights = self.weights[name]
        if weights.norm_zero is not None or weights.kernel.ndim != 2 or weights.bias is None:
            return np.zeros(weights.kernel.shape[-1], bool)
        return self.column_zero(name) & (weights.bias != 0)

    def absorbs(self, reader: str, producer: str) -> bool:
        """Whether ``reader`` can fold a constant output unit of ``producer`` into its bias."""
        layer, weights = self.graph.layers[reader], self.weights[reader]
        return (
            weights.kernel.ndim == 2 and weights.bias is not None and layer.input_norm is None
            and layer.reads == (producer,) and self.graph.tiles[reader] == 1
            and producer not in self.graph.couplings
        )

    def update_ignored(self, name: str) -> None:
        layer, weights = self.graph.layers[name], self.weights[name]
        if self._is_depthwise(layer):
            self.ignored[name] = ~self.wanted(name)
            return
        kernel = _rows(weights.kernel)[:, :, self.kept_outputs(name)]
        ignored = ~np.any(kernel != 0, axis=(0, 2))
        if weights.input_norm_zero is not None:
            ignored |= weights.input_norm_zero
        self.ignored[name] = ignored

    def dropped_by(
        self, reader: str, segment: _Segment, zero: np.ndarray, constant: np.ndarray
    ) -> np.ndarray:
        """Per unit of ``segment.producer``: whether ``reader`` can do without it."""
        layer = self.graph.layers[reader]
        total = sum(s.width for s in self.graph.segments[reader])
        ignored = self.ignored[reader].reshape(self.graph.tiles[reader], total)
        dropped = ignored[:, segment.offset:segment.offset + segment.width].all(axis=0)
        if layer.input_norm is None and layer.groups == 1:
            dropped = dropped | zero
        if self.absorbs(reader, segment.producer):
            dropped = dropped | constant
        return dropped

    def wanted(self, producer: str) -> np.ndarray:
        """Per unit: whether some reader needs it (or it cannot go)."""
        width = self.graph.width(producer)
        readers = self.graph.readers.get(producer, [])
        coupling = self.graph.couplings.get(producer)
        if not readers or (coupling is not None and coupling.fixed):
            return np.ones(width, bool)
        members = self.graph.members(producer)
        zero = np.logical_and.reduce([self.zero_output(m) for m in members])
        constant = (
            self.constant_output(producer) if producer in self.graph.layers
            else np.zeros(width, bool)
        )
        dropped = np.ones(width, bool)
        for reader in readers:
            for segment in self.graph.segments[reader]:
                if segment.producer == producer:
                    dropped &= self.dropped_by(reader, segment, zero, constant)
        explicit = self.explicit.get(producer)
        wanted = ~dropped
        return wanted if explicit is None else wanted & np.asarray(explicit, bool)

    def solve(self) -> None:
        changed = True
        while changed:
            for name in self.graph.layers:
                self.update_ignored(name)
            new_keep = {}
            for producer in self.keep:
                if producer in self.graph.layers and self.graph.layers[producer].groups > 1:
                    new_keep[producer] = self.delivered(producer)
                else:
                    new_keep[producer] = self.wanted(producer)
            changed = any(np.any(new_keep[p] != self.keep[p]) for p in self.keep)
            self.keep = new_keep

    def round_widths(self, multiple: int) -> None:
        """Keep removed units back (lowest index first) until each producer's width is a multiple
        of ``multiple`` or whole. Keeping a unit is always exact: a removed unit is zero or
        unread, whatever its readers do with it."""
        layers = self.graph.layers
        grouped = [p for p in self.keep if p in layers and layers[p].groups > 1]
        for producer, keep in self.keep.items():
            missing = -int(keep.sum()) % multiple
            if missing and producer not in grouped:
                keep = keep.copy()
                keep[np.flatnonzero(~keep)[:missing]] = True
                self.keep[producer] = keep
        for producer in grouped:  # a depthwise convolution keeps the channels it receives
            self.keep[producer] = self.delivered(producer)

    def plan(self) -> SlimPlan:
        kept_outputs, kept_inputs, selections, absorbed = {}, {}, {}, {}
        for name, layer in self.graph.layers.items():
            delivered = self.delivered(name)
            kept = delivered & ~self.ignored[name] if layer.input_selection else delivered
            if layer.groups > 1:
                kept = delivered
            kept_outputs[name] = _indices(self.kept_outputs(name))
            kept_inputs[name] = _indices(kept)
            if np.any(kept != delivered):
                selections[name] = _indices(kept[delivered])
            for segment in self.graph.segments[name]:
                if self.absorbs(name, segment.producer):
                    gone = ~self.keep[segment.producer] & self.constant_output(segment.producer)
                    if gone.any():
                        absorbed[name] = _indices(gone)
        return SlimPlan(kept_outputs, kept_inputs, selections, absorbed)


def _indices(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.flatnonzero(mask))


def plan_slimming(
    layers: tuple[Layer, ...],
    couplings: tuple[ChannelCoupling, ...],
    weights: Mapping[str, LayerWeights],
    keep: Mapping[str, np.ndarray] | None = None,
    width_multiple: int = 1,
) -> SlimPlan:
    """The units to keep, by the rules of the module docstring.

    ``keep`` optionally forces units out: per producer (a layer, or a stream by its coupling
    name), a boolean vector; units where it is False are removed whether or not they are zero.
    ``width_multiple`` > 1 keeps some removable units so that every producer's width is a
    multiple of it (convolutions of widths like 8k run faster on some backends than narrower
    ones); the outputs stay exact, the saved FLOPs are fewer.
    """
    if width_multiple < 1:
        raise ValueError(f"width_multiple must be a positive integer, got {width_multiple}")
    graph = _Graph(layers, couplings)
    unknown = sorted(set(keep or {}) - {graph.producer_of(n) for n in graph.layers})
    if unknown:
        raise ValueError(
            f"keep names {unknown}, which are not producers of the model (a layer outside any "
            f"stream, or a stream: {sorted(graph.couplings)})"
        )
    planner = _Planner(graph, weights, keep or {})
    planner.solve()
    planner.round_widths(width_multiple)
    return planner.plan()
