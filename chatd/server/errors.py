"""The daemon cannot start."""

from __future__ import annotations


class StartupError(Exception):
    """The daemon cannot start; str() is the one-line reason."""

    status = 1  # chatd's exit status
