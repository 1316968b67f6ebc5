"""How an OS error reads in chatd's one-line messages."""

from __future__ import annotations


def os_reason(error: OSError) -> str:
    """ "connection refused", "no such file or directory": the error's words, in lower case."""
    return (error.strerror or str(error)).lower()
