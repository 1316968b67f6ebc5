"""One client connection: its socket, decoder and outbound queue.

The connection moves bytes and keeps counts; what the bytes mean is the
server's business.  A write is tried at once and only what the kernel does
not take is queued; write interest is registered only while the queue is
non-empty.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from chatd import log
from chatd.protocol import FrameDecoder

if TYPE_CHECKING:
    from chatd.server import Server

# States.
HANDSHAKE = "handshake"  # connected, no name yet
JOINED = "joined"  # a member of the room
CLOSING = "closing"  # sending its last notices, then closing
CLOSED = "closed"


class Connection:
    __slots__ = (
        "accepted",
        "bytes_in",
        "bytes_out",
        "decoder",
        "dropped",
        "fd",
        "last_active",
        "limited",
        "log",
        "messages",
        "name",
        "out",
        "out_bytes",
        "peer",
        "peer_host",
        "refilled",
        "server",
        "since",
        "sock",
        "state",
        "tokens",
        "warned_at",
        "writing",
    )

    def __init__(self, server: Server, sock: socket.socket, peer: Any) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.peer_host: str = peer[0]
        self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        self.name = ""
        self.state = HANDSHAKE
        cfg = server.config
        self.decoder = FrameDecoder(cfg.max_name_bytes, cfg.header_length)
        self.out: deque[bytes | memoryview] = deque()
        self.out_bytes = 0
        self.writing = False
        self.since = time.time()
        self.last_active = self.accepted = time.monotonic()
        self.messages = 0
        # Flood control (the server's business): a token bucket, full at the start.
        self.limited = False  # whether the bucket applies to this peer
        self.tokens = float(cfg.flood.burst)
        self.refilled = self.last_active  # when tokens were last added
        self.dropped = 0  # messages dropped in the current flood
        self.warned_at = -1  # self.messages when last told to slow down
        self.bytes_in = 0
        self.bytes_out = 0
        self.rebind_log()

    def rebind_log(self) -> None:
        """(Re)create the bound logger, as after a logging reconfiguration."""
        fields = {"peer": self.peer}
        if self.name:
            fields["user"] = self.name
        self.log = log.get(**fields)

    def __repr__(self) -> str:
        return f"<Connection {self.name or '?'} {self.peer} {self.state}>"

    # Output.

    def deliver(self, data: bytes) -> None:
        """Send ``data`` now as far as the kernel takes it; queue the rest."""
        if self.state is CLOSED:
            return
        if self.out:
            self.out.append(data)
            self.out_bytes += len(data)
            if self.out_bytes > self.server.max_queue_bytes:
                self.server.slow_consumer(self)
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self.server.drop(self, "closed", error=e.strerror)
            return
        self.bytes_out += sent
        if sent < len(data):
            rest = memoryview(data)[sent:]
            self.out.append(rest)
            self.out_bytes = len(rest)
            self._want_write(True)
            if self.out_bytes > self.server.max_queue_bytes:
                self.server.slow_consumer(self)

    def flush(self) -> None:
        """Send queued bytes; called when the socket is writable."""
        out = self.out
        while out:
            if len(out) > 1:
                data: bytes | memoryview = b"".join(out)
                out.clear()
                out.append(data)
            else:
                data = out[0]
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                return
            except OSError as e:
                self.server.drop(self, "closed", error=e.strerror)
                return
            self.bytes_out += sent
            self.out_bytes -= sent
            if sent < len(data):
                out[0] = memoryview(data)[sent:]
                return
            out.popleft()
        self.out_bytes = 0
        self._want_write(False)

    def _want_write(self, on: bool) -> None:
        if on != self.writing:
            self.writing = on
            self.server.update_interest(self)

    # Input.

    def read(self, buf: memoryview) -> int:
        """Read once into ``buf`` and feed the decoder.

        Returns the byte count: 0 at end of stream, -1 if nothing was ready.
        Raises OSError if the connection failed.
        """
        try:
            n = self.sock.recv_into(buf)
        except BlockingIOError:
            return -1
        if n:
            self.bytes_in += n
            self.decoder.feed(buf[:n])
        return n
