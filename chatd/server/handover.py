"""Restart without dropping anyone: chatd's sockets and state, handed to the next chatd.

The outgoing chatd delivers what it accepted, then writes its state (every
connection's name, times, counters, partial input and queued output; the flood
buckets; the stats) as versioned JSON to a memfd.  The sockets and the memfd reach
the next chatd in one of two ways:

- under systemd, through the file descriptor store: the listeners and the control
  socket are stored at start, each client socket as it is accepted (``c<serial>``,
  removed again when it closes), the memfd (``state``) at the restart; the next
  chatd finds them all in LISTEN_FDS, named by LISTEN_FDNAMES;
- with ``chatd --daemon``, on SIGUSR2: the descriptors are inherited by a new chatd
  the old one starts, which finds the memfd through $CHATD_HANDOVER and the
  descriptors' numbers in the state.

`Inherited.take()` sorts out what was passed; `adopt()` makes the connections the
new server's own, as they were.  Anything that does not check out (another format, a
corrupt memfd) costs the handover, never a half-adopted client: every connection
passed is then told and closed, and chatd starts as a fresh one would.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import chatd
from chatd import __version__
from chatd.core.admission import address_key
from chatd.core.chat import HANDSHAKE, JOINED
from chatd.core.stats import Stats
from chatd.server import log, systemd
from chatd.server.connection import Connection
from chatd.server.outbox import CLOSING
from chatd.wire import notices
from chatd.wire.chat import NOTICE_SENDER
from chatd.wire.framing import encode

if TYPE_CHECKING:
    from chatd.server.server import Server

FORMAT = "chatd-handover"
VERSION = 1
HANDOVER_VARIABLE = "CHATD_HANDOVER"  # --daemon: "STATE_FD:READY_FD[:PIDFILE_FD]"
_CONN_NAME = re.compile(r"c(\d+)")


class HandoverError(Exception):
    """The state handed over cannot be used; str() says why."""


READY_TIMEOUT = 30.0  # seconds the outgoing --daemon waits for the next one's word

# The outgoing side.


def _prepare(server: Server) -> None:
    """Quiesce before the snapshot: everything accepted delivered (to each connection's
    queue at least), admin connections and connections already closing closed."""
    room = server.chat.room
    for _ in range(100):  # each round drops those whose delivery failed
        if not room.pending and not room.failures and not server.failed:
            break
        room.flush()
        server.settle()
    server.control.close_connections()
    for conn in list(server.conns.values()):
        if conn.link is CLOSING:
            conn.close_now()
    server.reap()


def to_systemd(server: Server) -> None:
    """``systemctl restart``: the state into the fd store beside the sockets, and exit."""
    _prepare(server)
    data = snapshot(server, fd_numbers=False)
    fd = to_memfd(data)
    stored = server.notifier.store([fd], "state")
    os.close(fd)
    if not stored:
        server.log.error("handover_failed", error=server.notifier.error)
        server.stop("SIGTERM")
        return
    server.log.info("handover", to="systemd", connections=len(server.conns), state_bytes=len(data))
    server.handed_over = True


def restart_daemon(server: Server) -> None:
    """SIGUSR2 to ``chatd --daemon``: start the next chatd (the code on disk now) with
    the sockets and the state, and leave once it has taken over; if it cannot, say
    why in the log and go on serving."""
    if server.daemon_argv is None:
        server.log.warning(
            "restart_unsupported",
            hint="SIGUSR2 restarts chatd --daemon; under systemd: systemctl restart chatd",
        )
        return
    _prepare(server)
    data = snapshot(server, fd_numbers=True)
    memfd = to_memfd(data)
    r, w = os.pipe()
    pidfile = server.pidfile_fd
    handed = [lst.sock.fileno() for lst in server.listeners]
    handed += [c.fd for c in server.conns.values()]
    if server.control.sock is not None:
        handed.append(server.control.sock.fileno())
    if server.metrics.listener is not None:
        handed.append(server.metrics.listener.sock.fileno())
    env = dict(os.environ)
    env[HANDOVER_VARIABLE] = f"{memfd}:{w}" + (f":{pidfile}" if pidfile is not None else "")
    top = os.path.dirname(os.path.dirname(os.path.abspath(chatd.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (top, env.get("PYTHONPATH", "")) if p)
    log.flush()
    try:
        child = subprocess.Popen(
            server.daemon_argv,
            pass_fds=[memfd, w, *handed, *([pidfile] if pidfile is not None else [])],
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except OSError as e:
        word = f"error: cannot start {server.daemon_argv[0]}: {e}"
        child = None
    else:
        os.close(w)
        w = -1
        word = wait_for_word(r, READY_TIMEOUT)
    for fd in (memfd, r, w):
        if fd >= 0:
            os.close(fd)
    if word == "ok" and child is not None:
        server.log.info("handover", to=child.pid, connections=len(server.conns))
        log.flush()
        os._exit(0)  # no goodbyes: the clients are the next chatd's now
    if child is not None:
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    why = (
        word.removeprefix("error: ")
        if word.startswith("error: ")
        else ("the new chatd did not say it took over")
    )
    server.log.error("restart_failed", error=why, still_serving=True)


def cannot_start(error: str) -> None:
    """This chatd cannot start (its config is bad): tell whoever handed it something.
    A --daemon that started it keeps serving; connections systemd passed are told."""
    handed = os.environ.get(HANDOVER_VARIABLE, "")
    if handed:
        ready = handed.split(":")[1] if handed.count(":") else ""
        if ready.isdigit():
            Inherited(ready_fd=int(ready)).report(f"error: {error}")
        return
    try:
        inherited = Inherited.take()
    except systemd.ActivationError:
        return
    if inherited is not None:
        inherited.refuse(notices.RESTART_FAILED(error=error))


def daemon_argv() -> list[str]:
    """How to start this chatd again (the same options)."""
    if sys.argv and sys.argv[0].endswith("__main__.py"):
        return [sys.executable, "-m", "chatd", *sys.argv[1:]]
    return [sys.executable, *sys.argv]


def snapshot(server: Server, *, fd_numbers: bool) -> bytes:
    """The state of ``server`` as the next chatd needs it.  The room must be flushed
    (nothing posted waits) and no connection closing; ``fd_numbers``: say each
    socket's descriptor number (inherited as it is by a chatd we start)."""
    chat = server.chat
    assert not chat.room.pending, "flush the room before the snapshot"
    members = list(chat.room) + [c for c in server.conns.values() if c.state is HANDSHAKE]
    buckets = {key: [bucket.tokens, bucket.stamp] for key, bucket in chat.admission.buckets()}
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "chatd": __version__,
        "stats": asdict(chat.stats),
        "deliveries": chat.room.deliveries,
        "buckets": buckets,
        "connections": [_connection(c, fd_numbers) for c in members if isinstance(c, Connection)],
    }
    if fd_numbers:
        doc["listeners"] = [lst.sock.fileno() for lst in server.listeners]
        control = server.control.sock
        doc["control"] = control.fileno() if control is not None else None
        metrics = server.metrics.listener
        doc["metrics"] = metrics.sock.fileno() if metrics is not None else None
    return json.dumps(doc).encode()


