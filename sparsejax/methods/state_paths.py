"""Finding a model's variables in its split state by path, and replacing them functionally.

Inside the jitted train step a method sees the model only as split state (``params["net"]``,
``params["gates"]``, ``model_state``); :meth:`Method.after_update` edits it through the paths that
:func:`variable_paths` resolved on the model object once, before training.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx

Path = tuple[str | int, ...]


def variable_paths(model: nnx.Module, variables: Mapping[str, nnx.Variable]) -> dict[str, Path]:
    """The graph path of each variable object in ``variables``, under the same keys."""
    wanted = {id(variable): key for key, variable in variables.items()}
    found = {wanted[id(node)]: tuple(path) for path, node in nnx.iter_graph(model) if id(node) in wanted}
    missing = sorted(set(variables) - set(found))
    if missing:
        raise ValueError(f"variables {missing} are not part of the model's graph")
    return found


def read(state: nnx.State, paths: Mapping[str, Path]) -> dict[str, jax.Array]:
    """The arrays at ``paths`` of ``state``, under the same keys."""
    flat = dict(nnx.to_flat_state(state))
    return {key: flat[path].get_value() for key, path in paths.items()}


def replace(state: nnx.State, paths: Mapping[str, Path], values: Mapping[str, jax.Array]) -> nnx.State:
    """A copy of ``state`` with the array at ``paths[key]`` replaced by ``values[key]``."""
    new = {paths[key]: value for key, value in values.items()}
    return nnx.from_flat_state(
        [(path, variable.replace(new[path]) if path in new else variable)
         for path, variable in nnx.to_flat_state(state)]
    )
