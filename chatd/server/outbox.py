"""The way out of a non-blocking socket, for chat and admin connections alike.

A write is tried at once and only what the kernel does not take is queued; write
interest is registered only while the queue is non-empty.  Closing is a lingering
close: the last bytes (a notice, an error reply) are sent, then FIN, then input is
read and discarded until the peer closes or LINGER seconds pass, because closing with
unread input would make the kernel send RST and could destroy those last bytes.

A connection goes OPEN -> CLOSING -> CLOSED, or OPEN -> CLOSED.  The owning class
says what "closed" means for it (`_closed`), what to do when a send fails
(`_failed`) and whether it wants to read (`_reading`).
"""

from __future__ import annotations

import socket
from collections import deque
from typing import TYPE_CHECKING

from chatd.server.loop import READ, WRITE

if TYPE_CHECKING:
    from chatd.server.loop import Loop

OPEN = "open"
CLOSING = "closing"  # sending its last bytes, then reading until the peer closes
CLOSED = "closed"

LINGER = 2.0  # seconds a closing connection gets to take its last bytes
DRAIN_SIZE = 65536


class Outbox:
    __slots__ = ("_queue", "bytes_out", "fd", "interest", "link", "loop", "queued", "sock")

    def __init__(self, loop: Loop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.link = OPEN
        self._queue: deque[bytes | memoryview] | None = None  # made when first needed
        self.queued = 0  # bytes in the queue
        self.bytes_out = 0
        self.interest = 0  # the events registered with the loop

    # What the owner decides.

    def _reading(self) -> bool:
        """Whether to ask for READ events (while OPEN; a closing connection always reads)."""
        return True

    def _failed(self, error: OSError) -> None:
        """A send failed; the connection is already CLOSED."""

    def _over_limit(self) -> None:
        """Bytes were queued; called so the owner can enforce a limit on ``queued``."""

    def _closed(self) -> None:
        """The connection became CLOSED: the owner unregisters and closes the socket."""

    # Writing.

    def deliver(self, data: bytes) -> None:
        """Send ``data`` now as far as the kernel takes it; queue the rest."""
        if self.link is OPEN:
            self._write(data)

    def _write(self, data: bytes) -> None:
        queue = self._queue
        if queue:
            queue.append(data)
            self.queued += len(data)
            self._over_limit()
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self._fail(e)
            return
        self.bytes_out += sent
        if sent < len(data):
            if queue is None:
                queue = self._queue = deque()
            rest = memoryview(data)[sent:]
            queue.append(rest)
            self.queued = len(rest)
            self.update_interest()
            self._over_limit()

    def pending_output(self) -> bytes:
        """What is queued, not yet sent (handed to the next chatd at a restart)."""
        return b"".join(self._queue) if self._queue else b""

    def flush(self) -> None:
        """Send queued bytes; called when the socket is writable."""
        queue = self._queue
        while queue:
            if len(queue) > 1:
                data: bytes | memoryview = b"".join(queue)
                queue.clear()
                queue.append(data)
            else:
                data = queue[0]
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                return
            except OSError as e:
                self._fail(e)
                return
            self.bytes_out += sent
            self.queued -= sent
            if sent < len(data):
                queue[0] = memoryview(data)[sent:]
                return
            queue.popleft()
        self.queued = 0
        self._queue = None  # an idle connection keeps no deque
        if self.link is CLOSING:
            self._half_close()
        else:
            self.update_interest()

    def _fail(self, error: OSError) -> None:
        self.close_now()
        self._failed(error)

    def update_interest(self) -> None:
        """Register the events wanted now with the loop (none: unregister)."""
        if self.link is CLOSED:
            return
        want = READ if self.link is CLOSING or self._reading() else 0
        if self.queued:
            want |= WRITE
        if want == self.interest:
            return
        if not want:
            self.loop.unregister(self.sock)
        elif not self.interest:
            self.loop.register(self.sock, want, self)
        else:
            self.loop.modify(self.sock, want, self)
        self.interest = want

    def ready(self, mask: int) -> None:
        """The loop's call: the socket is readable and/or writable."""
        if mask & READ:
            if self.link is CLOSING:
                self._drain()
            elif self.link is OPEN:
                self.readable()
        if mask & WRITE and self.link is not CLOSED:
            self.flush()

    def readable(self) -> None:
        """The socket is readable (while OPEN)."""

    # Closing.

    def close_after(self, last: bytes | None) -> None:
        """Close once ``last`` is sent (then FIN, then drain), within LINGER seconds.

        A peer that closed its side already is closed at once after the FIN: its end
        of stream is read again by the drain.
        """
        if self.link is not OPEN:
            return
        self.link = CLOSING
        if last:
            self._write(last)
            if self.link is CLOSED:  # the send failed
                return
        self.loop.call_at(self.loop.now() + LINGER, _linger_expired, self)
        if not self.queued:
            self._half_close()
        else:
            self.update_interest()

    def _half_close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close_now()
            return
        self.update_interest()

    def _drain(self) -> None:
        """Read and discard from a closing connection; close at its end of stream."""
        try:
            data = self.sock.recv(DRAIN_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close_now()

    def close_now(self) -> None:
        if self.link is CLOSED:
            return
        self.link = CLOSED
        self._queue = None
        self.queued = 0
        self._closed()


def _linger_expired(box: Outbox) -> None:
    box.close_now()
