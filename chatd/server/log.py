"""structlog set-up: one event per line on stdout (or a file), JSON or console.

Lines are written and flushed as they are logged, except while the server's
loop has `defer()`red them: then they are kept and written together by
`flush()`, which the loop calls once per pass before it waits again, so a
pass that relays a hundred messages makes one write, not a hundred.

`hot()` logs a frequent event (the per-message one) without structlog's
per-call machinery when the output is JSON: it writes the very line the
structlog chain would (tests/test_log.py compares them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from typing import Any, TextIO

import structlog

from chatd.server.config import ConfigError, LogConfig
from chatd.wire.chat import escape

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


_file: TextIO | None = None  # the open log.file, replaced on every configure()


class _Output:
    """The stream lines go to, written through or kept until flush()."""

    def __init__(self, stream: TextIO, deferred: bool = False) -> None:
        self.stream = stream
        self.deferred = deferred
        self.pending: list[str] = []
        self.failing = False  # the last write failed (and stderr was told)

    def write(self, line: str) -> None:
        if self.deferred:
            self.pending.append(line)
        else:
            self._write(line)

    def flush(self) -> None:
        if self.pending:
            lines = "".join(self.pending)
            self.pending.clear()
            self._write(lines)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            # stdout gone (closed pipe): keep serving; there is nowhere to say so.
            pass
        except OSError as e:
            # A full disk or an I/O error under log.file: the lines are lost but
            # the chat goes on.  Said once on stderr, again after a success.
            if not self.failing:
                self.failing = True
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(f"chatd: cannot write the log, lines are lost: {e}\n")
                    sys.stderr.flush()
        else:
            self.failing = False


_out = _Output(sys.stdout)
_hot_json = False  # hot() may build JSON lines itself
_hot_info = True  # the level lets info events through
_stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
_esc = json.encoder.encode_basestring_ascii  # what json.dumps does to a str, in C
_second = (-1, "")  # the last whole second hot() saw, as ISO text


def defer(on: bool) -> None:
    """Keep lines until flush() (on), or write each at once (off, after a flush)."""
    if not on:
        _out.flush()
    _out.deferred = on


def flush() -> None:
    """Write the lines kept while deferred."""
    _out.flush()


def hot(event: str, **fields: Any) -> None:
    """``get().info(event, **fields)``, fast: for events logged per message.

    Nothing is written when the level is above info.  In JSON, the line is
    the one structlog would write (timestamp, level, event, then ``fields`` in
    their order), built here in a third of the time.
    """
    if not _hot_json:
        structlog.get_logger("chatd").info(event, **fields)
        return
    if not _hot_info:
        return
    parts = ['{"timestamp": "', _timestamp(), '", "level": "info", "event": ', _esc(event)]
    for key, value in fields.items():
        parts += (", ", _esc(key), ": ", _json_value(value))
    parts.append("}\n")
    _out.write("".join(parts))


def _timestamp() -> str:
    """Now, as TimeStamper(fmt="iso", utc=True) writes it."""
    global _second
    sec, ns = divmod(time.time_ns(), 1_000_000_000)
    if sec != _second[0]:
        _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    us = ns // 1000
    return f"{_second[1]}.{us:06d}Z" if us else f"{_second[1]}Z"


def _json_value(value: Any) -> str:
    cls = value.__class__
    if cls is str:
        return _esc(value)
    if cls is int:
        return int.__repr__(value)
    return json.dumps(value, default=repr)


def configure(settings: LogConfig, stream: TextIO | None = None, source: str = "") -> None:
    """(Re)configure structlog; safe to call again on reload.

    With ``log.file`` set, the file is (re)opened for appending; when it cannot
    be, ConfigError is raised and the logging in place is kept.
    """
    global _file, _out, _hot_json, _hot_info
    _out.flush()  # lines logged under the old settings go first, to the old stream
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
    _out = _Output(stream, _out.deferred)
    _hot_json = fmt == "json"
    _hot_info = LEVELS[settings.level] <= logging.INFO
    processors: list[Any] = [
        structlog.processors.add_log_level,
        _stamp,
        _headline_first,
    ]
    if fmt == "json":
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
    else:
        processors += [_escaped, structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[settings.level]),
        logger_factory=_LineFactory(_out),
        cache_logger_on_first_use=False,
    )


def _escaped(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """On a console, what a terminal would act on is escaped in every value (a name
    or a message may carry it; JSON escapes it anyway).  The traceback keeps its lines."""
    return {
        escape(k): v if k == "exc_info" or not isinstance(v, str) else escape(v)
        for k, v in event.items()
    }


def _headline_first(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Put timestamp, level and event first, so each JSON line reads left to right."""
    head: dict[str, Any] = {k: event.pop(k) for k in ("timestamp", "level", "event") if k in event}
    head.update(event)
    return head


class _LineLogger:
    """Write each event as one line: journald reads stdout."""

    def __init__(self, out: _Output) -> None:
        self._out = out

    def msg(self, message: str) -> None:
        self._out.write(message + "\n")

    debug = info = warning = error = critical = exception = log = msg


class _LineFactory:
    def __init__(self, out: _Output) -> None:
        self._out = out

    def __call__(self, *args: Any) -> _LineLogger:
        return _LineLogger(self._out)


def get(**fields: Any) -> Any:
    return structlog.get_logger("chatd").bind(**fields) if fields else structlog.get_logger("chatd")
