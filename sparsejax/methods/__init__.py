"""Sparsification methods behind one interface and registry.

Importing the package imports every module in it, and so registers the built-in methods
(:func:`sparsejax.methods.registry.register`): a new built-in method is one new file.
"""

import importlib
import pkgutil

from sparsejax.methods.base import (
    Method,
    MethodState,
    Phase,
    RunInfo,
    cross_entropy,
    error_rate,
)
from sparsejax.methods.fields import Field
from sparsejax.methods.registry import METHODS, create_method, method_class, register

for _module in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
    importlib.import_module(_module.name)

__all__ = [
    "METHODS",
    "Field",
    "Method",
    "MethodState",
    "Phase",
    "RunInfo",
    "create_method",
    "cross_entropy",
    "error_rate",
    "method_class",
    "register",
]
