"""sparsejax: learning sparse neural networks with stochastic gates and sparsity regularizers.

``sparsejax.sparsify(model, example_input)`` gates any Flax NNX model (see
:mod:`sparsejax.structure.sparsify`). It is loaded on first use (PEP 562), so that ``from sparsejax
import estimators`` still imports only JAX: the one place where the package root refers to a higher
layer, for the sake of the public name.
"""

_LAZY = {
    "sparsify": "sparsejax.structure.sparsify",
    "Sparsified": "sparsejax.structure.sparsify",
    "SparsityReport": "sparsejax.structure.sparsify",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsejax' has no attribute {name!r}")


__all__ = list(_LAZY)
