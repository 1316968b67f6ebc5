"""SIGUSR2 to ``chatd --daemon``: the next chatd, started beside this one, takes over.

As nginx upgrades itself, in two steps, so that the chat pauses only for the second:

1. The running chatd starts the next one (the code on disk now, the same options)
   with one end of a socketpair, and goes on serving.  The next one imports, reads
   its config and builds its server; then it says ``ready``.  A next chatd that
   cannot start (a bad config) says why instead, and the running one logs it and
   serves on: nobody noticed.
2. On ``ready`` the running chatd delivers what it accepted, writes its state to a
   memfd (`handover.snapshot`) and passes it with every socket (SCM_RIGHTS, at most
   253 a message; the state names each one as the fd store would); the next chatd
   adopts them and says ``ok``, and the old one exits without a word to anyone.  On
   anything else (an error, silence) it serves on, having killed the next one.

The link is a SOCK_SEQPACKET socketpair: one message per word or batch of
descriptors, so no word is split or joined with the next.  The pidfile's descriptor
(locked by the first chatd) is inherited by each next one, so the pidfile follows.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import chatd
from chatd.server import handover, log
from chatd.server.handover import HandoverError, Inherited
from chatd.server.listeners import raise_nofile_limit
from chatd.server.loop import READ
from chatd.server.systemd import SCM_MAX_FD, ActivationError
from chatd.wire import notices

if TYPE_CHECKING:
    from chatd.server.server import Server

VARIABLE = "CHATD_HANDOVER"  # in the next chatd: "LINK_FD[:PIDFILE_FD]"
READY_TIMEOUT = 30.0  # seconds the next chatd has to say it is ready
TAKE_TIMEOUT = 10.0  # seconds, once ready, to take the sockets and say ok
WORD = 4096  # bytes a word may have


def argv() -> list[str]:
    """How to start this chatd again (the same options)."""
    if sys.argv and sys.argv[0].endswith("__main__.py"):
        return [sys.executable, "-m", "chatd", *sys.argv[1:]]
    return [sys.executable, *sys.argv]


def started_by_predecessor() -> bool:
    return bool(os.environ.get(VARIABLE))


def cannot_start(error: str) -> None:
    """This chatd cannot start (its config is bad): tell whoever handed it something.
    A --daemon that started it serves on; connections systemd passed are told."""
    if started_by_predecessor():
        Predecessor.from_environ().report(f"error: {error}")
        return
    try:
        inherited = Inherited.take()
    except ActivationError:
        return
    if inherited is not None:
        inherited.refuse(notices.RESTART_FAILED(error=error))


# The running chatd's side.


class Successor:
    """The next chatd while it starts: spawned on SIGUSR2, handed over to on ``ready``."""

    def __init__(self, server: Server, argv: list[str]) -> None:
        self.server = server
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pidfile = server.pidfile_fd
        inherited = [theirs.fileno(), *([pidfile] if pidfile is not None else [])]
        env = dict(os.environ)
        env[VARIABLE] = ":".join(map(str, inherited))
        top = os.path.dirname(os.path.dirname(os.path.abspath(chatd.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (top, env.get("PYTHONPATH", "")) if p)
        log.flush()
        try:
            self.child: subprocess.Popen[bytes] | None = subprocess.Popen(
                argv, pass_fds=inherited, env=env, stdin=subprocess.DEVNULL
            )
        finally:
            theirs.close()
        self.sock.setblocking(False)
        server.loop.register(self.sock, READ, self)
        server.call_at(time.monotonic() + READY_TIMEOUT, _late, self)
        server.log.info("restart_begin", successor=self.child.pid)

    @classmethod
    def start(cls, server: Server) -> None:
        """SIGUSR2: start the next chatd, unless one is starting already."""
        if server.daemon_argv is None:
            server.log.warning(
                "restart_unsupported",
                hint="SIGUSR2 restarts chatd --daemon; under systemd: systemctl restart chatd",
            )
            return
        if server.successor is not None:
            server.log.warning("restart_in_progress", successor=server.successor.pid)
            return
        try:
            server.successor = cls(server, server.daemon_argv)
        except OSError as e:
            server.log.error(
                "restart_failed", error=f"cannot start {server.daemon_argv[0]}: {e}", serving=True
            )

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    def ready(self, mask: int) -> None:
        """The next chatd's first word: ``ready``, or why it cannot start."""
        try:
            word = self.sock.recv(WORD)
        except BlockingIOError:
            return
        except OSError as e:
            word = f"error: {e.strerror}".encode()
        if word == b"ready":
            self._hand_over()
        else:
            self.fail(_why(word, "the next chatd exited during start-up"))

    def _hand_over(self) -> None:
        """Pass the state and the sockets; exit once the next chatd has taken them."""
        server = self.server
        server.loop.unregister(self.sock)
        self.sock.settimeout(TAKE_TIMEOUT)
        t0 = time.monotonic()
        handover.quiesce(server)
        t1 = time.monotonic()
        named = handover.descriptors(server)
        data = handover.snapshot(server, [name for _, name in named])
        memfd = handover.to_memfd(data)
        t2 = time.monotonic()
        try:
            socket.send_fds(self.sock, [b"state"], [memfd])
            fds = [fd for fd, _ in named]
            for i in range(0, len(fds), SCM_MAX_FD):
                socket.send_fds(self.sock, [b"fds"], fds[i : i + SCM_MAX_FD])
            self.sock.send(b"end")
            t3 = time.monotonic()
            word = self.sock.recv(WORD)
        except TimeoutError:
            word = b"error: no word from the next chatd within %d s" % TAKE_TIMEOUT
        except OSError as e:
            word = f"error: {e.strerror}".encode()
        finally:
            os.close(memfd)
        if word == b"ok":
            t4 = time.monotonic()
            server.log.info(
                "handover",
                to=self.pid,
                connections=len(server.conns),
                state_bytes=len(data),
                ms=_ms(t4 - t0),
                quiesce_ms=_ms(t1 - t0),
                snapshot_ms=_ms(t2 - t1),
                pass_ms=_ms(t3 - t2),
                take_ms=_ms(t4 - t3),
            )
            server.close_history()  # what was said up to now, on disk before leaving
            log.flush()
            os._exit(0)  # no goodbyes: the clients are the next chatd's now
        self.fail(_why(word, "the next chatd exited while taking over"), registered=False)

    def fail(self, why: str, *, registered: bool = True) -> None:
        """The restart is off: end the next chatd (if it is still there) and serve on."""
        server = self.server
        if registered:
            server.loop.unregister(self.sock)
        self.sock.close()
        if self.child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.child.wait(2)  # it exits after its word
            if self.child.poll() is None:
                self.child.kill()
                self.child.wait()
            self.child = None
        server.successor = None
        server.log.error("restart_failed", error=why, serving=True)


