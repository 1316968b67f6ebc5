"""The `chatctl` command: manage a running chatd over its control socket.

Exit status: 0 done, 1 the command failed (an unknown user, a bad ban...),
2 usage error, 3 chatd not reachable (not running, permission denied, no
answer); when the reader of its output goes away, chatctl ends as cat does,
killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import grp
import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from typing import Any, NoReturn

import yaml

from chatd import __version__
from chatd.server.config import DEFAULT_PATH, ConfigError
from chatd.wire.chat import escape
from chatd.wire.control import (
    DEFAULT_GROUP,
    DEFAULT_SOCKET,
    HISTORY_LIMIT,
    HISTORY_LIMIT_MAX,
    ISO_FORMAT,
    PERMISSION_DENIED,
    format_duration,
    parse_duration,
)
from chatd.wire.errors import os_reason

OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3
SOCKET_VARIABLE = "CHATD_SOCKET"  # the socket, below --socket and --config
BUSY_RETRY = 2.0  # seconds chatctl tries again while the socket's backlog is full


class Unreachable(Exception):
    """chatd can't be reached; str() says what to do."""


class Failed(Exception):
    """The daemon answered with an error."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"chatctl: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the daemon's result as JSON instead of text",
    )
    p = Parser(
        prog="chatctl",
        description="Manage a running chatd over its control socket.",
        epilog="Exit status: 0 done, 1 the command failed, 2 usage error, 3 chatd not reachable.",
        parents=[common],
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "-s",
        "--socket",
        metavar="PATH",
        help=f"control socket (default: ${SOCKET_VARIABLE}, else control.socket in "
        f"{DEFAULT_PATH} when readable, else {DEFAULT_SOCKET})",
    )
    where.add_argument(
        "-c", "--config", metavar="PATH", help="take the socket path from this chatd config"
    )
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for chatd's answer (default: 10)",
    )
    p.add_argument("--version", action="version", version=f"chatctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    cmd("list", "list the connected users")
    c = cmd("kick", "disconnect a user, telling them and the room why")
    c.add_argument("name", help="the user's name")
    c.add_argument("-r", "--reason", default="", help="the reason, shown to the user and the room")
    c = cmd("ban", "ban a user name or an IP address or network; disconnect who it covers")
    c.add_argument("target", help="a name, an IP address or a network such as 10.0.0.0/24")
    c.add_argument(
        "-d",
        "--for",
        dest="duration",
        type=duration,
        metavar="DURATION",
        help="lift the ban after DURATION (30s, 10m, 2h, 7d, 1w, 1h30m); default: never",
    )
    c.add_argument("-r", "--reason", default="", help="the reason, shown to whoever is refused")
    c.add_argument(
        "--name",
        dest="kind",
        action="store_const",
        const="name",
        help="TARGET is a name even though it looks like an address",
    )
    c.add_argument(
        "--all",
        action="store_true",
        help="TARGET is meant though it is a network wider than /8 (IPv6 /16)",
    )
    c = cmd("unban", "lift a ban")
    c.add_argument("target", help="the banned name or address, as `chatctl bans` shows it")
    c.add_argument(
        "--name", dest="kind", action="store_const", const="name", help="TARGET is a name"
    )
    cmd("bans", "list the bans in force")
    c = cmd("say", "send a server notice to everyone")
    c.add_argument("text", nargs="+", help="the notice (the words are joined with spaces)")
    cmd("stats", "show the daemon's counters")
    cmd(
        "metrics",
        "print the metrics in the Prometheus text format, as metrics.listen serves them "
        "(for node_exporter's textfile collector)",
    )
    cmd("reload", "re-read the config file, as SIGHUP does")
    c = cmd(
        "systemd-stop",
        "for chatd.service's ExecStop=: if systemd is restarting UNIT, have chatd hand "
        "every connection over to the next chatd; if it is stopping it, nothing (chatd "
        "then tells everyone goodbye)",
    )
    c.add_argument("unit", metavar="UNIT", help="the unit systemd is stopping (%%n)")
    c = cmd("history", "print what was said in the room, oldest first")
    c.add_argument(
        "-n",
        "--limit",
        type=history_limit,
        metavar="N",
        help=f"the last N messages (default {HISTORY_LIMIT}, at most {HISTORY_LIMIT_MAX})",
    )
    c.add_argument(
        "--since",
        type=since,
        metavar="TIME",
        help="only messages said at TIME or later: 2026-11-25 14:00, 14:00 (today), "
        "2026-11-25, or a while ago such as 2h or 1d (local time, or with Z for UTC)",
    )
    c.add_argument("-u", "--user", metavar="NAME", help="only messages NAME said (any case)")
    c = cmd("forget", "delete what a user said from the history (memory and file)")
    c.add_argument("name", help="the user's name (any case)")
    return p


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(
            f"expected seconds, more than 0 and less than 86400, got {text!r}"
        )
    return value


def history_limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= HISTORY_LIMIT_MAX:
        raise argparse.ArgumentTypeError(
            f"expected a number of messages from 1 to {HISTORY_LIMIT_MAX}, got {text!r}"
        )
    return int(text)


_SINCE_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M")


def since(text: str, now: float | None = None) -> str:
    """A --since TIME as the protocol's ISO 8601 in UTC: a local date and time (or a
    time of today, or a date), the same with Z for UTC, or a while ago ("2h")."""
    now = time.time() if now is None else now
    value = text.strip()
    try:
        return time.strftime(ISO_FORMAT, time.gmtime(now - parse_duration(value)))
    except ValueError:
        pass
    utc = value.endswith("Z")
    body = value.removesuffix("Z")
    if len(body) <= 8 and ":" in body:  # a time of today
        body = time.strftime("%Y-%m-%d ", (time.gmtime if utc else time.localtime)(now)) + body
    elif len(body) == 10:  # a date: from its beginning
        body += " 00:00"
    for fmt in _SINCE_FORMATS:
        try:
            parsed = time.strptime(body, fmt)
        except ValueError:
            continue
        t = calendar.timegm(parsed) if utc else time.mktime(parsed)
        return time.strftime(ISO_FORMAT, time.gmtime(t))
    raise argparse.ArgumentTypeError(
        "expected a time such as '2026-11-25 14:00', '14:00', '2026-11-25' or a while ago "
        f"such as 2h or 3d, got {text!r}"
    )


def duration(text: str) -> str:
    try:
        parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# Finding the socket.


def socket_from_config(path: str, explicit: bool) -> tuple[str | None, str]:
    """(control.socket from the config at ``path``, the admin group).

    Only those keys are read, so a config chatd would refuse still names its
    socket.  A missing or unreadable file is an error only when ``explicit``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        if explicit:
            why = e.strerror.lower() if isinstance(e, OSError) and e.strerror else "invalid YAML"
            raise ConfigError(path, "", why) from None
        return None, DEFAULT_GROUP
    control = raw.get("control") if isinstance(raw, dict) else None
    if not isinstance(control, dict):
        return None, DEFAULT_GROUP
    sock = control.get("socket")
    group = control.get("admin_group", DEFAULT_GROUP)
    return (sock if isinstance(sock, str) else None), (
        group if isinstance(group, str) else DEFAULT_GROUP
    )


