"""Physical slimming of a declared model (the transformers) into a smaller model of its class.

:func:`slim_model` hands a transformer to
:func:`~sparsejax.slim.transformer.slim_transformer`, which folds its test-time gates into the
weights and builds the model of the same class with the widths its gates keep. A model gated
from its trace (every convolutional zoo model, a ``--model=MODULE:FACTORY`` model) is slimmed from
its trace instead (:func:`~sparsejax.slim.traced.slim_traced_model`). The input model is not
modified.
"""

from __future__ import annotations

from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.models.base import GatedModel
from sparsejax.models.transformer import TransformerModel
from sparsejax.slim.result import SlimResult
from sparsejax.slim.transformer import slim_transformer


def strip_to_network(model: GatedModel) -> None:
    """Remove the gates (and with them anything only they reach, e.g. a gate generator), in
    place. Methods attach nothing else to a model: their state lives in the train state."""
    model.gates = nnx.Dict({})


def slim_model(model: GatedModel) -> SlimResult:
    """The physically slimmed copy of the declared transformer ``model`` (module docstring).

    Raises:
      ConfigError: for a model that is no declared transformer, with what slims it.
    """
    if not isinstance(model, TransformerModel):
        raise ConfigError(
            f"slim_model slims the declared transformers; a {type(model).__name__} is slimmed "
            "from its trace: sparsejax.slim.traced.slim_traced_model(model, images)"
        )
    return slim_transformer(model)
