"""What slimming returns: the slim model, the plan that cut it and a report of its size."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from sparsejax.gates.base import GateParam
from sparsejax.models.base import GatedModel
from sparsejax.slim.plan import SlimPlan
from sparsejax.structure.accounting import count_network, reduction

count_network_once = jax.jit(count_network, static_argnums=(0, 2))
"""The accounting compiled once per network (op by op it compiles for every layer shape)."""


@dataclasses.dataclass(frozen=True)
class SlimReport:
    """Size of the network before and after slimming.

    ``params`` and ``flops`` follow the accounting convention (kernel weights and biases; MACs);
    ``stored_params`` count every stored parameter array entry (BatchNorm scale and bias
    included, gate parameters excluded). ``widths``: per layer, its (input units, output units)
    after slimming; ``round_to``: the multiple the slimmed widths were rounded up to.
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
class SlimResult:
    """The slim model, the plan that made it (enough to rebuild it) and its report.

    ``architecture``: for a model rebuilt from its constructor arguments rather than by cutting
    the dense model with the plan (transformers: per-block widths), those arguments.
    """

    model: GatedModel
    plan: SlimPlan
    report: SlimReport
    architecture: dict | None = None


def stored_params(model: nnx.Module) -> int:
    """Entries of the model's parameter arrays, gate parameters excluded."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(GateParam)))
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(state)))


def slim_report(model: GatedModel, slim: GatedModel, *, round_to: int = 1) -> SlimReport:
    """Params and FLOPs of ``model`` and of its slim network (attention products included),
    the arrays each stores and the slim layers' widths (rounded to multiples of ``round_to``)."""
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
        round_to=round_to,
    )
