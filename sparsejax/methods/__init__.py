"""Sparsification methods behind one interface and registry."""

from sparsejax.methods.base import Method, cross_entropy, error_rate
from sparsejax.methods.registry import METHODS, create_method

__all__ = ["Method", "METHODS", "create_method", "cross_entropy", "error_rate"]
