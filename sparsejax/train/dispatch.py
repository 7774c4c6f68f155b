"""Several training steps per dispatch: which steps run together in one ``lax.scan``.

Dispatching a jitted step from Python costs the host about 0.1-0.2 ms (argument handling, the
runtime's launch, the wait between programs), and the gates' random bits, which JAX lowers to a
rolled loop on the CPU, took 0.08 ms per step at the top level of a program against 0.002 ms
inside a scan. A program that runs ``count`` steps in a ``lax.scan`` over
``count`` stacked batches made LeNet-300-100's ``l0_arm`` step 1.71-2.15 ms -> 1.59-1.65 ms on a
2-core CPU (BUILD_NOTES.md, "Steps per dispatch"). XLA's CPU backend runs a convolution inside a
loop body about 8x slower than at the top level of a program (LeNet-5's step: 15 ms alone,
120-132 ms per step scanned), so by default a model whose forward pass has a convolution runs
one step per dispatch.

A run's ``steps_per_dispatch`` config field sets the count: 0 (the default) chooses
:data:`AUTO_STEPS` for a model without convolutions and 1 for one with them
(:func:`resolve_steps_per_dispatch`). Each logging interval is cut into dispatches by
:func:`dispatch_counts`; the scanned program runs the same step function, so a run's results do
not depend on the count (on the CPU the states came out bit for bit the same for the MLP and
the LM; a logged metric may differ by float rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax

from sparsejax.errors import ConfigError
from sparsejax.models.base import GatedModel
from sparsejax.structure.trace.analyze import forward_jaxpr
from sparsejax.structure.trace.walk import JAXPR_TYPES

AUTO_STEPS = 10
"""Steps per dispatch chosen for a model without convolutions: enough that dispatch costs about
1% of an MLP step on a CPU, few enough that the stacked batches stay small and a stop request
(acted on after the dispatch that holds its step) waits at most 10 steps."""

CONVOLUTION = "conv_general_dilated"


def primitive_names(jaxpr) -> Iterator[str]:
    """The names of the primitives of ``jaxpr`` (a ``Jaxpr`` or ``ClosedJaxpr``), including
    those of the jaxprs in its equations' parameters (scan and loop bodies, branches, calls)."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        yield eqn.primitive.name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, JAXPR_TYPES):
                    yield from primitive_names(sub)


def has_convolution(jaxpr) -> bool:
    """Whether ``jaxpr`` (or a jaxpr nested in it) convolves."""
    return any(name == CONVOLUTION for name in primitive_names(jaxpr))


def resolve_steps_per_dispatch(setting: int, trace_forward: Callable[[], object]) -> int:
    """Steps per dispatch for the config value ``setting``: itself when positive; for 0,
    :data:`AUTO_STEPS` unless the model's forward jaxpr (returned by ``trace_forward``, called
    only then) has a convolution, then 1.

    Raises:
      ConfigError: for a negative ``setting``.
    """
    if setting < 0:
        raise ConfigError(
            f"steps_per_dispatch must be 0 (chosen from the model) or a positive count of "
            f"steps, got {setting}"
        )
    if setting:
        return setting
    return 1 if has_convolution(trace_forward()) else AUTO_STEPS


def dispatch_counts(start: int, end: int, steps_per_dispatch: int) -> list[int]:
    """The number of steps of each dispatch that runs steps ``start .. end - 1`` (an epoch's
    logging interval), in order: as many full dispatches of ``steps_per_dispatch`` steps as fit,
    then single steps, so that a run compiles at most two programs per phase (the scanned one,
    and the single step only when an interval does not divide evenly)."""
    full, rest = divmod(max(end - start, 0), steps_per_dispatch)
    return [steps_per_dispatch] * full + [1] * rest


def model_steps_per_dispatch(
    setting: int, model: GatedModel, example: jax.ShapeDtypeStruct
) -> int:
    """:func:`resolve_steps_per_dispatch` for ``model``, traced in evaluation mode on inputs
    shaped like ``example`` when ``setting`` is 0 (0.14 s of start-up for ResNet-56, 0.35 s for
    ResNet-50 on a 2-core CPU)."""
    return resolve_steps_per_dispatch(
        setting, lambda: forward_jaxpr(model, example, apply=_evaluate)[0]
    )


def _evaluate(model: GatedModel, x: jax.Array) -> jax.Array:
    return model(x, train=False)