def control_socket(args: argparse.Namespace) -> tuple[str, str | None]:
    """(socket path, admin group) for these arguments; the group is None when unknown."""
    if args.socket:
        return args.socket, None
    env = os.environ.get(SOCKET_VARIABLE, "")
    if env and not args.config:
        return env, None
    path = args.config or str(DEFAULT_PATH)
    sock, group = socket_from_config(path, explicit=bool(args.config))
    if sock == "":
        where = args.config or DEFAULT_PATH
        raise Unreachable(f"the control socket is turned off in {where} (control.socket is empty)")
    return sock or DEFAULT_SOCKET, group


# Talking to chatd.


def socket_group(path: str) -> str:
    """The group that may open the socket file at ``path`` ("" for root alone)."""
    try:
        st = os.stat(path)
        return grp.getgrgid(st.st_gid).gr_name if st.st_gid and st.st_mode & 0o060 else ""
    except (OSError, KeyError):
        return DEFAULT_GROUP


def request(path: str, group: str | None, cmd: str, args: dict[str, Any], timeout: float) -> Any:
    """Send one request and return its result; raise Unreachable or Failed.

    ``group`` is the admin group, for the hint when permission is denied
    (None: chatctl does not know the config).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            _connect(sock, path, min(timeout, BUSY_RETRY))
        except FileNotFoundError:
            raise Unreachable(f"chatd is not running (no socket at {path})") from None
        except ConnectionRefusedError:
            with contextlib.suppress(OSError):
                if not stat.S_ISSOCK(os.stat(path).st_mode):
                    raise Unreachable(
                        f"{path} is not a socket (to take the socket from a config, use --config)"
                    ) from None
            raise Unreachable(f"chatd is not running (nothing listens on {path})") from None
        except PermissionError:
            if group is None:
                group = socket_group(path)
            hint = f"run as root or join group {group}" if group else "run as root"
            raise Unreachable(f"permission denied on {path}: {hint}") from None
        except (TimeoutError, BlockingIOError):
            raise Unreachable(f"chatd does not answer on {path} (busy?)") from None
        except OSError as e:
            raise Unreachable(f"cannot connect to {path}: {os_reason(e)}") from None
        try:
            sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
            line = _read_line(sock)
        except TimeoutError:
            raise Unreachable(f"chatd did not answer within {timeout:g} s on {path}") from None
        except OSError as e:
            raise Unreachable(f"lost the connection to chatd on {path}: {e.strerror}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(line)
        ok = reply["ok"]
    except (ValueError, TypeError, KeyError):
        raise Unreachable(f"not a chatd control socket: {path} answered {line[:80]!r}") from None
    if ok is True:
        return reply.get("result")
    if reply.get("code") == PERMISSION_DENIED:
        # The daemon knows its admin group: "permission denied: run as root or join group G".
        hint = str(reply.get("error", "")).removeprefix("permission denied: ")
        raise Unreachable(f"permission denied on {path}: {hint}")
    raise Failed(str(reply.get("error", "the command failed")))


def _connect(sock: socket.socket, path: str, retry: float) -> None:
    """Connect, trying again for ``retry`` seconds while the daemon's backlog is full
    (EAGAIN: it is busy accepting, say refusing a flood of others)."""
    deadline = time.monotonic() + retry
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def _read_line(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
        if b"\n" in data:
            break
    line = b"".join(chunks)
    if not line:
        raise ConnectionAbortedError(0, "chatd closed the connection without answering")
    return line.split(b"\n", 1)[0]


# Formatting for humans.


def table(rows: list[list[str]], header: list[str], right: Collection[int] = ()) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            str(v).rjust(w) if i in right else str(v).ljust(w)
            for i, (v, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def shown(name: str) -> str:
    """A name as chatctl prints it: a non-ASCII one also escaped, so that a look-alike
    (``alice`` written with a Cyrillic a) can be told from the original."""
    if name.isascii() and name.isprintable():
        return name
    return f"{name} ({name.encode('ascii', 'backslashreplace').decode()})"


def local_time(stamp: str | None) -> str:
    """An ISO 8601 UTC time from the daemon, in the local time zone, which it names."""
    if not stamp:
        return "never"
    t = time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(calendar.timegm(t)))


def show_list(result: Any) -> str:
    users = result["users"]
    if not users:
        return "no users online"
    rows = [
        [
            shown(u["name"]),
            u["peer"],
            local_time(u["since"]),
            format_duration(u["idle"]),
            str(u["messages"]),
            str(u["queued"]),
        ]
        for u in users
    ]
    header = ["NAME", "ADDRESS", "CONNECTED SINCE", "IDLE", "MESSAGES", "QUEUED"]
    n = len(users)
    return table(rows, header, right={3, 4, 5}) + f"\n{n} user{'s' if n != 1 else ''} online"


def show_kick(result: Any) -> str:
    reason = f" ({result['reason']})" if result["reason"] else ""
    return f"kicked {shown(result['kicked'])}{reason}"


def _ban_line(ban: Any) -> str:
    until = f"until {local_time(ban['expires'])}" if ban["expires"] else "until lifted"
    reason = f": {ban['reason']}" if ban["reason"] else ""
    return f"{ban['kind']} {shown(ban['target'])} {until}{reason}"


def show_ban(result: Any) -> str:
    lines = [("updated ban: " if result["replaced"] else "banned ") + _ban_line(result["ban"])]
    if result["disconnected"]:
        lines.append("disconnected: " + ", ".join(map(shown, result["disconnected"])))
    return "\n".join(lines)


def show_unban(result: Any) -> str:
    ban = result["unbanned"]
    return f"lifted the ban on {ban['kind']} {shown(ban['target'])}"


def show_bans(result: Any) -> str:
    bans = result["bans"]
    if not bans:
        return "no bans"
    rows = [
        [
            shown(b["target"]),
            b["kind"],
            local_time(b["expires"]) if b["expires"] else "never",
            format_duration(b["remaining"]) if b["remaining"] is not None else "-",
            local_time(b["created"]),
            str(b["by"]),
            b["reason"],
        ]
        for b in bans
    ]
    header = ["TARGET", "KIND", "EXPIRES", "LEFT", "SINCE", "BY UID", "REASON"]
    return table(rows, header, right={3, 5})


def show_say(result: Any) -> str:
    n = result["recipients"]
    return f"notice sent to {n} user{'s' if n != 1 else ''}"


def show_stats(result: Any) -> str:
    rejected = ", ".join(f"{k} {v}" for k, v in result["rejected"].items()) or "none"
    rows = [
        ("uptime", f"{format_duration(result['uptime'])} (since {local_time(result['started'])})"),
        ("users", f"{result['users']} (peak {result['peak_users']})"),
        ("connections", f"{result['connections']} now, {result['connections_total']} in all"),
        ("messages received", result["messages"]),
        ("deliveries", result["deliveries"]),
        ("bytes in", result["bytes_in"]),
        ("bytes out", result["bytes_out"]),
        ("rejected", rejected),
        ("evictions", result["evictions"]),
        ("dropped for flooding", result["flood_dropped"]),
        ("kicks", result["kicks"]),
        ("bans", result["bans"]),
        *_history_rows(result["history"]),
    ]
    width = max(len(k) for k, _ in rows) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in rows)


def _history_rows(h: Any) -> list[tuple[str, Any]]:
    if not h["kept"]:
        return [("history", "off (history.keep_messages is 0)")]
    n = h["messages"]
    where = h["file"] or "memory only"
    since_ = f" since {local_time(h['oldest'])}" if h["oldest"] else ""
    rows: list[tuple[str, Any]] = [("history", f"{n} message{'s' if n != 1 else ''}{since_}")]
    rows.append(("history file", where))
    if h["file"]:
        lag = f"{h['write_lag']:g} s now"
        if h["write_lag_p99"] is not None:
            lag += f", p99 {h['write_lag_p99']:g} s, max {h['write_lag_max']:g} s"
        rows.append(("history write lag", f"{lag}; {h['pending']} waiting"))
    if h["complete"]:
        state = "complete"
    else:
        state = "INCOMPLETE: writes to the file fail, messages are held in memory (see the log)"
    if h["lost"]:
        state += f"; {h['lost']} messages could not be kept"
    rows.append(("history state", state))
    return rows


def show_history(result: Any) -> str:
    messages = result["messages"]
    if not messages:
        return "no messages"
    return "\n".join(
        f"{local_time(m['time'])} {shown(m['name'])}: {escape(m['text'])}" for m in messages
    )


def show_forget(result: Any) -> str:
    n = result["messages"]
    return f"forgot {n} message{'s' if n != 1 else ''} of {shown(result['forgotten'])}"


def show_reload(result: Any) -> str:
    applied, restart = result["applied"], result["needs_restart"]
    if not applied and not restart:
        return "reloaded: nothing changed"
    lines = ["reloaded"]
    if applied:
        lines.append("applied: " + ", ".join(applied))
    if restart:
        lines.append("needs a restart: " + ", ".join(restart))
    return "\n".join(lines)


SHOW: dict[str, Callable[[Any], str]] = {
    "list": show_list,
    "kick": show_kick,
    "ban": show_ban,
    "unban": show_unban,
    "bans": show_bans,
    "say": show_say,
    "stats": show_stats,
    "metrics": lambda result: str(result["text"]).removesuffix("\n"),  # as it is, for a file
    "reload": show_reload,
    "handover": lambda result: "chatd hands every connection over at its next SIGTERM",
    "history": show_history,
    "forget": show_forget,
}


def arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The request arguments of a parsed command line."""
    cmd = args.command
    if cmd == "kick":
        return {"name": args.name, **({"reason": args.reason} if args.reason else {})}
    if cmd == "ban":
        out: dict[str, Any] = {"target": args.target}
        for key in ("duration", "reason", "kind", "all"):
            if getattr(args, key):
                out[key] = getattr(args, key)
        return out
    if cmd == "unban":
        return {"target": args.target, **({"kind": args.kind} if args.kind else {})}
    if cmd == "say":
        return {"text": " ".join(args.text)}
    if cmd == "history":
        given = {"limit": args.limit, "since": args.since, "user": args.user}
        return {key: value for key, value in given.items() if value is not None}
    if cmd == "forget":
        return {"name": args.name}
    return {}


