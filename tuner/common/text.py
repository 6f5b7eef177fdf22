"""Values as people read them: numbers for the CLI's tables and the HTML report, and the
short form of a bad value an error message quotes."""

from __future__ import annotations

import math
import reprlib
import shlex
from typing import Any


def number(value: Any) -> str:
    """4 significant digits; tiny and huge floats in scientific notation; None as blank."""
    if isinstance(value, float):
        if math.isfinite(value) and value != 0 and not 1e-3 <= abs(value) < 1e5:
            return f"{value:.3g}"
        return f"{value:.4g}"
    return "" if value is None else str(value)


_SHORT = reprlib.Repr()  # Python 3.11's takes no arguments
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 3, 6, 6
_SHORT.maxstring = _SHORT.maxother = 80


def command(*words: str) -> str:
    """A command line to paste into a shell, each word quoted as the shell needs: a study named
    `x; rm -rf ~` is one argument, not a second command."""
    return shlex.join(str(word) for word in words)


def shown(value: Any) -> str:
    """`repr(value)` cut short, so that an error quoting a 10 MB string or a deeply nested
    list stays one readable line."""
    return _SHORT.repr(value)


def error_line(error: BaseException, width: int = 300) -> str:
    """An error as one line for a message or a log: its type and the first line of its text,
    cut at `width` (a library's error can run to pages)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:width]}" if text else type(error).__name__