def _late(successor: Successor) -> None:
    if successor.server.successor is successor:
        successor.fail(f"the next chatd was not ready within {READY_TIMEOUT:g} s")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _why(word: bytes, silent: str) -> str:
    text = word.decode("utf-8", "replace")
    return text.removeprefix("error: ") if text.startswith("error: ") else silent


# The next chatd's side.


class Predecessor:
    """In the next chatd: its link to the chatd it replaces."""

    def __init__(self, sock: socket.socket | None, pidfile_fd: int | None) -> None:
        self.sock = sock
        self.pidfile_fd = pidfile_fd

    @classmethod
    def from_environ(cls) -> Predecessor:
        fds = [int(f) for f in os.environ.pop(VARIABLE, "").split(":") if f.isdigit()]
        sock = None
        with contextlib.suppress(OSError, IndexError):
            sock = socket.socket(fileno=fds[0])
        return cls(sock, fds[1] if len(fds) > 1 else None)

    def take(self) -> Inherited:
        """Say ``ready``; return the state and the sockets handed over.  Raises
        HandoverError (after which the chatd before serves on)."""
        if self.sock is None:
            raise HandoverError("no link to the chatd before")
        raise_nofile_limit()  # room for every connection before they come
        self.sock.settimeout(TAKE_TIMEOUT)
        memfd = None
        fds: list[int] = []
        try:
            self.sock.send(b"ready")
            while True:
                msg, got, flags, _ = socket.recv_fds(self.sock, WORD, SCM_MAX_FD)
                if flags & socket.MSG_CTRUNC:
                    raise HandoverError("descriptors lost in passing (the open-file limit?)")
                if msg == b"state" and len(got) == 1 and memfd is None:
                    memfd = got[0]
                elif msg == b"fds":
                    fds += got
                elif msg == b"end" and memfd is not None and not got:
                    break
                else:
                    raise HandoverError(f"unexpected {msg[:40]!r} from the chatd before")
        except (HandoverError, OSError) as e:
            for fd in [*fds, *([memfd] if memfd is not None else [])]:
                os.close(fd)
            if isinstance(e, HandoverError):
                raise
            raise HandoverError(f"taking over: {e.strerror or e}") from None
        return Inherited.handed(memfd, fds)

    def report(self, line: str) -> None:
        """Tell the chatd before whether this one took over (``ok``) or not."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.send(line.encode()[:WORD])
            self.sock.close()
            self.sock = None
