"""The user's own code named on the command line as ``MODULE:NAME`` (``--method``, ``--model``)."""

from __future__ import annotations

import importlib
from typing import Any

from sparsejax.errors import ConfigError


def import_named(flag: str, spec: str, kind: str) -> tuple[str, str, Any]:
    """``(MODULE, NAME, the attribute NAME of module MODULE or None)`` for ``spec = "MODULE:NAME"``,
    given on the command line as ``--flag=spec``; ``kind`` says what NAME should be
    (``CLASS``, ``FACTORY``).

    Raises:
      ConfigError: for a spec without both parts or a module that cannot be imported from the
        current directory or ``PYTHONPATH``.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"--{flag}={spec}: write your own as MODULE:{kind}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"--{flag}={spec}: cannot import module {module_name!r} ({error}); run from its "
            "directory or put that directory on PYTHONPATH"
        ) from error
    return module_name, attribute, getattr(module, attribute, None)
