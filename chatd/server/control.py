"""The admin control socket: its file, who may connect, and its connections.

chatctl (or socat, or any script) talks to the daemon over a Unix-domain socket in
the control protocol (chatd.wire.control); the commands themselves are
chatd.core.admin's.  The socket and its connections are served by the daemon's own
loop: reading and writing never block, a connection's requests are answered a few
per pass of the loop (the rest in the passes after), and a connection whose replies
pile up unread is not read from until it catches up.  So an admin client can neither
stall the chat nor grow the daemon's memory past one reply.

Who may connect: root, the daemon's own user and members of
``control.admin_group``, as the kernel reports the peer (SO_PEERCRED); anyone else
is answered "permission denied" and the attempt is logged.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import platform
import pwd
import socket
import stat
import struct
import time
from typing import TYPE_CHECKING, Any

from chatd.core.admin import Admin, Later, Outcome, handle
from chatd.server.errors import StartupError
from chatd.server.loop import READ
from chatd.server.outbox import OPEN, Outbox
from chatd.server.paths import unsafe_directory
from chatd.wire import control
from chatd.wire.errors import os_reason
from chatd.wire.tokenbucket import TokenBucket

if TYPE_CHECKING:
    from chatd.server.config import Config
    from chatd.server.server import Server

HIGH_WATER = 256 * 1024  # stop reading requests while this much of the replies is unsent
LINES_PER_PASS = 16  # requests answered per connection per pass of the loop
MAX_ADMINS = 32  # admin connections at once (refused ones do not count)
BACKLOG = 128  # connections the kernel queues for accept()
DENIED_LOG_RATE = 1.0  # control_denied events a second, after a burst of DENIED_LOG_BURST
DENIED_LOG_BURST = 10
IDLE_TIMEOUT = 300.0  # seconds an admin connection may make no progress

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# SO_PEERGROUPS (Linux 4.13): the peer's supplementary groups as they were when
# it connected.  Python does not name it; it is 59 where the socket options are
# the kernel's generic ones (elsewhere chatd reads the groups from /proc).
_GENERIC_SOCKOPTS = ("x86_64", "i386", "i686", "aarch64", "arm", "riscv", "s390", "ppc64")
SO_PEERGROUPS: int | None = getattr(
    socket, "SO_PEERGROUPS", 59 if platform.machine().startswith(_GENERIC_SOCKOPTS) else None
)


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
        self.refusing = 0  # of conns, those being refused: they hold no admin slot
        self._denied_log = TokenBucket(DENIED_LOG_RATE, DENIED_LOG_BURST, time.monotonic())
        self._denied_suppressed = 0  # control_denied events not logged since the last

    def open(self, inherited: socket.socket | None = None) -> None:
        """Bind the control socket: a live one is never taken over, a stale one is
        replaced; or serve ``inherited``, the one the chatd before this had (a restart)."""
        cfg = self.server.config.control
        self.path = path = cfg.socket
        if inherited is not None and path and _names(inherited, path):
            self.resolve_group(self.server.config)
            st = os.lstat(path)
            self._ident = (st.st_dev, st.st_ino)
            inherited.setblocking(False)
            self.sock = inherited
            self.server.loop.register(inherited, READ, self)
            return
        if inherited is not None:
            # Moved or turned off since, or its file is gone: a new one is bound.
            inherited.close()
        if not path:
            return
        self.resolve_group(self.server.config)
        try:
            self._make_directory(path)
        except OSError as e:
            raise StartupError(f"cannot create control socket {path}: {os_reason(e)}") from None
        unsafe = unsafe_directory(os.path.dirname(path) or ".")
        if unsafe:
            raise StartupError(f"control socket {path} refused: {unsafe}")
        try:
            self._clear_stale(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:
            raise StartupError(f"cannot create control socket {path}: {os_reason(e)}") from None
        try:
            # The mode comes from the umask at bind: nothing acts on the path by name
            # after, but a chown that follows no link.
            old_umask = os.umask(0o777 & ~cfg.mode)
            try:
                sock.bind(path)
            finally:
                os.umask(old_umask)
            st = os.lstat(path)
            self._ident = (st.st_dev, st.st_ino)
            self._chown_group(path)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"control socket {path} is in use: another chatd is running"
                ) from None
            raise StartupError(f"cannot create control socket {path}: {os_reason(e)}") from None
        self.sock = sock
        self.server.loop.register(sock, READ, self)

    def _make_directory(self, path: str) -> None:
        directory = os.path.dirname(path)
        if directory and not os.path.isdir(directory):
            os.makedirs(directory, mode=0o750, exist_ok=True)
            self.server.log.info("control_directory_created", directory=directory)
            if self.admin_gid is not None:  # so that the admins may reach the socket
                with contextlib.suppress(OSError):
                    os.chown(directory, -1, self.admin_gid, follow_symlinks=False)

    def _clear_stale(self, path: str) -> None:
        if probe_control_socket(path):
            os.unlink(path)
            self.server.log.warning("control_stale_replaced", path=path)

    def _chown_group(self, path: str) -> None:
        if self.admin_gid is None or self.admin_gid == os.getegid():
            return
        try:
            os.chown(path, -1, self.admin_gid, follow_symlinks=False)
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

    def close_connections(self) -> None:
        for conn in list(self.conns):
            conn.close_now()

    def close(self, *, keep_file: bool = False) -> None:
        """Close the socket and its connections; remove its file, unless ``keep_file``
        (the next chatd serves the same socket)."""
        for conn in list(self.conns):
            conn.close_now()
        if self.sock is not None:
            self.server.loop.unregister(self.sock)
            self.sock.close()
            self.sock = None
            if keep_file:
                return
            # Remove the file only if it is still ours.
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._ident:
                    os.unlink(self.path)

    def ready(self, mask: int) -> None:
        """Accept what connects (a few per pass), and tell who may stay."""
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
                self._log_denied(admin)
                group = self.server.config.control.admin_group
                hint = f"run as root or join group {group}" if group else "run as root"
                conn.refuse(control.PERMISSION_DENIED, f"permission denied: {hint}")
            elif len(self.conns) - self.refusing > MAX_ADMINS:
                conn.refuse(control.BUSY, f"too many admin connections (at most {MAX_ADMINS})")
            else:
                self.server.log.debug("control_connect", uid=uid, pid=pid)

    def _log_denied(self, admin: Admin) -> None:
        """control_denied, at most DENIED_LOG_RATE a second after a burst: a refused
        peer must not make the daemon write as much as it connects."""
        if not self._denied_log.take(time.monotonic()):
            self._denied_suppressed += 1
            return
        fields = {"uid": admin.uid, "gid": admin.gid, "pid": admin.pid}
        if self._denied_suppressed:
            fields["suppressed"] = self._denied_suppressed
            self._denied_suppressed = 0
        self.server.log.warning("control_denied", **fields)

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


def _names(sock: socket.socket, path: str) -> bool:
    """Whether ``sock`` is bound at ``path`` and that file is still there, a socket."""
    try:
        return bool(sock.getsockname() == path and stat.S_ISSOCK(os.lstat(path).st_mode))
    except OSError:
        return False


def probe_control_socket(path: str) -> bool:
    """Whether a stale socket (nobody answers) is at ``path``; False if nothing is.

    Raises StartupError if a live chatd answers there or the file is not a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StartupError(f"cannot create control socket {path}: {os_reason(e)}") from None
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
            raise StartupError(f"cannot create control socket {path}: {os_reason(e)}") from None
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


