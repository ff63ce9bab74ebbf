"""User-facing errors.

Everything a user can get wrong (a file, a column, a row, a flag, a backbone that is not on disk)
raises a :class:`ClintuneError` whose message is one line naming the culprit. The CLI prints that
line and exits non-zero; it never shows a traceback for these. Messages name files, columns, row
numbers and counts, never the text of a note.
"""
from __future__ import annotations


class ClintuneError(Exception):
    """An error the user can fix; ``str(err)`` is the one line the CLI prints."""

    exit_code = 2


class DataError(ClintuneError):
    """Bad input data: file, format, column, row, label."""


class ConfigError(ClintuneError):
    """Bad configuration value (flag, YAML key or API argument)."""


class BackboneError(ClintuneError):
    """A backbone that cannot be found or loaded (offline, wrong path, not an encoder)."""


class ModelDirError(ClintuneError):
    """A model directory that is missing, incomplete, failed, or from an incompatible version."""
