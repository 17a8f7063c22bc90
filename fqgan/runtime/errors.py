"""The package's own exception types. The ``fqgan`` command prints these as one line (``fqgan <command>: error:
...``, exit status 2): they mean bad input, a missing or damaged file, a run folder in the way. Anything else
is a fault of the package (or of a library under it) and prints its traceback.

Each type is also the built-in exception a caller would catch for the same fault (``ValueError``,
``TypeError``, ``FileNotFoundError``), so ``except ValueError`` keeps working in library code.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "FQGANError", "MissingFileError", "RunExistsError", "UsageError", "UsageTypeError"]


class FQGANError(Exception):
    """Base of the errors the package raises for bad input."""


class UsageError(FQGANError, ValueError):
    """A bad value: a flag, a config field, an argument, the content of a user's file."""


class UsageTypeError(FQGANError, TypeError):
    """An argument of the wrong type."""


class MissingFileError(FQGANError, FileNotFoundError, ValueError):
    """A file or folder the user named (an image, a weights file, a checkpoint) does not exist."""


class CheckpointError(UsageError):
    """A weights file exists but cannot be used: corrupted, truncated, or not the expected layout or kind."""


class RunExistsError(UsageError):
    """The output folder already holds a run and neither ``--resume`` nor ``--overwrite`` was given."""
