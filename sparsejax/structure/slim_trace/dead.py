"""Which parameters the slim network never needs: those of a residual branch whose gate closed,
and any other that only reaches the output through empty arrays.

Once the closed units are cut (:class:`~.interpret.Narrowed`), a whole branch can be left with
no units inside (every head and the sublayer gate of a transformer's attention closed): its
input projections keep no columns, its output projection no rows. What remains of it computes
nothing the output depends on:

- an operation whose results all have no entries, or that nothing needed reads, needs none of
  its operands;
- a product (``dot_general``, ``conv_general_dilated``) that sums over a dimension with no
  entries left is zero whatever its operands hold, so it needs none of them either;
- every other operation needs all of its operands (a call as a whole: the analysis does not
  look inside it).

:func:`unneeded_parameters` walks the jaxpr backwards from its outputs with these rules. The
parameters it finds (with the normaliser that fed only the branch) are not stored in the slim
network; it runs on zeros of their shapes instead, which gives the same output exactly. A layer
whose kernel keeps no entries and whose bias is zero after the gates are folded (a branch's
output projection, whose sublayer gate is 0) adds nothing, so its bias is not stored either
(:func:`empty_layer_biases`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.extend import core

from sparsejax.structure.slim_trace.interpret import Narrowed
from sparsejax.structure.trace import TracedStructure

SUMMING_PRODUCTS = frozenset({"dot_general", "conv_general_dilated"})


def _entries(narrowed: Narrowed, frame, var) -> int:
    """The entries ``var`` holds in the slim network at a batch of one."""
    return int(np.prod(narrowed.shape(var, narrowed.kept(frame, var), 1), dtype=np.int64))


def _summed_dims(eqn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The dimensions of each operand of a product that it sums over."""
    if eqn.primitive.name == "dot_general":
        (lhs, rhs), _ = eqn.params["dimension_numbers"]
        return tuple(lhs), tuple(rhs)
    numbers = eqn.params["dimension_numbers"]
    return (numbers.lhs_spec[1], *numbers.lhs_spec[2:]), (numbers.rhs_spec[1],
                                                         *numbers.rhs_spec[2:])


def _sums_nothing(narrowed: Narrowed, frame, eqn) -> bool:
    """Whether ``eqn`` is a product summing over a dimension with no entries left."""
    if eqn.primitive.name not in SUMMING_PRODUCTS:
        return False
    for var, dims in zip(eqn.invars, _summed_dims(eqn)):
        shape = narrowed.shape(var, narrowed.kept(frame, var), 1)
        if any(shape[d] == 0 for d in dims):
            return True
    return False


def unneeded_parameters(jaxpr, frame, narrowed: Narrowed, paths: Mapping[object, str]) -> set[str]:
    """The paths (``paths``: by jaxpr input) of the inputs of ``jaxpr`` that its outputs do not
    depend on in the slim network ``narrowed`` runs (module docstring)."""
    needed = {var for var in jaxpr.outvars if not isinstance(var, core.Literal)}
    for eqn in reversed(jaxpr.eqns):
        if not any(var in needed and _entries(narrowed, frame, var) for var in eqn.outvars):
            continue
        if _sums_nothing(narrowed, frame, eqn):
            continue
        needed.update(var for var in eqn.invars if not isinstance(var, core.Literal))
    return {path for var, path in paths.items() if var not in needed}


def empty_layer_biases(
    structure: TracedStructure, params: Mapping[str, jax.Array]
) -> set[str]:
    """The biases in ``params`` that are zero and belong to a layer whose kernel holds no
    entries: the layer adds nothing."""
    return {
        layer.bias for layer in structure.layers
        if layer.bias in params and layer.kernel in params
        and params[layer.kernel].size == 0 and not np.any(np.asarray(params[layer.bias]))
    }