class AdminConn(Outbox):
    """One control connection.

    Requests are answered in order, at most LINES_PER_PASS per pass of the loop;
    while HIGH_WATER bytes of replies wait unsent, or a reply waits for a worker (a
    `Later`: a read of the history file), no more requests are read or answered.  When
    the peer has sent all it will and everything is answered, the connection closes
    as every Outbox does: replies, FIN, then the peer's end of stream.
    """

    __slots__ = (
        "_continuing",
        "_out_seen",
        "_refused",
        "_waiting",
        "admin",
        "control",
        "eof",
        "inbuf",
        "last_progress",
    )

    def __init__(self, control: ControlServer, sock: socket.socket, admin: Admin) -> None:
        super().__init__(control.server.loop, sock)
        self.control = control
        self.admin = admin
        self.inbuf = bytearray()
        self.eof = False  # the peer sent all it will send
        self.last_progress = time.monotonic()
        self._out_seen = 0  # bytes_out at the last idle check
        self._continuing = False  # an answer of the requests that waited is scheduled
        self._refused = False  # refuse() was called: it counts in control.refusing
        self._waiting = False  # a reply is a Later not yet settled: the rest waits
        control.conns.add(self)
        self.update_interest()
        self.loop.call_at(self.last_progress + IDLE_TIMEOUT, self._check_idle)

    def __repr__(self) -> str:
        return f"<AdminConn uid={self.admin.uid} pid={self.admin.pid}>"

    # Outbox.

    def _reading(self) -> bool:
        return not self.eof and self.queued < HIGH_WATER and not self._waiting

    def _closed(self) -> None:
        if self._refused:
            self.control.refusing -= 1
        self.control.conns.discard(self)
        self.loop.unregister(self.sock)
        self.interest = 0
        self.sock.close()

    def flush(self) -> None:
        super().flush()
        if self.link is OPEN and self.queued < HIGH_WATER:
            self._continue()  # replies caught up: take the requests that waited

    # Requests.

    def refuse(self, code: str, error: str) -> None:
        """Answer ``error`` and close, whatever was asked."""
        self.inbuf.clear()
        if self.link is OPEN:
            self.control.refusing += 1
            self._refused = True
        self.close_after(control.encode(control.error_reply(code, error)))

    def readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.close_now()
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
        self._continuing = False
        if self.link is not OPEN or self._waiting:
            return
        answered = 0
        inbuf = self.inbuf
        while self.queued < HIGH_WATER and (nl := inbuf.find(b"\n")) >= 0:
            if answered == LINES_PER_PASS:
                self._continue()  # the next pass: the chat gets its turn first
                break
            if nl > control.MAX_REQUEST:
                break  # refused below, as a line without its end would be
            line = bytes(inbuf[:nl])
            del inbuf[: nl + 1]
            if line.strip():
                answered += 1
                reply = handle(self.control.server, self.admin, line)
                if isinstance(reply, Later):
                    self._waiting = True
                    reply.on_done(self._answered)
                    if self._waiting:
                        self.update_interest()
                        return  # the next requests wait for this one's reply
                    if self.link is not OPEN:
                        return
                    continue
                self.deliver(control.encode(reply))
                if self.link is not OPEN:
                    return
        if inbuf.find(b"\n", 0, control.MAX_REQUEST + 1) < 0 and len(inbuf) > control.MAX_REQUEST:
            self.refuse(
                control.BAD_REQUEST,
                f"request too long (at most {control.MAX_REQUEST} bytes a line)",
            )
            return
        if self.eof and b"\n" not in inbuf:
            self.close_after(None)  # everything asked is answered
            return
        self.update_interest()

    def _answered(self, outcome: Outcome) -> None:
        """A Later reply is settled: send it, then answer what waited behind it."""
        self._waiting = False
        if self.link is not OPEN:
            return
        self.last_progress = time.monotonic()
        self.deliver(control.encode(outcome[1]))
        if self.link is OPEN:
            self.update_interest()
            self.loop.call_soon(self._answer)

    def _continue(self) -> None:
        if not self._continuing and b"\n" in self.inbuf:
            self._continuing = True
            self.loop.call_soon(self._answer)

    def _check_idle(self, _: Any) -> None:
        if self.link is not OPEN:
            return
        if self.bytes_out != self._out_seen:
            self._out_seen = self.bytes_out
            self.last_progress = time.monotonic()
        due = self.last_progress + IDLE_TIMEOUT
        if time.monotonic() >= due:
            self.control.server.log.info("control_timeout", uid=self.admin.uid, pid=self.admin.pid)
            self.close_now()
        else:
            self.loop.call_at(due, self._check_idle)
