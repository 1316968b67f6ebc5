"""The admin control socket and its commands.

chatctl (or socat, or any script) talks to the daemon over a Unix-domain
socket, one JSON object per line each way:

    request:  {"cmd": "kick", "args": {"name": "alice", "reason": "spam"}}
    reply:    {"ok": true, "result": {...}}
              {"ok": false, "error": "no user named 'bob' is online", "code": "not_found"}

A request may carry an "id", which the reply repeats.  `parse()` turns a line
into a command and checked arguments without touching the server; each
command is then a small function of the server and those arguments.  The
socket and its connections are served by the daemon's own selector: reading
and writing never block, a connection's requests are answered a few per pass
of the loop, and a connection whose replies pile up unread is not read from
until it catches up.  So an admin client can neither stall the chat nor grow
the daemon's memory past one reply.

Who may connect: root, the daemon's own user and members of
``control.admin_group``, as the kernel reports the peer (SO_PEERCRED); anyone
else is answered "permission denied" and the attempt is logged.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import platform
import pwd
import re
import selectors
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chatd.bans import Ban, StateError, iso, parse_duration, parse_network
from chatd.config import ConfigError
from chatd.connection import JOINED, Connection
from chatd.protocol import max_length
from chatd.room import name_problem, text_problem

if TYPE_CHECKING:
    from chatd.config import Config
    from chatd.server import Server

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE

MAX_REQUEST = 64 * 1024  # bytes in one request line
HIGH_WATER = 256 * 1024  # stop reading requests while this much of the replies is unsent
LINES_PER_PASS = 16  # requests answered per connection per pass of the loop
MAX_ADMINS = 32  # admin connections at once
IDLE_TIMEOUT = 300.0  # seconds an admin connection may make no progress
MAX_TEXT = 1024  # characters in a notice or reason
NOTICE_ROOM = 200  # bytes a notice adds around a reason

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# SO_PEERGROUPS (Linux 4.13): the peer's supplementary groups as they were when
# it connected.  Python does not name it; it is 59 where the socket options are
# the kernel's generic ones (elsewhere chatd reads the groups from /proc).
_GENERIC_SOCKOPTS = ("x86_64", "i386", "i686", "aarch64", "arm", "riscv", "s390", "ppc64")
SO_PEERGROUPS: int | None = getattr(
    socket, "SO_PEERGROUPS", 59 if platform.machine().startswith(_GENERIC_SOCKOPTS) else None
)


class RequestError(Exception):
    """A request that cannot be carried out; becomes an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Admin:
    """The peer of a control connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int


# Requests.

# Argument name -> (type, required).
Spec = dict[str, tuple[type, bool]]
Command = Callable[["Server", Admin, dict[str, Any]], Any]
COMMANDS: dict[str, tuple[Command, Spec]] = {}


def command(cmd: str, /, **spec: tuple[type, bool]) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        COMMANDS[cmd] = (fn, spec)
        return fn

    return register


def parse(line: bytes) -> tuple[str, dict[str, Any]]:
    """Check a request line; return (command, arguments) or raise RequestError."""
    try:
        request = json.loads(line)
    except ValueError:
        raise RequestError(
            "bad_request", 'malformed request: expected one JSON object per line, {"cmd": ...}'
        ) from None
    if not isinstance(request, dict):
        raise RequestError("bad_request", 'malformed request: expected a JSON object {"cmd": ...}')
    unknown = set(request) - {"cmd", "args", "id"}
    if unknown:
        raise RequestError(
            "bad_request", f"unknown request field {sorted(unknown)[0]!r} (fields: cmd, args, id)"
        )
    cmd = request.get("cmd")
    if not isinstance(cmd, str):
        raise RequestError("bad_request", 'malformed request: "cmd" must be a command name')
    if cmd not in COMMANDS:
        raise RequestError(
            "unknown_command", f"unknown command {cmd!r} (commands: {', '.join(sorted(COMMANDS))})"
        )
    args = request.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RequestError("bad_request", f'{cmd}: "args" must be a JSON object')
    spec = COMMANDS[cmd][1]
    for key, value in args.items():
        if key not in spec:
            known = ", ".join(spec) or "none"
            raise RequestError(
                "bad_request", f"{cmd}: unknown argument {key!r} (arguments: {known})"
            )
        kind = spec[key][0]
        if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
            raise RequestError(
                "bad_request", f"{cmd}: argument {key!r} must be a {_type_name(kind)}"
            )
    for key, (_, required) in spec.items():
        if required and key not in args:
            raise RequestError("bad_request", f"{cmd}: missing argument {key!r}")
    return cmd, args


def _type_name(kind: type) -> str:
    return {str: "string", int: "number", bool: "boolean"}.get(kind, kind.__name__)


def request_id(line: bytes) -> Any:
    """The "id" of a request, for the reply (None if there is none)."""
    with contextlib.suppress(ValueError):
        request = json.loads(line)
        if isinstance(request, dict):
            return request.get("id")
    return None


def handle(server: Server, admin: Admin, line: bytes) -> dict[str, Any]:
    """Answer one request line: the reply object, never an exception."""
    reply: dict[str, Any]
    try:
        cmd, args = parse(line)
        fn = COMMANDS[cmd][0]
        reply = {"ok": True, "result": fn(server, admin, args)}
    except RequestError as e:
        reply = {"ok": False, "error": str(e), "code": e.code}
    except Exception:
        server.log.exception("control_internal_error", request=line[:200].decode(errors="replace"))
        reply = {"ok": False, "error": "internal error (see the chatd log)", "code": "internal"}
    rid = request_id(line)
    if rid is not None:
        reply["id"] = rid
    return reply


def _message_text(server: Server, cmd: str, key: str, value: str, *, empty_ok: bool) -> str:
    value = value.strip()
    if not value and not empty_ok:
        raise RequestError("bad_request", f"{cmd}: {key} is empty")
    if len(value) > MAX_TEXT:
        raise RequestError("bad_request", f"{cmd}: {key} is longer than {MAX_TEXT} characters")
    # The notice carrying it (with up to NOTICE_ROOM bytes more) must fit a frame.
    hl = server.config.header_length
    if len(value.encode()) + NOTICE_ROOM > max_length(hl):
        raise RequestError(
            "bad_request", f"{cmd}: {key} is too long for the {hl}-byte frame header"
        )
    problem = text_problem(value)
    if problem:
        raise RequestError("bad_request", f"{cmd}: {key}: {problem}")
    return value


def _joined(server: Server) -> list[Connection]:
    return [c for c in server.conns.values() if c.state is JOINED]


# Commands.


@command("list")
def cmd_list(server: Server, admin: Admin, args: dict[str, Any]) -> Any:
    now = time.monotonic()
    users = [
        {
            "name": c.name,
            "peer": c.peer,
            "since": iso(c.since),
            "idle": round(now - c.last_active, 3),
            "messages": c.messages,
            "queued": c.out_bytes,
        }
        for c in sorted(_joined(server), key=lambda c: c.since)
    ]
    return {"users": users}


@command("kick", name=(str, True), reason=(str, False))
def cmd_kick(server: Server, admin: Admin, args: dict[str, Any]) -> Any:
    reason = _message_text(server, "kick", "reason", args.get("reason", ""), empty_ok=True)
    conn = server.room.get(args["name"])
    if not isinstance(conn, Connection):
        raise RequestError("not_found", f"no user named {args['name']!r} is online")
    name = conn.name
    why = f": {reason}" if reason else ""
    server.log.info("kick", user=name, reason=reason, admin_uid=admin.uid, admin_pid=admin.pid)
    server.drop(
        conn,
        "kicked",
        notice=f"you were kicked by an admin{why}",
        announce=f"{name} was kicked" + (f" ({reason})" if reason else ""),
        by_uid=admin.uid,
    )
    server.stats.kicks += 1
    return {"kicked": name, "reason": reason}


@command("say", text=(str, True))
def cmd_say(server: Server, admin: Admin, args: dict[str, Any]) -> Any:
    text = _message_text(server, "say", "text", args["text"], empty_ok=False)
    server.room.notice(text)
    server.log.info("say", text=text, admin_uid=admin.uid)
    return {"recipients": len(server.room)}


@command("stats")
def cmd_stats(server: Server, admin: Admin, args: dict[str, Any]) -> Any:
    st = server.stats
    live = server.conns.values()
    return {
        "started": iso(st.started),
        "uptime": round(time.time() - st.started, 3),
        "users": len(server.room),
        "peak_users": st.peak_users,
        "connections": len(server.conns),
        "connections_total": st.connections,
        "messages": st.messages,
        "deliveries": server.room.deliveries,
        "bytes_in": st.bytes_in + sum(c.bytes_in for c in live),
        "bytes_out": st.bytes_out + sum(c.bytes_out for c in live),
        "rejected": dict(sorted(st.rejected.items())),
        "evictions": st.evictions,
        "flood_dropped": st.flood_dropped,
        "kicks": st.kicks,
        "bans": len(server.bans.active(time.time())),
    }


@command("reload")
def cmd_reload(server: Server, admin: Admin, args: dict[str, Any]) -> Any:
    server.log.info("reload_requested", admin_uid=admin.uid)
    try:
        applied, restart = server.reload()
    except ConfigError as e:
        server.log.error("reload_failed", error=str(e))
        raise RequestError("failed", f"reload failed, the old config stays: {e}") from None
    return {"applied": applied, "needs_restart": restart}


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
            "bad_request",
            f"{cmd}: not an IP address or network (CIDR): {target!r} "
            '(to ban a name that looks like one, give kind "name": chatctl ban --name)',
        )
    if kind == "address":
        net = parse_network(target)
        if net is None:
            raise RequestError(
                "bad_request", f"{cmd}: not an IP address or network (CIDR): {target!r}"
            )
        return kind, str(net)
    if kind != "name":
        raise RequestError("bad_request", f"{cmd}: kind must be name or address, got {kind!r}")
    problem = name_problem(target, max(max_name_bytes, 1024))
    if problem:
        raise RequestError("bad_request", f"{cmd}: not a user name: {problem}")
    return kind, target


@command("ban", target=(str, True), duration=(str, False), reason=(str, False), kind=(str, False))
def cmd_ban(server: Server, admin: Admin, args: dict[str, Any]) -> Any:
    kind, target = _target("ban", args, server.config.max_name_bytes)
    reason = _message_text(server, "ban", "reason", args.get("reason", ""), empty_ok=True)
    seconds = None
    if args.get("duration"):
        try:
            seconds = parse_duration(args["duration"])
        except ValueError as e:
            raise RequestError("bad_request", f"ban: {e}") from None
    now = time.time()
    ban = Ban(kind, target, reason, now, None if seconds is None else now + seconds, admin.uid)
    bans = server.bans
    old = bans.add(ban)
    try:
        server.save_bans()
    except StateError as e:
        bans.remove(kind, target)
        if old is not None:
            bans.add(old)
        raise RequestError("failed", f"ban not applied: {e}") from None
    server.expire_ban_at(ban)
    server.log.info(
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
        "disconnected": server.enforce_ban(ban),
    }


@command("unban", target=(str, True), kind=(str, False))
def cmd_unban(server: Server, admin: Admin, args: dict[str, Any]) -> Any:
    kind, target = _target("unban", args, server.config.max_name_bytes)
    bans = server.bans
    ban = bans.remove(kind, target)
    if ban is None and "kind" not in args and kind == "address":
        # A name can look like an address.
        kind = "name"
        ban = bans.remove(kind, args["target"].strip())
    if ban is None or ban.expired(time.time()):
        raise RequestError("not_found", f"{args['target'].strip()!r} is not banned")
    try:
        server.save_bans()
    except StateError as e:
        bans.add(ban)
        raise RequestError("failed", f"ban not lifted: {e}") from None
    server.log.info("unban", kind=ban.kind, target=ban.target, admin_uid=admin.uid)
    return {"unbanned": ban_json(ban, time.time())}


@command("bans")
def cmd_bans(server: Server, admin: Admin, args: dict[str, Any]) -> Any:
    now = time.time()
    return {"bans": [ban_json(b, now) for b in server.bans.active(now)]}


# The socket.


class ControlServer:
    """The listening control socket and its connections."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.path = ""
        self.sock: socket.socket | None = None
        self.conns: set[AdminConn] = set()
        self.admin_gid: int | None = None
        self.admin_uids: frozenset[int] = frozenset()  # the group's listed members
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._missing_group = ""  # logged as missing already

    def open(self) -> None:
        """Bind the control socket: a live one is never taken over, a stale one is replaced."""
        from chatd.server import StartupError

        cfg = self.server.config.control
        self.path = path = cfg.socket
        if not path:
            return
        self.resolve_group(self.server.config)
        try:
            self._make_directory(path)
            self._clear_stale(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:
            raise StartupError(
                f"cannot create control socket {path}: {(e.strerror or str(e)).lower()}"
            ) from None
        try:
            old_umask = os.umask(0o777 & ~cfg.mode)
            try:
                sock.bind(path)
            finally:
                os.umask(old_umask)
            os.chmod(path, cfg.mode)
            st = os.stat(path)
            self._ident = (st.st_dev, st.st_ino)
            self._chown_group(path)
            sock.listen(16)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"control socket {path} is in use: another chatd is running"
                ) from None
            raise StartupError(
                f"cannot create control socket {path}: {(e.strerror or str(e)).lower()}"
            ) from None
        self.sock = sock
        self.server.sel.register(sock, READ, self._accept)

    def _make_directory(self, path: str) -> None:
        directory = os.path.dirname(path)
        if directory and not os.path.isdir(directory):
            os.makedirs(directory, mode=0o755, exist_ok=True)
            self.server.log.info("control_directory_created", directory=directory)

    def _clear_stale(self, path: str) -> None:
        if probe_control_socket(path):
            os.unlink(path)
            self.server.log.warning("control_stale_replaced", path=path)

    def _chown_group(self, path: str) -> None:
        if self.admin_gid is None or self.admin_gid == os.getegid():
            return
        try:
            os.chown(path, -1, self.admin_gid)
        except OSError as e:
            self.server.log.warning(
                "control_group_not_set",
                path=path,
                group=self.server.config.control.admin_group,
                error=e.strerror,
            )

    def resolve_group(self, cfg: Config) -> None:
        """Look the admin group up (at start and on reload, never per connection)."""
        name = cfg.control.admin_group
        gid = None
        members: list[str] = []
        if name:
            try:
                group = grp.getgrnam(name)
                gid, members = group.gr_gid, group.gr_mem
            except KeyError:
                if name != self._missing_group:
                    self.server.log.info("control_group_missing", group=name)
        self._missing_group = name if name and gid is None else ""
        self.admin_gid = gid
        self.admin_uids = member_uids(members)
        if self.sock is not None:  # a reload: the socket file takes the new group
            self._regroup()

    def _regroup(self) -> None:
        gid = os.getegid() if self.admin_gid is None else self.admin_gid
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) != self._ident or st.st_gid == gid:
                return
            os.chown(self.path, -1, gid, follow_symlinks=False)
        except OSError as e:
            self.server.log.warning(
                "control_group_not_set",
                path=self.path,
                group=self.server.config.control.admin_group,
                error=e.strerror,
            )

    def close(self) -> None:
        for conn in list(self.conns):
            conn.close()
        if self.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.server.sel.unregister(self.sock)
            self.sock.close()
            self.sock = None
            # Remove the file only if it is still ours.
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._ident:
                    os.unlink(self.path)

    def _accept(self) -> None:
        assert self.sock is not None
        for _ in range(8):
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                self.server.log.warning("control_accept_failed", error=e.strerror)
                return
            sock.setblocking(False)
            pid, uid, gid = _CRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
            )
            admin = Admin(pid, uid, gid)
            conn = AdminConn(self, sock, admin)
            if not self.authorized(admin, sock):
                self.server.log.warning("control_denied", uid=uid, gid=gid, pid=pid)
                group = self.server.config.control.admin_group
                hint = f"run as root or join group {group}" if group else "run as root"
                conn.refuse("permission_denied", f"permission denied: {hint}")
            elif len(self.conns) > MAX_ADMINS:
                conn.refuse("busy", f"too many admin connections (at most {MAX_ADMINS})")
            else:
                self.server.log.debug("control_connect", uid=uid, pid=pid)

    def authorized(self, admin: Admin, sock: socket.socket) -> bool:
        if admin.uid in (0, os.geteuid()):
            return True
        gid = self.admin_gid
        if gid is None:
            return False
        if admin.gid == gid or admin.uid in self.admin_uids:
            return True
        # The peer's supplementary groups: from the kernel (as when it
        # connected), else from /proc (which a unit's ProtectProc= may hide).
        groups = peer_groups(sock)
        if groups is None:
            groups = _process_groups(admin.pid)
        return gid in groups


