"""structlog set-up: one event per line on stdout (or a file), JSON or console."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from chatd.config import ConfigError, LogConfig

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


_file: TextIO | None = None  # the open log.file, replaced on every configure()


def configure(settings: LogConfig, stream: TextIO | None = None, source: str = "") -> None:
    """(Re)configure structlog; safe to call again on reload.

    With ``log.file`` set, the file is (re)opened for appending; when it cannot
    be, ConfigError is raised and the logging in place is kept.
    """
    global _file
    if settings.file and stream is None:
        try:
            stream = open(settings.file, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise ConfigError(
                source or "<config>", "log.file", f"cannot open {settings.file}: {e.strerror}"
            ) from None
        if _file is not None:
            _file.close()
        _file = stream
    stream = stream or sys.stdout
    fmt = settings.format
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _headline_first,
    ]
    if fmt == "json":
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[settings.level]),
        logger_factory=_LineFactory(stream),
        cache_logger_on_first_use=False,
    )


def _headline_first(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Put timestamp, level and event first, so each JSON line reads left to right."""
    head: dict[str, Any] = {k: event.pop(k) for k in ("timestamp", "level", "event") if k in event}
    head.update(event)
    return head


class _LineLogger:
    """Write each event as one line and flush it: journald reads stdout."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        try:
            self._stream.write(message + "\n")
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            # stdout gone (closed pipe): keep serving; there is nowhere to say so.
            pass

    debug = info = warning = error = critical = exception = log = msg


class _LineFactory:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, *args: Any) -> _LineLogger:
        return _LineLogger(self._stream)


def get(**fields: Any) -> Any:
    return structlog.get_logger("chatd").bind(**fields) if fields else structlog.get_logger("chatd")
