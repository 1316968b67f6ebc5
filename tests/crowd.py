"""Many clients from one thread: a selector in the test process, not a thread each."""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import time
from collections.abc import Callable

from helpers import frame


def raise_nofile(need: int) -> None:
    """Raise this process's open-file limit to ``need`` (the hard one too, as root).

    Raises OSError if that is not allowed; daemons started afterwards inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
        except (ValueError, OSError) as e:
            raise OSError(f"RLIMIT_NOFILE hard limit {hard} is below {need}: {e}") from None
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class Member:
    __slots__ = ("buf", "closed", "name", "seen", "sock", "tail", "welcomed")

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.buf = b""  # bytes until the welcome is complete
        self.tail = b""  # the last bytes received, to find a marker across reads
        self.seen = False  # whether the marker arrived
        self.welcomed = False
        self.closed = False


class Crowd:
    """``n`` users joined from one selector; they read everything and keep only a tail.

    Receivers need not parse the stream: every member gets the same broadcast
    frames, so a marker's frame bytes are found in the tail of what arrived.
    """

    def __init__(self, port: int, prefix: str = "c", header_length: int = 10) -> None:
        self.port = port
        self.prefix = prefix
        self.hl = header_length
        self.sel = selectors.DefaultSelector()
        self.members: list[Member] = []
        self._marker = b""

    def join(self, n: int, *, batch: int = 500, timeout: float = 120.0) -> float:
        """Connect and name ``n`` more members, ``batch`` at a time; return the seconds taken."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        start = len(self.members)
        while len(self.members) < start + n:
            now = len(self.members)
            fresh = []
            for i in range(now, min(now + batch, start + n)):
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                sock.setblocking(False)
                fresh.append(Member(sock, f"{self.prefix}{i}"))
            # Names go out together, as when a crowd arrives at once.
            for m in fresh:
                m.sock.send(frame(m.name, self.hl))  # a few bytes into an empty buffer
                self.members.append(m)
                self.sel.register(m.sock, selectors.EVENT_READ, m)
            self.pump(lambda: all(m.welcomed for m in self.members), deadline)
        return time.monotonic() - t0

    def expect_all(self, marker: bytes, timeout: float = 60.0) -> float:
        """Wait until every member received ``marker``; return the seconds taken.

        Call it after the marker was sent: what arrived before the call was read
        only while joining, before the marker existed.
        """
        t0 = time.monotonic()
        self._marker = marker
        for m in self.members:
            m.seen = False
            m.tail = b""
        self.pump(lambda: all(m.seen for m in self.members), t0 + timeout)
        return time.monotonic() - t0

    def pump(self, done: Callable[[], bool], deadline: float) -> None:
        """Read whatever arrives until ``done()`` or the deadline."""
        checked = 0.0
        while True:
            now = time.monotonic()
            if now - checked > 0.05:
                checked = now
                if done():
                    return
            if now > deadline:
                late = [
                    m.name for m in self.members if not m.welcomed or (self._marker and not m.seen)
                ]
                late = late[:5]
                raise AssertionError(f"crowd: timed out; e.g. still waiting for: {late}")
            for key, _ in self.sel.select(0.05):
                self._read(key.data)

    def _read(self, m: Member) -> None:
        try:
            data = m.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(m.sock)
            m.closed = True
            raise AssertionError(f"crowd: the daemon closed {m.name}; unread {m.buf[:200]!r}")
        if not m.welcomed:
            m.buf += data
            hl = self.hl
            if len(m.buf) < hl:
                return
            n = int(m.buf[:hl])
            end = hl + n + hl
            if len(m.buf) < end:
                return
            end += int(m.buf[hl + n : end])
            if len(m.buf) < end:
                return
            assert m.buf[hl : hl + n] == b"chatd", m.buf[:100]
            assert m.buf[hl + n + hl : end].startswith(f"welcome, {m.name}".encode())
            m.welcomed = True
            data, m.buf = m.buf[end:], b""
        marker = self._marker
        if marker and not m.seen:
            window = m.tail + data
            if marker in window:
                m.seen = True
                m.tail = b""
            else:
                m.tail = window[1 - len(marker) :]

    def close(self) -> None:
        for m in self.members:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(m.sock)
            m.sock.close()
        self.members = []
        self.sel.close()