def _connection(c: Connection, fd_numbers: bool) -> dict[str, Any]:
    return {
        "serial": c.serial,
        **({"fd": c.fd} if fd_numbers else {}),
        "name": c.name,
        "joined": c.state is JOINED,
        "since": c.since,
        "accepted": c.accepted,
        "last_active": c.last_active,
        "messages": c.messages,
        "dropped": c.dropped,
        "warned_at": c.warned_at,
        "bytes_in": c.bytes_in,
        "bytes_out": c.bytes_out,
        "input": base64.b64encode(c.decoder.unparsed()).decode(),
        "output": base64.b64encode(c.pending_output()).decode(),
    }


def to_memfd(data: bytes) -> int:
    """A memfd holding ``data``, read from its start."""
    fd = os.memfd_create("chatd-state", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# The incoming side.


@dataclass
class Inherited:
    """What the chatd before this one passed on."""

    listeners: list[socket.socket] = field(default_factory=list)
    control: socket.socket | None = None
    metrics: socket.socket | None = None  # metrics.listen's listener
    connections: dict[int, socket.socket] = field(default_factory=dict)  # serial -> socket
    state: dict[str, Any] | None = None
    state_error: str = ""  # why a state passed could not be used
    ready_fd: int | None = None  # --daemon: where to say whether the handover is taken
    pidfile_fd: int | None = None

    @classmethod
    def take(cls) -> Inherited | None:
        """What this process was handed: by systemd (LISTEN_FDS) or by a chatd that
        started it ($CHATD_HANDOVER); None for a plain start.  Raises
        systemd.ActivationError for a passed descriptor that is no socket chatd uses."""
        handed = os.environ.pop(HANDOVER_VARIABLE, "")
        if handed:
            return cls._from_parent(handed)
        passed = systemd.passed_fds()
        if passed is None:
            return None
        inherited = cls()
        for fd, name in passed:
            m = _CONN_NAME.fullmatch(name)
            if name == "state":
                inherited._read_state(fd)
            elif name == "control":
                inherited.control = socket.socket(fileno=fd)
            elif name == "metrics":
                inherited.metrics = socket.socket(fileno=fd)
            elif m:
                inherited.connections[int(m.group(1))] = socket.socket(fileno=fd)
            else:
                inherited.listeners.append(systemd.adopt_listener(fd, f"fd {fd} ({name})"))
        return inherited

    @classmethod
    def _from_parent(cls, handed: str) -> Inherited:
        fds = [int(f) for f in handed.split(":") if f.isdigit()]
        inherited = cls(ready_fd=fds[1] if len(fds) > 1 else None)
        inherited.pidfile_fd = fds[2] if len(fds) > 2 else None
        inherited._read_state(fds[0])
        doc = inherited.state
        if doc is not None:
            try:
                inherited.listeners = [
                    systemd.adopt_listener(fd, f"fd {fd}") for fd in doc.get("listeners", [])
                ]
                control = doc.get("control")
                inherited.control = socket.socket(fileno=control) if control else None
                metrics = doc.get("metrics")
                inherited.metrics = socket.socket(fileno=metrics) if metrics else None
                inherited.connections = {
                    c["serial"]: socket.socket(fileno=c["fd"]) for c in doc["connections"]
                }
            except (OSError, KeyError, TypeError, systemd.ActivationError) as e:
                inherited.state_error = f"the descriptors handed over: {e}"
                inherited.state = None
        return inherited

    def _read_state(self, fd: int) -> None:
        try:
            with os.fdopen(fd, "rb") as f:
                doc = json.loads(f.read())
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise HandoverError("not a chatd handover")
            if doc.get("version") != VERSION:
                raise HandoverError(
                    f"handover version {doc.get('version')!r}, this chatd reads {VERSION}"
                )
            self.state = doc
        except (OSError, ValueError, HandoverError) as e:
            self.state_error = f"the state handed over: {e}"
            self.state = None

    def refuse(self, notice: str) -> None:
        """Tell every connection passed ``notice`` and close it: the handover is off
        (no state, or this chatd cannot start).  Best effort, never blocking long."""
        frame = encode(NOTICE_SENDER) + encode(notice)
        for sock in self.connections.values():
            with contextlib.suppress(OSError):
                sock.setblocking(False)
                sock.send(frame)
                sock.shutdown(socket.SHUT_WR)
            sock.close()
        self.connections.clear()

    def report(self, line: str) -> None:
        """--daemon: tell the chatd that started this one whether it took over."""
        if self.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, line.encode()[:4000] + b"\n")
            with contextlib.suppress(OSError):
                os.close(self.ready_fd)
            self.ready_fd = None


