"""The one exception of the data pipeline."""

from __future__ import annotations

from lomotune.errors import LomotuneError


class DataError(LomotuneError):
    """A data problem that a person can fix: a missing or unreadable file, rows that lack
    a field, a max_length that leaves nothing to learn. The message says what is wrong,
    where (file and line), and how to fix it; the CLI prints it without a traceback."""
