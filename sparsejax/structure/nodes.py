"""Dead nodes of a network with zeroed weights, and the size of the node-pruned network.

A *node* is a unit of a slot that some layer writes: a neuron of a hidden dense layer or an
output channel (filter) of a convolution. Weight pruning leaves a node dead when

- no weight reaches it from a live input (its incoming kernel slice is zero): the node outputs a
  constant, which its consumers absorb into their biases (exactly for dense layers; for padded
  convolutions up to the border pixels), so it can be removed; or
- no weight leaves it towards a live output (its rows in every consumer's kernel are zero): its
  value is never read.

Biases do not keep a node alive (a zero-input node with a bias is still a constant). The rule is
applied until nothing changes, since a removed node can leave its neighbours without inputs or
outputs. Inputs the layer declarations do not gate (the image, a residual stream) are always live.
The second rule needs every reader of a node to be a declared consumer of its slot: it is not
applied to slots written by a member of a residual stream (a :class:`ChannelCoupling` with
``stream``), which layers outside the slot read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from sparsejax.models.base import (
    ChannelCoupling,
    GatedModel,
    Layer,
    UnitIndex,
    UnitSource,
    slot_size,
    unit_positions,
)
from sparsejax.structure.accounting import count_network


@dataclasses.dataclass(frozen=True)
class NodeReport:
    """Live units per slot and weight counts of the node-pruned network.

    ``kept_weights`` are the kernel entries between live units (the node-pruned network's
    weights), ``nonzero_weights`` those of them that are nonzero; ``dense_weights`` all kernel
    entries. ``kept_flops`` are the node-pruned network's MACs, ``nonzero_flops`` those of its
    nonzero weights; ``live_biases`` the biases of live output units. Node slots are the slots
    some layer writes (hidden neurons, filters).
    """

    alive_units: dict[str, int]
    slot_sizes: dict[str, int]
    node_slots: tuple[str, ...]
    kept_weights: float
    nonzero_weights: float
    dense_weights: float
    kept_flops: float
    dense_flops: float
    nonzero_flops: float
    live_biases: float

    @property
    def nodes(self) -> int:
        return sum(self.slot_sizes[s] for s in self.node_slots)

    @property
    def nodes_removed(self) -> int:
        return self.nodes - sum(self.alive_units[s] for s in self.node_slots)

    @property
    def nodes_removed_percent(self) -> float:
        return 100.0 * self.nodes_removed / self.nodes if self.nodes else 0.0

    @property
    def weight_sparsity(self) -> float:
        """Percent of the node-pruned network's weights that are zero."""
        return 100.0 * (1.0 - self.nonzero_weights / self.kept_weights) if self.kept_weights else 0.0

    @property
    def architecture(self) -> str:
        return "-".join(str(v) for v in self.alive_units.values())

    def summary(self) -> dict:
        """The report as JSON-ready ``nodes/...`` entries."""
        return {
            "nodes/architecture": self.architecture,
            "nodes/alive_units": dict(self.alive_units),
            "nodes/removed_percent": self.nodes_removed_percent,
            "nodes/kept_weights": self.kept_weights,
            "nodes/weight_sparsity": self.weight_sparsity,
            "nodes/nonzero_weights": self.nonzero_weights,
            "nodes/total_sparsity": 100.0 * (1.0 - self.nonzero_weights / self.dense_weights),
            "nodes/flops": self.kept_flops,
            "nodes/dense_flops": self.dense_flops,
        }


