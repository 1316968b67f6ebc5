"""Restart without dropping anyone: chatd's sockets and state, handed to the next chatd.

The outgoing chatd delivers what it accepted, then writes its state (every
connection's name, times, counters, partial input and queued output; the flood
buckets; the stats) as versioned JSON to a memfd.  The sockets and the memfd reach
the next chatd in one of two ways:

- under systemd, through the file descriptor store: the listeners and the control
  socket are stored at start, each client socket as it is accepted (``c<serial>``,
  removed again when it closes), the memfd (``state``) at the restart; the next
  chatd finds them all in LISTEN_FDS, named by LISTEN_FDNAMES;
- with ``chatd --daemon``, on SIGUSR2: over a socketpair to the next chatd, which
  the old one starts (`chatd.server.reexec`); the state names each descriptor as
  the fd store would.

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
import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from chatd import __version__
from chatd.core.admission import address_key
from chatd.core.chat import HANDSHAKE, JOINED
from chatd.core.history import History
from chatd.core.stats import Stats
from chatd.server import systemd
from chatd.server.connection import Connection
from chatd.server.outbox import CLOSING
from chatd.wire import notices
from chatd.wire.chat import NOTICE_SENDER
from chatd.wire.framing import encode

if TYPE_CHECKING:
    from chatd.server.server import Server

FORMAT = "chatd-handover"
VERSION = 2  # 2: connections as rows of FIELDS
_CONN_NAME = re.compile(r"c(\d+)")


class HandoverError(Exception):
    """The state handed over cannot be used; str() says why."""


# The outgoing side.


def quiesce(server: Server) -> None:
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
    quiesce(server)
    data = snapshot(server)
    fd = to_memfd(data)
    stored = server.notifier.store([fd], "state")
    os.close(fd)
    if not stored:
        server.log.error("handover_failed", error=server.notifier.error)
        server.stop("SIGTERM")
        return
    server.log.info("handover", to="systemd", connections=len(server.conns), state_bytes=len(data))
    server.handed_over = True


def store_listening(server: Server) -> None:
    """Put the listeners, the control socket and the metrics listener in systemd's
    file descriptor store (the metrics one the chatd before had goes first)."""
    notifier = server.notifier
    notifier.store([lst.sock.fileno() for lst in server.listeners], "listen")
    if server.control.sock is not None:
        notifier.store([server.control.sock.fileno()], "control")
    notifier.unstore("metrics")
    if server.metrics.listener is not None:
        notifier.store([server.metrics.listener.sock.fileno()], "metrics")


def snapshot(server: Server, names: list[str] | None = None) -> bytes:
    """The state of ``server`` as the next chatd needs it.  The room must be flushed
    (nothing posted waits) and no connection closing (`quiesce`); ``names``: those
    of the descriptors passed with it, in order (`descriptors`)."""
    chat = server.chat
    history = chat.history
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
        "connections": [_connection(c) for c in members if isinstance(c, Connection)],
        # The ring of what was said (the file may not have its last rows yet).
        "history": {"rows": list(history.ring), "floor": history.floor, "seq": history.seq},
    }
    if names is not None:
        doc["descriptors"] = names
    return json.dumps(doc, separators=(",", ":")).encode()


def descriptors(server: Server) -> list[tuple[int, str]]:
    """Every socket to pass on, with its name as it has in the fd store."""
    named = [(lst.sock.fileno(), "listen") for lst in server.listeners]
    if server.control.sock is not None:
        named.append((server.control.sock.fileno(), "control"))
    if server.metrics.listener is not None:
        named.append((server.metrics.listener.sock.fileno(), "metrics"))
    return named + [(c.fd, f"c{c.serial}") for c in server.conns.values()]


# A connection in the state: a row of these, in this order (rows, not objects,
# halve the JSON a restart of 10,000 connections writes and reads).
FIELDS = (
    "serial",
    "name",
    "joined",
    "since",
    "accepted",
    "last_active",
    "messages",
    "dropped",
    "warned_at",
    "bytes_in",
    "bytes_out",
    "input",
    "output",
)


def _connection(c: Connection) -> list[Any]:
    """The row of FIELDS for ``c``."""
    unparsed, pending = c.decoder.unparsed(), c.pending_output()
    return [
        c.serial,
        c.name,
        c.state is JOINED,
        c.since,
        c.accepted,
        c.last_active,
        c.messages,
        c.dropped,
        c.warned_at,
        c.bytes_in,
        c.bytes_out,
        base64.b64encode(unparsed).decode() if unparsed else "",
        base64.b64encode(pending).decode() if pending else "",
    ]


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

    @classmethod
    def take(cls) -> Inherited | None:
        """What systemd passed (LISTEN_FDS, named by LISTEN_FDNAMES); None for a plain
        start.  Raises systemd.ActivationError for a passed descriptor that is no
        socket chatd uses."""
        passed = systemd.passed_fds()
        if passed is None:
            return None
        inherited = cls()
        inherited._sort(passed)
        return inherited

    @classmethod
    def handed(cls, memfd: int, fds: list[int]) -> Inherited:
        """What a chatd --daemon passed: the state, and the sockets it names.  Raises
        HandoverError (every descriptor closed) if the two do not match."""
        inherited = cls()
        inherited._read_state(memfd)
        names = inherited.state.get("descriptors") if inherited.state else None
        if not isinstance(names, list) or len(names) != len(fds):
            for fd in fds:
                os.close(fd)
            raise HandoverError(inherited.state_error or "the state does not name the sockets")
        try:
            inherited._sort(zip(fds, map(str, names), strict=True))
        except systemd.ActivationError as e:
            inherited.close()
            raise HandoverError(str(e)) from None
        return inherited

    def _sort(self, passed: Iterable[tuple[int, str]]) -> None:
        for fd, name in passed:
            m = _CONN_NAME.fullmatch(name)
            if name == "state":
                self._read_state(fd)
            elif name == "control":
                self.control = socket.socket(fileno=fd)
            elif name == "metrics":
                self.metrics = socket.socket(fileno=fd)
            elif m:
                self.connections[int(m.group(1))] = socket.socket(fileno=fd)
            else:
                self.listeners.append(systemd.adopt_listener(fd, f"fd {fd} ({name})"))

    def close(self) -> None:
        """Close every socket (the chatd before still has them)."""
        for sock in [*self.listeners, *self.connections.values(), self.control, self.metrics]:
            if sock is not None:
                sock.close()
        self.listeners, self.connections, self.control, self.metrics = [], {}, None, None

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


def adopt(server: Server, inherited: Inherited) -> int:
    """Make the connections handed over the server's own, as they were; return how
    many.  Those the state does not know (a chatd that crashed leaves no state) are
    told to reconnect."""
    doc = inherited.state
    rows = doc["connections"] if doc else []
    known = {row[0]: dict(zip(FIELDS, row, strict=True)) for row in rows}
    chat = server.chat
    if doc:
        chat.stats = Stats(**doc["stats"])
        chat.room.deliveries = int(doc["deliveries"])
        _restore_history(chat.history, doc.get("history"))
    adopted = 0
    # Members in the order they joined (the state lists them so), the rest after.
    rank = {serial: i for i, serial in enumerate(known)}
    order = sorted(inherited.connections.items(), key=lambda kv: rank.get(kv[0], len(rank) + kv[0]))
    for serial, sock in order:
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


def _restore_history(history: History, said: Any) -> None:
    """The ring as the chatd before had it, newer than the file may be yet (its
    writer finishes after the handover); a ring that does not read stays as loaded."""
    try:
        rows = [(int(i), float(t), str(name), str(text)) for i, t, name, text in said["rows"]]
        floor, seq = int(said["floor"]), int(said["seq"])
    except (TypeError, ValueError, KeyError):
        return
    history.ring.clear()
    history.load(rows, floor, seq)


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
