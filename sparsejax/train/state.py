"""The train state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx, struct

from sparsejax.gates.base import GateParam
from sparsejax.methods.base import MethodState, Params
from sparsejax.train import ema


@struct.dataclass
class TrainState:
    """step, parameters ``{"net", "gates"}``, non-parameter model state (BatchNorm statistics),
    the method's state (:meth:`Method.init`), optimizer state, the raw data of the run's base
    PRNG key (``jax.random.key_data``; a step's key is ``fold_in(wrap_key_data(key), step)``)
    and the moving average of the parameters (:mod:`sparsejax.train.ema`; ``{}`` when the run
    does not average). Every leaf is a plain array, so the state can be replicated across
    processes and checkpointed as is."""

    step: jax.Array
    params: Params
    model_state: nnx.State
    method_state: MethodState
    opt_state: optax.OptState
    key: jax.Array
    ema_params: Params


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Params, nnx.State]:
    """graphdef, ``{"net": weights, "gates": gate parameters}`` and the remaining state."""
    graphdef, gates, net, rest = nnx.split(model, GateParam, nnx.Param, ...)
    return graphdef, {"net": net, "gates": gates}, rest


def merge_model(graphdef: nnx.GraphDef, params: Params, model_state: nnx.State) -> Any:
    """Inverse of :func:`split_model`."""
    return nnx.merge(graphdef, params["gates"], params["net"], model_state, copy=True)


def init_state(
    model: nnx.Module,
    method_state: MethodState,
    tx: optax.GradientTransformation,
    key: jax.Array,
    ema_decay: float = 0.0,
):
    """graphdef and the initial :class:`TrainState` of ``model`` and the method's state, with
    a parameter average when ``ema_decay`` is not 0."""
    graphdef, params, rest = split_model(model)
    state = TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        model_state=rest,
        method_state=method_state,
        opt_state=tx.init(params),
        key=jax.random.key_data(key),
        ema_params=ema.init(params, ema_decay),
    )
    return graphdef, state


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the state's current step."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)


def evaluated_params(state: TrainState, ema_decay: float) -> Params:
    """The parameters a run evaluates, reports and slims: the bias-corrected average
    (:func:`sparsejax.train.ema.average`) when ``ema_decay`` is not 0, else the parameters."""
    if not ema_decay:
        return state.params
    return ema.average(state.ema_params, state.params, state.step, ema_decay)