def _slot_sizes(layers: tuple[Layer, ...]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for layer in layers:
        for sources, units in ((layer.inputs, layer.in_units), (layer.outputs, layer.out_units)):
            for slot, placement in sources:
                sizes.setdefault(slot, slot_size(placement, units))
    return sizes


def _unit_vector(sources: UnitSource, alive: Mapping[str, np.ndarray], size: int) -> np.ndarray:
    vector = np.ones(size, bool)
    for slot, placement in sources:
        indices, units = unit_positions(placement, size)
        vector[indices] &= alive[slot][units]
    return vector


def _per_unit_any(per_position: np.ndarray, placement: int | UnitIndex, size: int) -> np.ndarray:
    """Per unit of a slot placed by ``placement``: whether any of its positions is True."""
    indices, units = unit_positions(placement, per_position.size)
    found = np.zeros(size, bool)
    np.logical_or.at(found, units, per_position[indices])
    return found


def _nonzero(kernel: np.ndarray) -> np.ndarray:
    """``(kh * kw, in / groups, out)``: which kernel entries are nonzero."""
    return kernel.reshape(-1, *kernel.shape[-2:]) != 0


def _live_pairs(layer: Layer, alive: Mapping[str, np.ndarray]) -> np.ndarray:
    """``(in / groups, out)``: whether kernel input row i and output o are both live units."""
    inputs = _unit_vector(layer.inputs, alive, layer.in_units)
    outputs = _unit_vector(layer.outputs, alive, layer.out_units)
    group_of_output = np.arange(layer.out_units) // (layer.out_units // layer.groups)
    return inputs.reshape(layer.groups, -1)[group_of_output].T & outputs[None, :]


def _inputs_used(live: np.ndarray, layer: Layer) -> np.ndarray:
    """Per input unit (``in_units``): whether a live weight leaves it."""
    per_group = live.reshape(live.shape[0], layer.groups, -1).any(axis=2)
    return per_group.T.reshape(-1)


def _readers_declared(
    slot: str, layers: tuple[Layer, ...], couplings: tuple[ChannelCoupling, ...]
) -> bool:
    """Whether the slot's declared consumers are the only readers of its producers' outputs:
    its producers are no member of a residual stream, which layers outside the slot read."""
    producers = {l.name for l in layers if any(s == slot for s, _ in l.outputs)}
    in_streams = {name for c in couplings if c.stream for name in c.layers}
    return not producers & in_streams


def alive_units(
    layers: tuple[Layer, ...],
    kernels: Mapping[str, np.ndarray],
    couplings: tuple[ChannelCoupling, ...] = (),
) -> dict[str, np.ndarray]:
    """Boolean live-unit vectors per slot, by the rules of the module docstring."""
    sizes = _slot_sizes(layers)
    alive = {slot: np.ones(size, bool) for slot, size in sizes.items()}
    check_outputs = {slot: _readers_declared(slot, layers, couplings) for slot in sizes}
    support = {l.name: _nonzero(np.asarray(kernels[l.name])).any(axis=0) for l in layers}
    changed = True
    while changed:
        has_input = {slot: None for slot in sizes}
        has_output = {slot: None for slot in sizes}
        for layer in layers:
            live = support[layer.name] & _live_pairs(layer, alive)
            for slot, placement in layer.outputs:
                reached = _per_unit_any(live.any(axis=0), placement, sizes[slot])
                has_input[slot] = reached if has_input[slot] is None else has_input[slot] | reached
            used_inputs = _inputs_used(live, layer)
            for slot, placement in layer.inputs:
                used = _per_unit_any(used_inputs, placement, sizes[slot])
                has_output[slot] = used if has_output[slot] is None else has_output[slot] | used
        changed = False
        for slot in sizes:
            new = alive[slot].copy()
            if has_input[slot] is not None:
                new &= has_input[slot]
            if has_output[slot] is not None and check_outputs[slot]:
                new &= has_output[slot]
            changed |= bool(np.any(new != alive[slot]))
            alive[slot] = new
    return alive


def layer_kernels(model: GatedModel) -> dict[str, np.ndarray]:
    """Every layer's kernel by layer name, in the layer's geometry ``kernel_shape`` (a traced
    kernel with several input or output axes flattened to ``(in, out)``, one stored ``(out,
    in)`` transposed)."""
    return {
        l.name: l.geometry(np.asarray(model.layer_module(l.name).kernel[...]))
        for l in model.layers
    }


def node_report(model: GatedModel) -> NodeReport:
    """Dead nodes of ``model`` from its kernels' zeros, and its node-pruned size."""
    layers = model.layers
    kernels = layer_kernels(model)
    alive = alive_units(layers, kernels, tuple(model.channel_couplings))
    nonzero = {
        l.name: float(np.sum(_nonzero(kernels[l.name]) & _live_pairs(l, alive)[None]))
        for l in layers
    }
    live_biases = sum(
        float(_unit_vector(l.outputs, alive, l.out_units).sum()) for l in layers if l.has_bias
    )
    values = {slot: vector.astype(np.float32) for slot, vector in alive.items()}
    kept = count_network(layers, values)
    dense = count_network(layers, {})
    node_slots = tuple(s for s in alive if any(s == o for l in layers for o, _ in l.outputs))
    return NodeReport(
        alive_units={slot: int(vector.sum()) for slot, vector in alive.items()},
        slot_sizes={slot: int(vector.size) for slot, vector in alive.items()},
        node_slots=node_slots,
        kept_weights=float(kept["weights"]),
        nonzero_weights=sum(nonzero.values()),
        dense_weights=float(dense["weights"]),
        kept_flops=float(kept["flops"]),
        dense_flops=float(dense["flops"]),
        nonzero_flops=sum(nonzero[l.name] * l.out_positions for l in layers),
        live_biases=live_biases,
    )
