"""The admin commands (list, kick, ban, unban, bans, say, stats, metrics, reload,
history, forget), without I/O.

`handle()` answers one control request line with its reply object, never an
exception: the request is checked by the control protocol (chatd.wire.control), then
carried out against the small `Daemon` interface that the server implements.  Who may
ask is the control socket's business; each command is given the asker's credentials
for its log event.

A command that needs the disk (a deep `history`, a `forget`) cannot answer at once:
its handler returns a `Later`, which the server settles on its loop once a worker
has the result, and `handle()` returns a Later of the reply.  The control
connection answers nothing after it until it is settled, so replies stay in order.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from chatd.core.addresses import IPNetwork, parse_network
from chatd.core.bans import Ban, StateError
from chatd.core.chat import Chat
from chatd.core.history import History, Row
from chatd.core.names import name_problem
from chatd.wire import control
from chatd.wire.chat import text_problem
from chatd.wire.control import BAD_REQUEST, FAILED, NOT_FOUND, RequestError, iso
from chatd.wire.framing import max_length

MAX_TEXT = 1024  # characters in a notice or reason
NOTICE_ROOM = 200  # bytes a notice adds around a reason


@dataclass(frozen=True)
class Admin:
    """The peer of a control connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int


class ReloadFailed(Exception):
    """The config could not be reloaded; the old one stays.  str() says why."""


Outcome = tuple[bool, Any]  # (True, result) or (False, RequestError)


