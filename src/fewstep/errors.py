"""fewstep's own error types. The CLI turns exactly these into one line on stderr and exit code 2; any other
exception is a bug and keeps its traceback.

Each subclasses the matching built-in (ValueError, FileNotFoundError, ...) so that library callers who catch the
built-in keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FewstepError(Exception):
    """Something the user asked for cannot be done: bad input, option, file or model. The message names the flag,
    option or file."""


class InvalidInput(FewstepError, ValueError):
    """A value (option, argument, prompt, step count, grid) that fewstep cannot use."""


class InputFileError(FewstepError, OSError):
    """A file the user named is missing, unreadable, not what it should be, or cannot be written."""


class NonFiniteError(FewstepError, FloatingPointError):
    """The model returned NaN or Inf."""


def close_match(word: str, choices: Iterable[str]) -> str | None:
    """The choice a mistyped `word` most likely meant, ignoring case ("STORK-2" → "stork-2"), or None."""
    by_folded = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(str(word).lower(), list(by_folded), n=1, cutoff=0.6)
    return by_folded[close[0]] if close else None
