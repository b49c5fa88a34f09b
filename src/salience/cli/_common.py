"""Exit statuses, errors and output helpers shared by every ``salience`` command."""

from __future__ import annotations

import re
import sys
import unicodedata

EXIT_OK = 0
"""Everything succeeded."""
EXIT_FAILURE = 1
"""Nothing succeeded, or a fatal error (e.g. the model cannot be read)."""
EXIT_USAGE = 2
"""A bad command line: unknown option, method or class name."""
EXIT_PARTIAL = 3
"""Some inputs failed and others succeeded; the failures are listed at the end."""
EXIT_INTERRUPTED = 130
"""Interrupted (Ctrl-C); files already written are complete, none is partial."""
EXIT_TERMINATED = 143
"""Stopped by SIGTERM (``kill``, ``timeout``, a scheduler's time limit), as Ctrl-C is."""

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_OUT = "salience-out"

TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


class CLIError(Exception):
    """A failure to report on one line, with an exit status."""

    code = EXIT_FAILURE


class UsageError(CLIError):
    """A bad command line."""

    code = EXIT_USAGE


# -- output helpers --------------------------------------------------------------------------


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def printable(text: str) -> str:
    r"""Return ``text`` with control characters and line breaks escaped (a newline: ``\n``).

    A line of output stays one line, whatever the names in it: a log read line by line is
    neither broken nor given lines that are not its own. Other characters, spaces of any
    script and emoji included, are kept; a byte that was not valid UTF-8 in a file name (a
    lone surrogate, which the terminal could not print) is escaped too.
    """
    if text.isprintable():
        return text
    return "".join(
        c.encode("unicode_escape", "backslashreplace").decode()
        if unicodedata.category(c) in _ESCAPED
        else c
        for c in text
    )


_ESCAPED = frozenset({"Cc", "Cs", "Zl", "Zp"})  # controls, surrogates, line/paragraph breaks


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def slug(text: str) -> str:
    """Return a file-name-safe form of ``text``: letters, digits, ``-`` and ``_`` only."""
    cleaned = re.sub(r"[^0-9A-Za-z_-]+", "_", text).strip("_")
    return cleaned or "x"
