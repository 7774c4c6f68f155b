"""Errors that are the user's or the environment's to fix, not bugs in sparsejax.

The command lines print such an error as one ``error: MESSAGE`` line and exit non-zero; the
traceback is shown only with ``--debug`` (or the environment variable ``SPARSEJAX_DEBUG=1``).
"""

from __future__ import annotations

import sys

DEBUG_ENVIRONMENT_VARIABLE = "SPARSEJAX_DEBUG"


class UserError(Exception):
    """Wrong input or a broken environment. The message is one line that says what is wrong,
    where, and how to fix it."""


def warn(text: str) -> None:
    """A one-line ``warning: TEXT`` on stderr: something went wrong and was recovered from."""
    print(f"warning: {text}", file=sys.stderr, flush=True)
