"""The jitted training and evaluation steps.

The train state is replicated (with FSDP partly sharded) and a batch sharded over the mesh (see
:mod:`sparsejax.train.sharding`); the host dispatches steps asynchronously and reads metrics
back once per logging interval. With ``stacked=True`` one program runs several steps in a
``lax.scan`` over stacked batches (:mod:`sparsejax.train.dispatch` says when: XLA on CPU runs
convolutions inside a loop body several times slower than at the top level of a program).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from sparsejax.methods.base import (
    Method,
    MethodState,
    Params,
    cross_entropy,
    error_rate,
)
from sparsejax.methods.optim import learning_rates
from sparsejax.train import ema
from sparsejax.train.sharding import fsdp_size, replicated, state_shardings
from sparsejax.train.state import (
    TrainState,
    evaluated_params,
    merge_model,
    split_model,
    step_key,
)

Metrics = dict[str, jax.Array]

LEARNING_RATE = "lr/"
"""Prefix of the step metrics that give each parameter group's learning rate (``lr/net``,
``lr/gates``) of the step's update."""

AFTER_UPDATE_FOLD = 2**31 - 1
"""Folded into a step's key to give :meth:`Method.after_update` its key. Gate streams fold their
draw counts (0, 1, ...) into the same key, which never reach this value."""


def make_train_step(
    graphdef: nnx.GraphDef,
    method: Method,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    ema_decay: float = 0.0,
    stacked: bool = False,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """``step(state, images, labels) -> (state, metrics)``, jitted, the state donated and kept
    replicated, or with an ``fsdp`` mesh axis of size > 1 in the shardings of
    :func:`~sparsejax.train.sharding.state_shardings` (the metrics replicated). The metrics
    are the loss and its parts, the batch error and the learning rate of every parameter group
    that has parameters (:data:`LEARNING_RATE`). With ``ema_decay`` not 0 the step also
    updates the parameter average (:func:`sparsejax.train.ema.update`) with the parameters
    after the method's after-update; with 0 the step is the same program as without
    averaging.

    With ``stacked``, ``images`` and ``labels`` hold several batches stacked along a new first
    axis (:func:`~sparsejax.train.sharding.global_block`): the program runs one step per batch,
    in order, in a ``lax.scan``, and each metric is stacked the same way."""

    def loss_fn(params, model_state, method_state, images, labels, key):
        model = merge_model(graphdef, params, model_state)
        loss, aux = method.objective(model, method_state, images, labels, key)
        return loss, (aux, nnx.state(model, nnx.Not(nnx.Param)))

    def step(state: TrainState, x: jax.Array, y: jax.Array):
        key = step_key(state)
        method_state = method.before_update(
            merge_model(graphdef, state.params, state.model_state), state.method_state, state.step
        )
        (loss, (aux, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.model_state, method_state, x, y, key
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params, model_state, method_state = apply_after_update(
            method,
            graphdef,
            optax.apply_updates(state.params, updates),
            model_state,
            method_state,
            state.step,
            jax.random.fold_in(key, AFTER_UPDATE_FOLD),
        )
        metrics = {
            "loss": loss,
            "data_loss": aux["data_loss"],
            "penalty": aux["penalty"],
            "err": 100.0 * error_rate(aux["logits"], y),
            **{
                f"{LEARNING_RATE}{group}": rate
                for group, rate in learning_rates(opt_state).items()
                if group not in state.params or jax.tree.leaves(state.params[group])
            },
            **method.metrics(method_state),
        }
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            method_state=method_state,
            opt_state=opt_state,
            ema_params=ema.update(state.ema_params, params, ema_decay)
            if ema_decay
            else state.ema_params,
        )
        return new_state, metrics

    def sharded_step(state: TrainState, x: jax.Array, y: jax.Array):
        # The shardings follow from the output's shapes, so one step serves every phase's
        # optimizer state; pinned here, they are the jitted step's output shardings.
        new_state, metrics = step(state, x, y)
        return (
            jax.lax.with_sharding_constraint(new_state, state_shardings(new_state, mesh)),
            jax.lax.with_sharding_constraint(metrics, replicated(mesh)),
        )

    replicated_state = fsdp_size(mesh) == 1
    one_step = step if replicated_state else sharded_step
    program = _scanned(one_step) if stacked else one_step
    if replicated_state:
        return jax.jit(program, donate_argnums=0, out_shardings=replicated(mesh))
    return jax.jit(program, donate_argnums=0)


def _scanned(step: Callable) -> Callable:
    """``step`` over batches stacked along a first axis: ``(state, stacked metrics)``."""

    def steps(state: TrainState, xs: jax.Array, ys: jax.Array):
        return jax.lax.scan(lambda carried, batch: step(carried, *batch), state, (xs, ys))

    return steps


def apply_after_update(
    method: Method,
    graphdef: nnx.GraphDef,
    params: Params,
    model_state: nnx.State,
    method_state: MethodState,
    step: jax.Array,
    key: jax.Array,
) -> tuple[Params, nnx.State, MethodState]:
    """:meth:`Method.after_update` as a pure function of the split model: the method edits a
    model merged from ``params`` and ``model_state``, which is split again."""
    model = merge_model(graphdef, params, model_state)
    method_state = method.after_update(model, method_state, step, key)
    _, params, model_state = split_model(model)
    return params, model_state, method_state


def _per_example(values: jax.Array) -> jax.Array:
    """``(batch,)``: the values of each example, averaged over its positions when it has several
    (a sequence's tokens), so that test error and loss are per token for a language model."""
    return values if values.ndim == 1 else jnp.mean(values.reshape(values.shape[0], -1), axis=1)


def make_eval_step(
    graphdef: nnx.GraphDef, ema_decay: float = 0.0
) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """``eval_step(state, images, labels, valid) -> (wrong, summed loss)`` over the valid
    examples of a batch, with the test-time gates, of the parameters the run evaluates
    (:func:`~sparsejax.train.state.evaluated_params`: their average when ``ema_decay`` is not 0)
    and the BatchNorm statistics of the trained (raw) model."""

    @jax.jit
    def eval_step(state: TrainState, images, labels, valid):
        params = evaluated_params(state, ema_decay)
        model = merge_model(graphdef, params, state.model_state)
        logits = model(images, train=False)
        wrong = _per_example(jnp.argmax(logits, -1) != labels)
        loss = _per_example(cross_entropy(logits, labels))
        return jnp.sum(jnp.where(valid, wrong, 0)), jnp.sum(jnp.where(valid, loss, 0.0))

    return eval_step