RESTART_JOBS = ("restart", "try-restart", "reload-or-restart")


def restarting(unit: str) -> bool:
    """Whether systemd's job for ``unit`` is a restart (as root: systemctl list-jobs)."""
    try:
        done = subprocess.run(
            ["systemctl", "list-jobs", "--no-legend", "--plain", unit],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    for line in done.stdout.splitlines():
        fields = line.split()  # JOB UNIT TYPE STATE
        if len(fields) >= 3 and fields[1] == unit and fields[2] in RESTART_JOBS:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "systemd-stop":
        if not restarting(args.unit):
            return OK  # a stop: chatd says goodbye on SIGTERM
        args.command = "handover"
    try:
        path, group = control_socket(args)
        result = request(path, group, args.command, arguments(args), args.timeout)
    except ConfigError as e:
        print(f"chatctl: error: {e}", file=sys.stderr)
        return USAGE
    except Unreachable as e:
        print(f"chatctl: {e}", file=sys.stderr)
        return UNREACHABLE
    except Failed as e:
        # The daemon names the command in most of its errors ("say: text is empty").
        error, prefix = str(e), f"{args.command}: "
        print(f"chatctl: {prefix}{error.removeprefix(prefix)}", file=sys.stderr)
        return FAILED
    text = (
        json.dumps(result, indent=2) if getattr(args, "json", False) else SHOW[args.command](result)
    )
    try:
        print(text, flush=True)
    except BrokenPipeError:
        die_of_sigpipe()
    return OK


def die_of_sigpipe() -> NoReturn:
    """End as cat or ls do when their reader is gone: killed by SIGPIPE, quietly.

    (Python ignores SIGPIPE, so a write to a closed pipe raises instead.)
    """
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    sys.exit(128 + signal.SIGPIPE)  # not reached
