"""fewstep's own error types. The CLI turns exactly these into one line on stderr and exit code 2; any other
exception is a bug and keeps its traceback.

Each subclasses the matching built-in (ValueError, FileNotFoundError, ...) so that library callers who catch the
built-in keep working.
"""

from __future__ import annotations


class FewstepError(Exception):
    """Something the user asked for cannot be done: bad input, option, file or model. The message names the flag,
    option or file."""


class InvalidInput(FewstepError, ValueError):
    """A value (option, argument, prompt, step count, grid) that fewstep cannot use."""


class InputFileError(FewstepError, OSError):
    """A file the user named is missing, unreadable, not what it should be, or cannot be written."""


class NonFiniteError(FewstepError, FloatingPointError):
    """The model returned NaN or Inf."""
