"""Exceptions that carry a one-line, user-facing message and the exit code the CLI should use.

The CLI turns any ``CapwatchError`` into ``capwatch: <message>`` on stderr and exits with ``exit_code``;
anything else is a bug and is allowed to show a traceback.
"""

from __future__ import annotations


class CapwatchError(Exception):
    """Base class: ``str(exc)`` is one line meant for the user."""

    exit_code = 2


class ConfigError(CapwatchError):
    """The configuration file or an option is missing, unreadable or invalid."""


class QueryError(CapwatchError):
    """A search query or filter (date, limit) cannot be understood."""


class IndexUnavailable(CapwatchError):
    """The index database cannot be opened or used (read-only location, corrupt, locked too long)."""


class ModelError(CapwatchError):
    """A captioning model cannot be found, downloaded, verified or loaded."""


class ModelUnreachable(ModelError):
    """The model hub (or mirror) could not be reached, or was too slow: the same download may work later, and it
    resumes what arrived. ``problem`` says what went wrong on the wire ("connection refused")."""

    def __init__(self, message: str, *, problem: str = "") -> None:
        super().__init__(message)
        self.problem = problem


class ImageError(CapwatchError):
    """One image cannot be read or decoded; other images are unaffected."""

    exit_code = 1


class MetadataError(CapwatchError):
    """Metadata cannot be read from or written to one file; the file is left untouched."""

    exit_code = 1