def probe_control_socket(path: str) -> bool:
    """Whether a stale socket (nobody answers) is at ``path``; False if nothing is.

    Raises StartupError if a live chatd answers there or the file is not a socket.
    """
    from chatd.server import StartupError

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StartupError(
            f"cannot create control socket {path}: {(e.strerror or str(e)).lower()}"
        ) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"cannot create control socket {path}: a file that is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.ETIMEDOUT):
            raise StartupError(
                f"cannot create control socket {path}: {(e.strerror or str(e)).lower()}"
            ) from None
    finally:
        probe.close()
    raise StartupError(f"control socket {path} is live: another chatd is running")


def member_uids(names: list[str]) -> frozenset[int]:
    """The uids of the users ``names`` (unknown names are skipped)."""
    uids = set()
    for name in names:
        with contextlib.suppress(KeyError):
            uids.add(pwd.getpwnam(name).pw_uid)
    return frozenset(uids)


def peer_groups(sock: socket.socket) -> frozenset[int] | None:
    """The supplementary groups of a Unix socket's peer (SO_PEERGROUPS), or None.

    None where the kernel cannot tell: before Linux 4.13, on an architecture
    with other option numbers, or for a peer in more than 256 groups.
    """
    if SO_PEERGROUPS is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    except OSError:
        return None
    return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))


