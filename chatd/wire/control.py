"""The control protocol between chatctl (or any script) and the daemon.

One UTF-8 JSON object per line each way, over a Unix-domain socket:

    request:  {"cmd": "kick", "args": {"name": "alice", "reason": "spam"}, "id": 7}
    reply:    {"ok": true, "result": {...}, "id": 7}
              {"ok": false, "error": "no user named 'bob' is online", "code": "not_found"}

`parse()` checks a request line against `COMMANDS` (each command's arguments, their
types and which are required) without carrying anything out.  Times travel as ISO 8601
in UTC, durations as "90s", "10m", "1h30m".
"""

from __future__ import annotations

import calendar
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_SOCKET = "/run/chatd/admin.sock"
DEFAULT_GROUP = "chatd-admin"
MAX_REQUEST = 64 * 1024  # bytes in one request line

# Error codes.
BAD_REQUEST = "bad_request"
UNKNOWN_COMMAND = "unknown_command"
NOT_FOUND = "not_found"
FAILED = "failed"
PERMISSION_DENIED = "permission_denied"
BUSY = "busy"
INTERNAL = "internal"

# Command -> argument -> (type, required).
Spec = dict[str, tuple[type, bool]]
COMMANDS: dict[str, Spec] = {
    "list": {},
    "kick": {"name": (str, True), "reason": (str, False)},
    "ban": {
        "target": (str, True),
        "duration": (str, False),
        "reason": (str, False),
        "kind": (str, False),
        "all": (bool, False),  # a network wider than /8 (IPv6 /16) is meant
    },
    "unban": {"target": (str, True), "kind": (str, False)},
    "bans": {},
    "say": {"text": (str, True)},
    "stats": {},
    "metrics": {},
    "reload": {},
    "handover": {},  # the next SIGTERM is a restart: hand every connection over
    "history": {"limit": (int, False), "since": (str, False), "user": (str, False)},
    "forget": {"name": (str, True)},
}
HISTORY_LIMIT = 100  # messages `history` answers with, unless asked for another number
HISTORY_LIMIT_MAX = 10_000  # and at most


class RequestError(Exception):
    """A request that cannot be carried out; becomes an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, Any]


class _Unrepeatable(ValueError):
    """Valid to Python's json, not to chatd: a reply could not carry it back."""


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Unrepeatable(f"{text} is not a finite number")
    return value


def _no_constant(name: str) -> Any:
    raise _Unrepeatable(f"{name} is not JSON")


def _loads(line: bytes) -> Any:
    """JSON, strictly: no NaN or Infinity, and no deeper than the decoder can go."""
    try:
        return json.loads(line, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise _Unrepeatable("nested too deeply") from None


def request_id(line: bytes) -> Any:
    """The "id" of a request line, for its reply (None if there is none)."""
    try:
        request = _loads(line)
    except ValueError:
        return None
    return request.get("id") if isinstance(request, dict) else None


def parse(line: bytes) -> Request:
    """Check a request line; return the request or raise RequestError."""
    if len(line) > MAX_REQUEST:
        raise RequestError(BAD_REQUEST, f"request too long (at most {MAX_REQUEST} bytes a line)")
    malformed = 'malformed request: expected one JSON object per line, {"cmd": ...}'
    try:
        request = _loads(line)
    except _Unrepeatable as e:
        raise RequestError(BAD_REQUEST, f"{malformed} ({e})") from None
    except ValueError:
        raise RequestError(BAD_REQUEST, malformed) from None
    if not isinstance(request, dict):
        raise RequestError(BAD_REQUEST, 'malformed request: expected a JSON object {"cmd": ...}')
    unknown = set(request) - {"cmd", "args", "id"}
    if unknown:
        raise RequestError(
            BAD_REQUEST, f"unknown request field {sorted(unknown)[0]!r} (fields: cmd, args, id)"
        )
    cmd = request.get("cmd")
    if not isinstance(cmd, str):
        raise RequestError(BAD_REQUEST, 'malformed request: "cmd" must be a command name')
    if cmd not in COMMANDS:
        raise RequestError(
            UNKNOWN_COMMAND, f"unknown command {cmd!r} (commands: {', '.join(sorted(COMMANDS))})"
        )
    # equivalent: an absent "args" read as None becomes {} just below, as "args": null does
    args = request.get("args", {})  # pragma: no mutate
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RequestError(BAD_REQUEST, f'{cmd}: "args" must be a JSON object')
    spec = COMMANDS[cmd]
    for key, value in args.items():
        if key not in spec:
            known = ", ".join(spec) or "none"
            raise RequestError(BAD_REQUEST, f"{cmd}: unknown argument {key!r} (arguments: {known})")
        kind = spec[key][0]
        if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
            raise RequestError(BAD_REQUEST, f"{cmd}: argument {key!r} must be a {_type_name(kind)}")
    for key, (_, required) in spec.items():
        if required and key not in args:
            raise RequestError(BAD_REQUEST, f"{cmd}: missing argument {key!r}")
    return Request(cmd, args)


def _type_name(kind: type) -> str:
    return {str: "string", int: "whole number", bool: "boolean", float: "number"}.get(
        kind, kind.__name__
    )


def encode(reply: dict[str, Any]) -> bytes:
    """A reply (or request) as its line."""
    return json.dumps(reply).encode() + b"\n"


def error_reply(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": message, "code": code}


# Durations.

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION = 100 * 365 * 86400
_DURATION = re.compile(r"(?:\d+[smhdw])+")
_PART = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str) -> int:
    """Seconds in "90s", "10m", "2h", "7d", "1w" or a sum such as "1h30m"."""
    if not isinstance(text, str) or not _DURATION.fullmatch(text):
        raise ValueError(f"expected a duration such as 30s, 10m, 2h, 7d or 1h30m, got {text!r}")
    total = sum(int(n) * UNITS[unit] for n, unit in _PART.findall(text))
    if not 0 < total <= MAX_DURATION:
        raise ValueError(f"expected a duration from 1s to 100 years, got {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """A short human form: 45s, 12m05s, 3h20m, 6d04h."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# Times.

ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def iso(t: float | None) -> str | None:
    """ISO 8601 in UTC, as the control protocol gives times (None stays None)."""
    if t is None:
        return None
    return time.strftime(ISO_FORMAT, time.gmtime(t))


def parse_iso(text: str) -> float:
    """Seconds since the epoch of a TIME as the protocol writes them ("2026-11-25T18:31:42Z")."""
    try:
        return float(calendar.timegm(time.strptime(text, ISO_FORMAT)))
    except (ValueError, TypeError):
        raise ValueError(
            f"expected a time such as 2026-11-25T18:31:42Z (UTC), got {text!r}"
        ) from None
