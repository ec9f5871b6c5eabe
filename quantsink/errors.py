"""User-facing errors.

A :class:`QuantsinkError` carries one line that names what is wrong and what is
allowed. The CLI prints it without a traceback and exits with code 2.
"""
from __future__ import annotations


class QuantsinkError(ValueError):
    """Bad input from the user: a one-line message naming the problem and the allowed values."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`QuantsinkError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise QuantsinkError(message)
