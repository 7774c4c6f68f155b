"""One registry of methods: ``--method`` names to classes.

Built-in methods register themselves with :func:`register` when :mod:`sparsejax.methods` is
imported. A method defined anywhere else is named ``MODULE:NAME`` (``my_methods:CustomMethod``):
the module is imported and ``NAME`` must be a :class:`~sparsejax.methods.base.Method` subclass.
"""

from __future__ import annotations

import ml_collections

from sparsejax.errors import ConfigError
from sparsejax.methods.base import Method, RunInfo
from sparsejax.user_code import import_named

METHODS: dict[str, type[Method]] = {}
"""The registered methods by name."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name` to be registered")
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"method name {name!r} is taken by {METHODS[name].__qualname__}")
    METHODS[name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The method registered as ``name``, or the class ``NAME`` of module ``MODULE`` for
    ``name = "MODULE:NAME"``."""
    if ":" not in name:
        if name not in METHODS:
            raise ConfigError(
                f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}, or "
                "MODULE:CLASS for a method class of an importable module"
            )
        return METHODS[name]
    module_name, class_name, cls = import_named("method", name, "CLASS")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(
            f"--method={name}: module {module_name!r} has no Method subclass {class_name!r}"
        )
    return cls


def create_method(name: str, config: ml_collections.ConfigDict, run: RunInfo) -> Method:
    """Instantiate the method ``name`` (see :func:`method_class`) for ``run``."""
    return method_class(name)(config, run)
