"""Errors that are the user's or the environment's to fix, not bugs in sparsejax, and how the
command lines report them.

Library code raises a :class:`UserError` subclass where it finds out what is wrong, with a message
that says what, where and how to fix it. The command lines (``experiments.*``,
``sparsejax.slim``, ``sparsejax.plots``) hand what their work raises to :func:`report_error`
(directly, or through the context manager :func:`reported_errors`), which prints such an error,
or an environment ``OSError`` (disk full, read-only file system, permission denied, quota
exceeded), as one ``error: MESSAGE`` line; the command then exits with :data:`EXIT_FAILED`.
Every other exception is a bug and keeps its traceback. The traceback of a reported error is shown
only with ``--debug`` (or the environment variable ``SPARSEJAX_DEBUG=1``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import ClassVar

DEBUG_ENVIRONMENT_VARIABLE = "SPARSEJAX_DEBUG"

EXIT_FAILED = 1
"""Exit status of a command line after a reported error."""

ENVIRONMENT_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "free space on that file system or use another {output}",
    errno.EDQUOT: "free space within your quota or use another {output}",
    errno.EROFS: "use another {output} on a writable file system",
    errno.EACCES: "fix its permissions or use another {output}",
    errno.EPERM: "fix its permissions or use another {output}",
}
"""The ``OSError`` numbers that are the environment's to fix, and the advice for each;
``{output}`` is the command line's option for where it writes."""

_TENSORSTORE_ERRNO = re.compile(r"\[os_error_code='(\d+)'\]")
_QUOTED_PATH = re.compile(r'"(/[^"]*)"')


class UserError(Exception):
    """Wrong input or a broken environment. The message is one line that says what is wrong,
    where, and how to fix it; a report folds any line breaks in it (say from a library's message
    quoted in it) into spaces, unless the class sets :attr:`one_line` False."""

    one_line: ClassVar[bool] = True
    """False for a message that is a list, one item a line (e.g. every place searched)."""


class ConfigError(UserError, ValueError):
    """A config field (or the flag that sets it) has a value that cannot work: an unknown name,
    the wrong type, length or range, or a field the chosen method does not read."""


REPORTABLE = (UserError, OSError, ValueError)
"""The exceptions to hand to :func:`report_error`: those that may be the user's or the
environment's to fix (it raises again the ones that are not)."""


def debugging(debug_flag: bool) -> bool:
    """Whether tracebacks are wanted: ``--debug`` or ``$SPARSEJAX_DEBUG`` set (and not ``0``)."""
    return debug_flag or os.environ.get(DEBUG_ENVIRONMENT_VARIABLE, "0") not in ("", "0")


def environment_error(error: BaseException) -> OSError | None:
    """``error`` as an ``OSError`` with a number in :data:`ENVIRONMENT_ERRNOS`, else None.

    Besides ``OSError`` itself this recognises the ``ValueError`` that tensorstore (which Orbax
    writes checkpoints with) raises for a failed file operation, tagged ``[os_error_code='N']``;
    its last quoted absolute path is the file."""
    if isinstance(error, OSError):
        return error if error.errno in ENVIRONMENT_ERRNOS else None
    if isinstance(error, ValueError):
        code = _TENSORSTORE_ERRNO.search(str(error))
        if code and int(code.group(1)) in ENVIRONMENT_ERRNOS:
            paths = _QUOTED_PATH.findall(str(error))
            number = int(code.group(1))
            return OSError(number, os.strerror(number), paths[-1] if paths else None)
    return None


def error_message(error: BaseException, output: str) -> str | None:
    """The one-line report of ``error`` if it is the user's or the environment's to fix, else
    None; ``output`` names the command line's option for where it writes (e.g. ``--workdir``)."""
    if isinstance(error, UserError):
        return " ".join(str(error).split()) if error.one_line else str(error).rstrip()
    cause = environment_error(error)
    if cause is None:
        return None
    place = f"{cause.filename}: " if cause.filename is not None else ""
    meaning = os.strerror(cause.errno)
    advice = ENVIRONMENT_ERRNOS[cause.errno].format(output=output)
    return f"{place}{meaning[0].lower()}{meaning[1:]} ({errno.errorcode[cause.errno]}); {advice}"


class DuplicateTracebackFilter(logging.Filter):
    """Drops log records that carry the traceback of an error :func:`report_error` reports as
    one line (a library's worker thread logs the error it hands back to the caller)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or error_message(error, "") is None


def report_error(error: Exception, *, debug: bool, output: str) -> int:
    """Print ``error`` to stderr as one ``error: ...`` line and return :data:`EXIT_FAILED`, the
    exit status of the command; raise it again when it is not the user's or the environment's
    to fix, or when :func:`debugging`. Called with the exception being handled."""
    message = error_message(error, output)
    if message is None or debugging(debug):
        raise error
    print(f"error: {message}", file=sys.stderr)
    return EXIT_FAILED


@contextlib.contextmanager
def reported_errors(*, debug: bool, output: str) -> Iterator[None]:
    """Run the body; a user or environment error raised in it goes to :func:`report_error` and
    ends the process with :data:`EXIT_FAILED`. Other exceptions pass through untouched."""
    try:
        yield
    except REPORTABLE as error:
        raise SystemExit(report_error(error, debug=debug, output=output)) from None


@contextlib.contextmanager
def written_under(directory: str | os.PathLike) -> Iterator[None]:
    """Run the body, which writes under ``directory``; an environment error raised in it that
    names no file (a write to an open file that fails for want of space says only ``ENOSPC``, and
    which file fills the disk first depends on timing) is raised again naming ``directory``."""
    try:
        yield
    except REPORTABLE as error:
        cause = environment_error(error)
        if cause is None or cause.filename is not None:
            raise
        raise OSError(cause.errno, cause.strerror, os.fspath(directory)) from error


def warn(text: str) -> None:
    """A one-line ``warning: TEXT`` on stderr: something went wrong and was recovered from."""
    print(f"warning: {text}", file=sys.stderr, flush=True)
