"""One registry of methods: ``--method`` names to classes."""

from __future__ import annotations

import ml_collections

from sparsejax.errors import ConfigError
from sparsejax.methods.base import Method
from sparsejax.methods.bounded_lp import BoundedLpGating, L1Gating
from sparsejax.methods.dense import Dense
from sparsejax.methods.dep_l0 import DepL0, DepL0ARM
from sparsejax.methods.greg import GReg1, GReg2
from sparsejax.methods.l0_arm import L0AR, L0Binary
from sparsejax.methods.l0_hc import L0HardConcrete
from sparsejax.methods.stochastic import StochasticPruning

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        Dense, L0HardConcrete, L0Binary, L0AR, DepL0, DepL0ARM,
        L1Gating, BoundedLpGating, StochasticPruning, GReg1, GReg2,
    )
}


def create_method(name: str, config: ml_collections.ConfigDict, *, num_train: int) -> Method:
    """Instantiate the method registered as ``name``."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](config, num_train=num_train)
