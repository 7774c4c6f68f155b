"""What a network keeps: active units, expected L0, params and FLOPs, from its deterministic gates
or, for a network without gates, from the zeros of its weights."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from sparsejax.gates.base import active
from sparsejax.models.base import GatedModel
from sparsejax.structure.accounting import count_network
from sparsejax.structure.nodes import alive_units, layer_kernels, node_report


@dataclasses.dataclass(frozen=True)
class GateReport:
    """What the deterministic (test-time) gates keep, and expectations under the gate noise.

    ``active_units`` has one count per declared gate slot, in network order (an ungated slot
    counts all its units): the L0 papers' architecture string. ``expected_l0`` and
    ``expected_flops`` are the expected number of nonzero parameters and MACs when gates are drawn
    from their training distribution; ``params``, ``flops`` and ``pruning_rate`` are those of the
    network under the test-time gates; ``dense_*`` those of the ungated network.
    :func:`weight_report` fills it for a network without gates from the zeros of its weights.
    """

    active_units: dict[str, int]
    slot_sizes: dict[str, int]
    expected_l0: float
    expected_flops: float
    params: float
    flops: float
    dense_params: float
    dense_flops: float
    pruning_rate: float
    test_gates: dict[str, np.ndarray]

    @property
    def architecture(self) -> str:
        return "-".join(str(v) for v in self.active_units.values())


@nnx.jit
def _gate_values(gates: nnx.Dict) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Every gate's test-time value and keep probability, in one compiled program. (Run op by
    op, a report's first call compiled each small operation on its own: 1.4 s against 0.4 s
    for Dep-L0's LeNet-5 gates, whose generator runs inside.)"""
    test_gates = {name: gate.test_gate() for name, gate in gates.items()}
    keep_probs = {name: gate.prob_nonzero() for name, gate in gates.items()}
    return test_gates, keep_probs


def gate_report(model: GatedModel) -> GateReport:
    """Evaluate every gate's test-time value and keep probability, and account for them."""
    test_gates, keep_probs = jax.tree.map(np.asarray, _gate_values(model.gates))
    masks = {name: np.asarray(active(value)) for name, value in test_gates.items()}
    products = tuple(model.activation_products)
    pruned = count_network(model.layers, masks, products)
    expected = count_network(model.layers, keep_probs, products)
    dense = count_network(model.layers, {}, products)
    kept_fraction = float(pruned["weights"]) / float(dense["weights"])
    active_units = {
        slot.name: int(masks[slot.name].sum()) if slot.name in masks else int(np.prod(slot.shape))
        for slot in model.gate_slots
    }
    return GateReport(
        active_units=active_units,
        slot_sizes={slot.name: int(np.prod(slot.shape)) for slot in model.gate_slots},
        expected_l0=float(expected["params"]),
        expected_flops=float(expected["flops"]),
        params=float(pruned["params"]),
        flops=float(pruned["flops"]),
        dense_params=float(dense["params"]),
        dense_flops=float(dense["flops"]),
        pruning_rate=100.0 * (1.0 - kept_fraction),
        test_gates=test_gates,
    )


def weight_report(model: GatedModel) -> GateReport:
    """The report of a network without gates (GReg, stochastic or dense training), read from the
    zeros of its weights.

    Units are the live units of :func:`~sparsejax.structure.nodes.node_report` (a unit whose
    incoming or outgoing weights are all zero is dead), and a weight-granularity slot counts its
    layer's nonzero weights; ``params`` are the nonzero kernel weights between live units plus
    the biases of live units, ``flops`` the MACs of those weights, and ``pruning_rate``
    100 * (1 - those weights / all kernel weights): the gate accounting's conventions with the
    weights' zeros as the masks. A network with no zero weight reports its dense size. The
    expectations equal the deterministic values; there are no ``test_gates``.
    """
    nodes = node_report(model)
    params = nodes.nonzero_weights + nodes.live_biases
    products = tuple(model.activation_products)
    dense = count_network(model.layers, {}, products)
    flops = nodes.nonzero_flops + _live_product_flops(model, products)
    kernel_of_slot = {layer.kernel_slot: layer.name for layer in model.layers if layer.kernel_slot}

    def active(slot: str) -> int:
        if slot in nodes.alive_units:
            return nodes.alive_units[slot]
        return int(np.count_nonzero(model.layer_module(kernel_of_slot[slot]).kernel[...]))

    return GateReport(
        active_units={slot.name: active(slot.name) for slot in model.gate_slots},
        slot_sizes={slot.name: int(np.prod(slot.shape)) for slot in model.gate_slots},
        expected_l0=params,
        expected_flops=flops,
        params=params,
        flops=flops,
        dense_params=float(dense["params"]),
        dense_flops=float(dense["flops"]),
        pruning_rate=100.0 * (1.0 - nodes.nonzero_weights / nodes.dense_weights),
        test_gates={},
    )


def _live_product_flops(model: GatedModel, products: tuple) -> float:
    """MACs of the model's activation products (attention) between its live units."""
    if not products:
        return 0.0
    alive = alive_units(model.layers, layer_kernels(model), tuple(model.channel_couplings))
    values = {slot: vector.astype(np.float32) for slot, vector in alive.items()}
    return float(count_network((), values, products)["flops"])


def sparsity_report(model: GatedModel) -> GateReport:
    """:func:`gate_report` for a gated network, :func:`weight_report` for one without gates."""
    return gate_report(model) if model.gates else weight_report(model)