def _process_groups(pid: int) -> frozenset[int]:
    """The supplementary groups of a (local) process, from /proc."""
    if pid <= 0:
        return frozenset()
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


class AdminConn:
    """One control connection.  The selector calls it whenever its socket is ready.

    Requests are answered in order, at most LINES_PER_PASS per pass of the
    loop; while HIGH_WATER bytes of replies wait unsent, no more requests are
    read.  To close, the replies are sent, then FIN, then input is read and
    discarded until the peer closes (closing with unread input could make the
    kernel discard the last reply), for at most LINGER seconds.
    """

    LINGER = 2.0

    def __init__(self, control: ControlServer, sock: socket.socket, admin: Admin) -> None:
        self.control = control
        self.server = control.server
        self.sock = sock
        self.admin = admin
        self.inbuf = bytearray()
        self.out = bytearray()
        self.eof = False  # the peer sent all it will send
        self.closing = False  # no more requests: send the replies, then close
        self.shut = False  # FIN sent
        self.closed = False
        self.interest = READ
        self.last_progress = time.monotonic()
        self._continue_pending = False
        control.conns.add(self)
        self.server.sel.register(sock, READ, self)
        self.server.call_at(self.last_progress + IDLE_TIMEOUT, self._check_idle)

    def __repr__(self) -> str:
        return f"<AdminConn uid={self.admin.uid} pid={self.admin.pid}>"

    def __call__(self) -> None:
        if self.interest & READ:
            self._read()
        if self.interest & WRITE and not self.closed:
            self._flush()

    def refuse(self, code: str, error: str) -> None:
        """Answer ``error`` and close, whatever was asked."""
        self.inbuf.clear()
        self.out += _encode({"ok": False, "error": error, "code": code})
        self.closing = True
        self._flush()

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if self.closing:  # draining before the close
            if not data:
                self.eof = True
                self._flush()
            return
        if data:
            self.last_progress = time.monotonic()
            self.inbuf += data
        else:
            self.eof = True
            if self.inbuf and not self.inbuf.endswith(b"\n"):
                self.inbuf += b"\n"  # a last request without its newline
        self._answer()

    def _answer(self, _: Any = None) -> None:
        self._continue_pending = False
        if self.closed or self.closing:
            return
        answered = 0
        while len(self.out) < HIGH_WATER and (nl := self.inbuf.find(b"\n")) >= 0:
            if answered == LINES_PER_PASS:
                self._continue()
                break
            line = bytes(self.inbuf[:nl])
            del self.inbuf[: nl + 1]
            if line.strip():
                answered += 1
                self.out += _encode(handle(self.server, self.admin, line))
        if len(self.inbuf) > MAX_REQUEST and b"\n" not in self.inbuf:
            self.refuse("bad_request", f"request too long (at most {MAX_REQUEST} bytes a line)")
            return
        if self.eof and b"\n" not in self.inbuf:
            self.closing = True  # everything asked is answered
        self._flush()

    def _continue(self) -> None:
        if not self._continue_pending:
            self._continue_pending = True
            self.server.call_at(0, self._answer)  # on this pass's timer run

    def _flush(self) -> None:
        if self.closed:
            return
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return
            if sent:
                del self.out[:sent]
                self.last_progress = time.monotonic()
        if not self.out:
            if self.closing:
                if not self.shut:
                    self.shut = True
                    try:
                        self.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        self.close()
                        return
                    self.server.call_at(time.monotonic() + self.LINGER, self._linger_expired)
                if self.eof:
                    self.close()
                    return
            elif b"\n" in self.inbuf:
                self._continue()  # replies caught up: take the requests that waited
        self._update()

    def _update(self) -> None:
        if self.closed:
            return
        want = 0
        if not self.eof and (self.closing or len(self.out) < HIGH_WATER):
            want |= READ
        if self.out:
            want |= WRITE
        if want == self.interest:
            return
        sel = self.server.sel
        if not want:
            sel.unregister(self.sock)  # a continuation is scheduled
        elif not self.interest:
            sel.register(self.sock, want, self)
        else:
            sel.modify(self.sock, want, self)
        self.interest = want

    def _linger_expired(self, _: Any) -> None:
        self.close()

    def _check_idle(self, _: Any) -> None:
        if self.closed:
            return
        due = self.last_progress + IDLE_TIMEOUT
        if time.monotonic() >= due:
            self.server.log.info("control_timeout", uid=self.admin.uid, pid=self.admin.pid)
            self.close()
        else:
            self.server.call_at(due, self._check_idle)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.control.conns.discard(self)
        if self.interest:
            with contextlib.suppress(KeyError, ValueError):
                self.server.sel.unregister(self.sock)
        self.interest = 0
        self.sock.close()


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply).encode() + b"\n"


__all__ = ["COMMANDS", "Admin", "ControlServer", "RequestError", "handle", "parse"]