def adopt(server: Server, inherited: Inherited) -> int:
    """Make the connections handed over the server's own, as they were; return how
    many.  Those the state does not know (a chatd that crashed leaves no state) are
    told to reconnect."""
    doc = inherited.state
    known = {c["serial"]: c for c in doc["connections"]} if doc else {}
    chat = server.chat
    if doc:
        chat.stats = Stats(**doc["stats"])
        chat.room.deliveries = int(doc["deliveries"])
    adopted = 0
    for serial, sock in sorted(inherited.connections.items(), key=lambda kv: _order(known, kv[0])):
        saved = known.get(serial)
        try:
            peer = sock.getpeername()
        except OSError:
            sock.close()  # gone while chatd restarted
            server.unstore(serial)
            continue
        if saved is None:
            _refuse_one(sock, notices.RESTART_LOST())
            server.unstore(serial)
            continue
        conn = server.adopt(sock, peer, serial)
        _restore(conn, saved)
        chat.readmit(conn, _bucket(doc, conn))
        conn.update_interest()
        data = base64.b64decode(saved["output"])
        if data:
            conn.deliver(data)
        adopted += 1
    inherited.connections.clear()
    return adopted


def _order(known: dict[int, dict[str, Any]], serial: int) -> int:
    """Members in the order they joined (the state lists them so), the rest after."""
    return list(known).index(serial) if serial in known else len(known) + serial


def _bucket(doc: dict[str, Any] | None, conn: Connection) -> tuple[float, float] | None:
    """The tokens (and their time) the address's flood bucket had, if it had one."""
    saved = doc["buckets"].get(address_key(conn.peer_host)) if doc else None
    return None if saved is None else (float(saved[0]), float(saved[1]))


def _restore(conn: Connection, saved: dict[str, Any]) -> None:
    conn.name = saved["name"]
    conn.state = JOINED if saved["joined"] else HANDSHAKE
    conn.since = saved["since"]
    conn.accepted = saved["accepted"]
    conn.last_active = saved["last_active"]
    conn.messages = saved["messages"]
    conn.dropped = saved["dropped"]
    conn.warned_at = saved["warned_at"]
    conn.bytes_in = saved["bytes_in"]
    conn.bytes_out = saved["bytes_out"]
    cfg = conn.server.config
    conn.decoder.max_payload = cfg.max_message_bytes if saved["joined"] else cfg.max_name_bytes
    conn.decoder.feed(base64.b64decode(saved["input"]))


def _refuse_one(sock: socket.socket, notice: str) -> None:
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(encode(NOTICE_SENDER) + encode(notice))
        sock.shutdown(socket.SHUT_WR)
    sock.close()


def wait_for_word(fd: int, timeout: float) -> str:
    """The first line on ``fd`` ("" at its end, "?" after ``timeout`` seconds)."""
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return "?"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return "?"
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")
