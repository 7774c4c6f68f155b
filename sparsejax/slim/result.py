"""What slimming a declared transformer returns: the slim model, the units it kept and a
report of its size."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
from flax import nnx

from sparsejax.gates.base import GateParam
from sparsejax.models.base import GatedModel
from sparsejax.structure.accounting import count_network, reduction

count_network_once = jax.jit(count_network, static_argnums=(0, 2))
"""The accounting compiled once per network (op by op it compiles for every layer shape)."""


@dataclasses.dataclass(frozen=True)
class SlimReport:
    """Size of the network before and after slimming.

    ``params`` and ``flops`` follow the accounting convention (kernel weights and biases; MACs);
    ``stored_params`` count every stored parameter array entry (norm scales and biases
    included, gate parameters excluded). ``widths``: per layer, its (input units, output units)
    after slimming; ``round_to``: the multiple the slimmed widths were rounded up to (1: a
    transformer is cut to exactly the widths its gates keep).
    """

    params_before: float
    flops_before: float
    params_after: float
    flops_after: float
    stored_params_before: int
    stored_params_after: int
    widths: dict[str, tuple[int, int]]
    round_to: int = 1

    @property
    def flops_ratio(self) -> float:
        """FLOPs before / after (:func:`~sparsejax.structure.accounting.reduction`)."""
        return reduction(self.flops_before, self.flops_after)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "flops_ratio": self.flops_ratio}


@dataclasses.dataclass(frozen=True)
class SlimPlan:
    """Kept units per layer, as indices of the original network's units.

    Attributes:
      kept_outputs: per layer, its kept output units.
      kept_inputs: per layer, its kept input units (kernel rows).
    """

    kept_outputs: dict[str, tuple[int, ...]]
    kept_inputs: dict[str, tuple[int, ...]]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class SlimResult:
    """The slim model, the units it kept, its report and ``architecture``: the constructor
    arguments that build the slim model (a transformer's per-block widths)."""

    model: GatedModel
    plan: SlimPlan
    report: SlimReport
    architecture: dict


def stored_params(model: nnx.Module) -> int:
    """Entries of the model's parameter arrays, gate parameters excluded."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(GateParam)))
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(state)))


def slim_report(model: GatedModel, slim: GatedModel) -> SlimReport:
    """Params and FLOPs of ``model`` and of its slim network (attention products included),
    the arrays each stores and the slim layers' widths."""
    before = count_network_once(model.layers, {}, tuple(model.activation_products))
    after = count_network_once(slim.layers, {}, tuple(slim.activation_products))
    return SlimReport(
        params_before=float(before["params"]),
        flops_before=float(before["flops"]),
        params_after=float(after["params"]),
        flops_after=float(after["flops"]),
        stored_params_before=stored_params(model),
        stored_params_after=stored_params(slim),
        widths={layer.name: (layer.in_units, layer.out_units) for layer in slim.layers},
    )
