"""Hyperparameters declared where they are used: each method lists its own config fields with
their defaults, per model where the papers differ, and a run's config is the experiment's shared
fields plus the chosen method's.

A field whose value is None in a config takes its default for the run's model when the method
is built (:func:`resolve`), so that ``config.json`` of a run holds the values actually used.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from sparsejax.errors import ConfigError

ANY_MODEL = "*"
"""The key of a per-model table's row for models without their own row."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One hyperparameter of a method.

    Attributes:
      default: the value for every model without an entry in ``per_model`` (None: unset, e.g.
        an optional path).
      help: what the field means, in one line.
      per_model: ``{model name: default}`` where a model's default differs.
      kind: the field's type where ``default`` is None (``object`` for a value that may be a
        number or a per-slot sequence).
    """

    default: Any
    help: str
    per_model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    kind: type | None = None

    def default_for(self, model: str) -> Any:
        """The default of ``model``: its ``per_model`` entry, else ``default``."""
        return self.per_model.get(model, self.default)

    def placeholder(self) -> Any:
        """The field's entry in a config before it is resolved: None, typed."""
        kind = self.kind or (type(self.default) if self.default is not None else object)
        return config_dict.placeholder(kind)


Fields = Mapping[str, Field]


def add_fields(config: ml_collections.ConfigDict, fields: Fields) -> ml_collections.ConfigDict:
    """A copy of ``config`` with every field of ``fields`` it lacks, unset (None)."""
    merged = copy.deepcopy(config)
    with merged.unlocked():
        for name, field in fields.items():
            if name not in merged:
                setattr(merged, name, field.placeholder())
    return merged


def check_known(
    config: ml_collections.ConfigDict, known: Iterable[str], method: str, shared: Iterable[str]
) -> None:
    """A :class:`ConfigError` naming the first field of ``config`` that neither the experiment
    (``shared``) nor the method (``known``) declares."""
    own, common = set(known), set(shared)
    unknown = sorted(set(config.keys()) - own - common)
    if unknown:
        close = _closest(unknown[0], own | common)
        raise ConfigError(
            f"config field {unknown[0]!r} is not a field of method {method!r} nor a shared one"
            + (f" (did you mean {close!r}?)" if close else "")
            + f"; {method}'s fields: {', '.join(sorted(own)) or 'none'}"
        )


def _closest(name: str, candidates: set[str]) -> str | None:
    matches = difflib.get_close_matches(name, sorted(candidates), n=1)
    return matches[0] if matches else None


def resolve(config: ml_collections.ConfigDict, fields: Fields) -> ml_collections.ConfigDict:
    """A copy of ``config`` with every field of ``fields`` that is None (or missing) set to its
    default for ``config.model``."""
    model = config.get("model") or ANY_MODEL
    resolved = add_fields(config, fields)
    with resolved.unlocked():
        for name, field in fields.items():
            if resolved.get(name) is None and field.default_for(model) is not None:
                setattr(resolved, name, _config_value(field.default_for(model)))
    return resolved


def _config_value(value: Any) -> Any:
    """Lists as tuples, so that a resolved sequence compares equal to one from a flag."""
    return tuple(value) if isinstance(value, list) else value
