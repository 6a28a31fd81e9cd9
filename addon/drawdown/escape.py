"""Text from agents' requests and users' files, made safe to show on one line."""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with every control character (a newline, an escape sequence, U+2028) shown
    escaped, so a value can neither forge a line of a log or report nor drive a terminal.
    Nearly every text needs nothing, and isprintable() checks it in C."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
