"""Exceptions: one base class for problems the user can fix, kept apart from bugs.

The CLI maps ``PrecisionError`` (and only it) to exit code 2 and prints its message; anything else is a bug
and keeps its traceback.
"""


class PrecisionError(Exception):
    """A problem with the user's input or configuration. The message says what, where, and how to fix it."""


class PromptFileError(PrecisionError):
    """A prompt set that cannot be read or does not follow the schema."""


class CaptureFormatError(PrecisionError):
    """A capture directory that is incomplete, inconsistent, corrupted or of another schema."""


class MismatchedCapturesError(PrecisionError):
    """Two captures that cannot be compared (different tokens, vocabulary, layer count, ...)."""


class BackendError(PrecisionError):
    """A backend that cannot be created or run with the given settings."""


class ModelError(PrecisionError):
    """A model directory that is missing, unreadable or not a supported causal LM."""
