"""Gradient estimators for stochastic gates.

- ``hard_concrete``: reparameterised hard concrete gates (Louizos et al. 2018).
- ``binary``: ARM / AR gradients for Bernoulli gates (Yin & Zhou 2019; Li & Ji 2019).
"""

from sparsejax.estimators import binary, hard_concrete

__all__ = ["binary", "hard_concrete"]
