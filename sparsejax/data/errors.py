"""The error raised when a dataset's files cannot be found anywhere."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """No copy of the requested dataset was found.

    The message lists every place that was searched and how to obtain the data.
    """
