"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data or configuration; the message is one line naming the file/source and the problem.

    Subclasses ValueError so callers that validate generically still catch it; the CLI prints it
    and exits non-zero.
    """