class Later:
    """A result that comes later, settled once on the server's loop: `resolve()` with
    the result or `fail()` with a RequestError."""

    __slots__ = ("_waiting", "outcome")

    def __init__(self) -> None:
        self.outcome: Outcome | None = None
        self._waiting: list[Callable[[Outcome], None]] = []

    def resolve(self, result: Any) -> None:
        self._settle((True, result))

    def fail(self, error: RequestError) -> None:
        self._settle((False, error))

    def _settle(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        waiting, self._waiting = self._waiting, []
        for fn in waiting:
            fn(outcome)

    def on_done(self, fn: Callable[[Outcome], None]) -> None:
        """Call ``fn(outcome)`` once settled (at once if it is)."""
        if self.outcome is not None:
            fn(self.outcome)
        else:
            self._waiting.append(fn)

    def then(self, fn: Callable[[Any], Any]) -> Later:
        """A Later of ``fn(result)``; a failure, or a RequestError from ``fn``, passes on."""
        after = Later()

        def run(outcome: Outcome) -> None:
            ok, value = outcome
            if not ok:
                after.fail(value)
                return
            try:
                after.resolve(fn(value))
            except RequestError as e:
                after.fail(e)
            except Exception:
                _log().exception("control_internal_error", request="(a later reply)")
                after.fail(RequestError(control.INTERNAL, "internal error (see the chatd log)"))

        self.on_done(run)
        return after


class Daemon(Protocol):
    """What the admin commands need of the server."""

    chat: Chat

    def reload(self) -> tuple[list[str], list[str]]:
        """Re-read the config: (keys applied, keys needing a restart).

        Raises ReloadFailed, having logged it."""

    def counters(self) -> dict[str, int]:
        """connections (now), bytes_in and bytes_out (in all)."""

    def arm_handover(self) -> None:
        """The next SIGTERM is a restart; raises ReloadFailed if one cannot hand over."""

    def metrics_text(self) -> str:
        """The metrics in the Prometheus text format, as metrics.listen serves them."""

    def history_status(self) -> dict[str, Any]:
        """The history's size, oldest message, write lag and completeness, for stats."""

    def read_history(self, limit: int, since: float | None, user: str | None) -> Later:
        """A Later of the rows the disk has: the last ``limit`` said at ``since`` or
        later, by ``user`` (any case), oldest first."""

    def forget_history(self, name: str, up_to: int) -> Later:
        """A Later of how many messages of ``name`` (any case), up to id ``up_to``, went
        from the disk."""


Handler = Callable[[Daemon, Admin, dict[str, Any]], Any]
HANDLERS: dict[str, Handler] = {}


def command(cmd: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        assert cmd in control.COMMANDS, cmd
        HANDLERS[cmd] = fn
        return fn

    return register


def handle(daemon: Daemon, admin: Admin, line: bytes) -> dict[str, Any] | Later:
    """Answer one request line: the reply object (or a Later of it), never an exception."""
    reply: dict[str, Any]
    rid = control.request_id(line)
    try:
        request = control.parse(line)
        result = HANDLERS[request.cmd](daemon, admin, request.args)
        if isinstance(result, Later):
            return _later_reply(result, rid)
        reply = {"ok": True, "result": result}
    except RequestError as e:
        reply = control.error_reply(e.code, str(e))
    except Exception:
        structlog.get_logger("chatd").exception(
            "control_internal_error", request=line[:200].decode(errors="replace")
        )
        reply = control.error_reply(control.INTERNAL, "internal error (see the chatd log)")
    if rid is not None:
        reply["id"] = rid
    return reply


def _later_reply(result: Later, rid: Any) -> Later:
    replied = Later()

    def settle(outcome: Outcome) -> None:
        ok, value = outcome
        reply = {"ok": True, "result": value} if ok else control.error_reply(value.code, str(value))
        if rid is not None:
            reply["id"] = rid
        replied.resolve(reply)

    result.on_done(settle)
    return replied


def _log() -> Any:
    return structlog.get_logger("chatd")


def _message_text(daemon: Daemon, cmd: str, key: str, value: str, *, empty_ok: bool) -> str:
    value = value.strip()
    if not value and not empty_ok:
        raise RequestError(BAD_REQUEST, f"{cmd}: {key} is empty")
    if len(value) > MAX_TEXT:
        raise RequestError(BAD_REQUEST, f"{cmd}: {key} is longer than {MAX_TEXT} characters")
    # The notice carrying it (with up to NOTICE_ROOM bytes more) must fit a frame.
    hl = daemon.chat.settings.header_length
    if len(value.encode()) + NOTICE_ROOM > max_length(hl):
        raise RequestError(BAD_REQUEST, f"{cmd}: {key} is too long for the {hl}-byte frame header")
    problem = text_problem(value)
    if problem:
        raise RequestError(BAD_REQUEST, f"{cmd}: {key} may not contain {problem}")
    return value


@command("list")
def cmd_list(daemon: Daemon, admin: Admin, args: dict[str, Any]) -> Any:
    chat = daemon.chat
    now = chat.host.now()
    users = [
        {
            "name": m.name,
            "peer": m.peer,
            "since": iso(m.since),
            "idle": round(now - m.last_active, 3),
            "messages": m.messages,
            "queued": m.queued,
        }
        for m in sorted(chat.room, key=lambda m: m.since)
    ]
    return {"users": users}


@command("kick")
def cmd_kick(daemon: Daemon, admin: Admin, args: dict[str, Any]) -> Any:
    reason = _message_text(daemon, "kick", "reason", args.get("reason", ""), empty_ok=True)
    chat = daemon.chat
    member = chat.room.get(args["name"])  # the name itself, only the case may differ
    if member is None:
        like = chat.room.lookalike(args["name"])
        hint = f" ({like.name!a} only looks like it)" if like is not None else ""
        raise RequestError(NOT_FOUND, f"no user named {args['name']!r} is online{hint}")
    name = member.name
    _log().info("kick", user=name, reason=reason, admin_uid=admin.uid, admin_pid=admin.pid)
    chat.kick(member, reason, admin.uid)
    return {"kicked": name, "reason": reason}


@command("say")
def cmd_say(daemon: Daemon, admin: Admin, args: dict[str, Any]) -> Any:
    text = _message_text(daemon, "say", "text", args["text"], empty_ok=False)
    recipients = daemon.chat.say(text)
    _log().info("say", text=text, admin_uid=admin.uid)
    return {"recipients": recipients}


@command("stats")
def cmd_stats(daemon: Daemon, admin: Admin, args: dict[str, Any]) -> Any:
    chat = daemon.chat
    st = chat.stats
    counters = daemon.counters()
    return {
        "started": iso(st.started),
        "uptime": round(chat.host.wall() - st.started, 3),
        "users": len(chat.room),
        "peak_users": st.peak_users,
        "connections": counters["connections"],
        "connections_total": st.connections,
        "messages": st.messages,
        "deliveries": chat.room.deliveries,
        "bytes_in": counters["bytes_in"],
        "bytes_out": counters["bytes_out"],
        "rejected": dict(sorted(st.rejected.items())),
        "evictions": st.evictions,
        "flood_dropped": st.flood_dropped,
        "kicks": st.kicks,
        "bans": len(chat.bans.active(chat.host.wall())),
        "history": daemon.history_status(),
    }


@command("metrics")
def cmd_metrics(daemon: Daemon, admin: Admin, args: dict[str, Any]) -> Any:
    return {"text": daemon.metrics_text()}


@command("reload")
def cmd_reload(daemon: Daemon, admin: Admin, args: dict[str, Any]) -> Any:
    _log().info("reload_requested", admin_uid=admin.uid)
    try:
        applied, restart = daemon.reload()
    except ReloadFailed as e:  # logged by the daemon
        raise RequestError(FAILED, f"reload failed, the old config stays: {e}") from None
    return {"applied": applied, "needs_restart": restart}


@command("handover")
def cmd_handover(daemon: Daemon, admin: Admin, args: dict[str, Any]) -> Any:
    try:
        daemon.arm_handover()
    except ReloadFailed as e:
        raise RequestError(FAILED, f"handover: {e}") from None
    _log().info("handover_armed", admin_uid=admin.uid)
    return {"armed": True}


# Bans.


def ban_json(ban: Ban, now: float) -> dict[str, Any]:
    return {
        "kind": ban.kind,
        "target": ban.target,
        "reason": ban.reason,
        "created": iso(ban.created),
        "expires": iso(ban.expires),
        "remaining": None if ban.expires is None else round(max(0.0, ban.expires - now), 3),
        "by": ban.by,
    }


# Dotted digits, or hex digits with a colon, perhaps with %scope and /prefix: meant as an address.
_ADDRESS_LIKE = re.compile(r"(?:\d+(?:\.\d+)+|[0-9A-Fa-f]*:[0-9A-Fa-f:.]*)(?:%\S*)?(?:/\S*)?")


def _target(cmd: str, args: dict[str, Any], max_name_bytes: int) -> tuple[str, str]:
    """The (kind, normalised target) a ban or unban names."""
    target = args["target"].strip()
    kind = args.get("kind") or ("address" if parse_network(target) is not None else "name")
    if cmd == "ban" and kind == "name" and not args.get("kind") and _ADDRESS_LIKE.fullmatch(target):
        raise RequestError(  # 10.0.0.0/33: a typo, not a name
            BAD_REQUEST,
            f"{cmd}: not an IP address or network (CIDR): {target!r} "
            "(to ban a name that looks like one, use --name)",
        )
    if kind == "address":
        net = parse_network(target)
        if net is None:
            raise RequestError(
                BAD_REQUEST, f"{cmd}: not an IP address or network (CIDR): {target!r}"
            )
        if cmd == "ban":
            _check_network(target, net, bool(args.get("all")))
        return kind, str(net)
    if kind != "name":
        raise RequestError(BAD_REQUEST, f"{cmd}: kind must be name or address, got {kind!r}")
    # An old name ban may end in ']' (refused since replayed messages came): it can go.
    problem = name_problem(target, max(max_name_bytes, 1024), since_history=cmd == "ban")
    if problem:
        raise RequestError(BAD_REQUEST, f"{cmd}: not a user name: {problem}")
    return kind, target


WIDE_PREFIX = {4: 8, 6: 16}  # a ban of a network wider than this needs "all"


def _check_network(target: str, net: IPNetwork, confirmed: bool) -> None:
    """A network banned as written: no host bits silently dropped (10.0.0.7/0 is not
    10.0.0.7), and a very wide one only when the admin says so."""
    if "/" in target:
        try:
            ipaddress.ip_network(target.split("%", 1)[0], strict=True)
        except ValueError:
            raise RequestError(
                BAD_REQUEST,
                f"ban: {target} has host bits set: the network is {net}; give that if you mean it",
            ) from None
    if net.prefixlen < WIDE_PREFIX[net.version] and not confirmed:
        raise RequestError(
            BAD_REQUEST,
            f"ban: {net} is wider than /{WIDE_PREFIX[net.version]}, much of the Internet "
            "or everyone: to mean it, use --all",
        )


@command("ban")
def cmd_ban(daemon: Daemon, admin: Admin, args: dict[str, Any]) -> Any:
    chat = daemon.chat
    kind, target = _target("ban", args, chat.settings.max_name_bytes)
    reason = _message_text(daemon, "ban", "reason", args.get("reason", ""), empty_ok=True)
    seconds = None
    if args.get("duration"):
        try:
            seconds = control.parse_duration(args["duration"])
        except ValueError as e:
            raise RequestError(BAD_REQUEST, f"ban: {e}") from None
    now = chat.host.wall()
    ban = Ban(kind, target, reason, now, None if seconds is None else now + seconds, admin.uid)
    bans = chat.bans
    old = bans.add(ban)
    try:
        chat.moderation.prune_bans()
        chat.host.save_bans(bans)
    except StateError as e:
        bans.remove(kind, target)
        if old is not None:
            bans.add(old)
        raise RequestError(FAILED, f"ban not applied: {e}") from None
    chat.moderation.watch_expiry(ban)
    _log().info(
        "ban",
        kind=kind,
        target=target,
        reason=reason,
        expires=iso(ban.expires),
        admin_uid=admin.uid,
        admin_pid=admin.pid,
    )
    return {
        "ban": ban_json(ban, now),
        "replaced": old is not None,
        "disconnected": chat.moderation.enforce(ban),
    }


@command("unban")
def cmd_unban(daemon: Daemon, admin: Admin, args: dict[str, Any]) -> Any:
    chat = daemon.chat
    kind, target = _target("unban", args, chat.settings.max_name_bytes)
    bans = chat.bans
    ban = bans.remove(kind, target)
    if ban is None and "kind" not in args and kind == "address":
        # A name can look like an address.
        kind = "name"
        ban = bans.remove(kind, args["target"].strip())
    if ban is None or ban.expired(chat.host.wall()):
        raise RequestError(NOT_FOUND, f"{args['target'].strip()!r} is not banned")
    try:
        chat.moderation.prune_bans()
        chat.host.save_bans(bans)
    except StateError as e:
        bans.add(ban)
        raise RequestError(FAILED, f"ban not lifted: {e}") from None
    _log().info("unban", kind=ban.kind, target=ban.target, admin_uid=admin.uid)
    return {"unbanned": ban_json(ban, chat.host.wall())}


@command("bans")
def cmd_bans(daemon: Daemon, admin: Admin, args: dict[str, Any]) -> Any:
    chat = daemon.chat
    now = chat.host.wall()
    return {"bans": [ban_json(b, now) for b in chat.bans.active(now)]}


# The history.


def row_json(row: Row) -> dict[str, Any]:
    return {"id": row[0], "time": iso(row[1]), "name": row[2], "text": row[3]}


@command("history")
def cmd_history(daemon: Daemon, admin: Admin, args: dict[str, Any]) -> Any:
    limit = args.get("limit", control.HISTORY_LIMIT)
    if not 1 <= limit <= control.HISTORY_LIMIT_MAX:
        raise RequestError(
            BAD_REQUEST, f"history: limit must be 1 to {control.HISTORY_LIMIT_MAX}, got {limit}"
        )
    since = None
    if "since" in args:
        try:
            since = control.parse_iso(args["since"])
        except ValueError as e:
            raise RequestError(BAD_REQUEST, f"history: since: {e}") from None
    user = args.get("user")
    chat = daemon.chat
    if not chat.history.keeping:
        return {"messages": []}
    rows, whole = chat.history.query(limit, since, user, chat.host.wall())
    if whole:
        return {"messages": [row_json(r) for r in rows]}
    return daemon.read_history(limit, since, user).then(
        lambda disk: {"messages": [row_json(r) for r in History.merge(disk, rows, limit)]}
    )


@command("forget")
def cmd_forget(daemon: Daemon, admin: Admin, args: dict[str, Any]) -> Any:
    name = args["name"].strip()
    if not name:
        raise RequestError(BAD_REQUEST, "forget: name is empty")
    history = daemon.chat.history
    in_memory = history.forget(name)

    def done(on_disk: int) -> Any:
        gone = max(in_memory, on_disk)
        _log().info("forget", user=name, messages=gone, admin_uid=admin.uid, admin_pid=admin.pid)
        return {"forgotten": name, "messages": gone}

    if not history.persistent:
        return done(0)
    return daemon.forget_history(name, history.seq).then(done)
