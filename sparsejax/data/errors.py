"""The errors raised when a dataset's files cannot be found anywhere, or are damaged."""

from __future__ import annotations

from sparsejax.errors import UserError


class DatasetNotFoundError(UserError, FileNotFoundError):
    """No copy of the requested dataset was found.

    The message lists every place that was searched and how to obtain the data.
    """

    one_line = False


class DatasetFileError(UserError, ValueError):
    """A dataset file was found but is damaged or not the file it should be; the message names
    it and says how to replace it."""


def not_found_message(
    name: str, searched: list[str], ways: list[str], settings: dict[str, str | None]
) -> str:
    """The text of a :class:`DatasetNotFoundError`: every place searched, the search settings
    that were not given, and the ways to obtain the dataset."""
    unset = [setting for setting, value in settings.items() if not value]
    return (
        f"Dataset {name!r} not found. Searched:\n"
        + "".join(f"  - {place}\n" for place in searched)
        + (f"  ({' and '.join(unset)} not set)\n" if unset else "")
        + "To get it, do one of:\n"
        + "".join(f"  - {way}\n" for way in ways)
    )
