"""sparsejax: learning sparse neural networks with stochastic gates and sparsity regularizers.

``sparsejax.sparsify(model, example_input)`` gates any Flax NNX model (see
:mod:`sparsejax.structure.sparsify`); ``sparsejax.slim_traced`` slims any traced model and
``sparsejax.load_slim_function`` loads the saved result (:mod:`sparsejax.structure.slim_trace`);
``sparsejax.GatePlacement`` places a model's gates where its paper does
(:mod:`sparsejax.models.placement`, resolved by :mod:`sparsejax.structure.traced_model`).
They are loaded on first use (PEP 562), so that ``from sparsejax import estimators`` still imports
only JAX: the one place where the package root refers to a higher layer, for the sake of the
public names.
"""

_LAZY = {
    "sparsify": "sparsejax.structure.sparsify",
    "Sparsified": "sparsejax.structure.sparsify",
    "SparsityReport": "sparsejax.structure.sparsify",
    "slim_traced": "sparsejax.structure.slim_trace",
    "load_slim_function": "sparsejax.structure.slim_trace",
    "SlimFunction": "sparsejax.structure.slim_trace",
    "GatePlacement": "sparsejax.models.placement",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsejax' has no attribute {name!r}")


__all__ = list(_LAZY)
