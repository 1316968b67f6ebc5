"""One chat connection: its socket, decoder and counters, as the chat's `Member`.

The connection moves bytes: it reads what arrives, cuts it into frames and hands each
to the chat (`chatd.core.chat.Chat`), which decides what they mean.  Its way out is
the `Outbox` it is: a failed send or a queue over ``max_queue_bytes`` closes the
socket at once, and the server has the chat drop the member after the pass, so the
fan-out never changes the room it is walking.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any

from chatd.core.chat import HANDSHAKE, JOINED
from chatd.server.outbox import Outbox
from chatd.wire.framing import FrameDecoder, FrameTooLarge, ProtocolError
from chatd.wire.tokenbucket import TokenBucket

if TYPE_CHECKING:
    from chatd.server.server import Server


class Connection(Outbox):
    __slots__ = (
        "accepted",
        "address",
        "bucket",
        "bytes_in",
        "decoder",
        "dropped",
        "last_active",
        "messages",
        "name",
        "peer",
        "peer_host",
        "serial",
        "server",
        "since",
        "state",
        "warned_at",
    )

    def __init__(self, server: Server, sock: socket.socket, peer: Any, serial: int) -> None:
        super().__init__(server.loop, sock)
        self.server = server
        self.serial = serial  # its name in the service manager's fd store: c<serial>
        self.peer_host: str = peer[0]
        self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        self.address = self.peer_host  # what it counts against: set by the chat
        self.name = ""
        self.state = HANDSHAKE
        cfg = server.config
        self.decoder = FrameDecoder(cfg.max_name_bytes, cfg.header_length)
        self.since = time.time()
        self.last_active = self.accepted = time.monotonic()
        self.messages = 0
        self.bucket: TokenBucket | None = None  # flood control, set by the chat
        self.dropped = 0
        self.warned_at = -1
        self.bytes_in = 0

    def __repr__(self) -> str:
        return f"<Connection {self.name or '?'} {self.peer} {self.state}/{self.link}>"

    # Outbox.

    def _failed(self, error: OSError) -> None:
        self.server.failed.append((self, "closed", {"error": error.strerror}))

    def _over_limit(self) -> None:
        if self.queued > self.server.max_queue_bytes:
            queued = self.queued
            self.close_now()
            self.server.failed.append((self, "slow consumer", {"queued": queued}))

    def _closed(self) -> None:
        self.server.doomed.append(self)

    # Input.

    def readable(self) -> None:
        """Read once (one recv per ready socket per pass: nobody starves the others)."""
        server = self.server
        chat = server.chat
        buf = server.rbuf
        try:
            n = self.sock.recv_into(buf)
        except BlockingIOError:
            return
        except OSError as e:
            chat.drop(self, "closed", error=e.strerror)
            return
        if not n:
            chat.drop(self, "quit" if self.decoder.idle else "closed")
            return
        self.bytes_in += n
        self.decoder.feed(buf[:n])
        self.last_active = time.monotonic()
        self.consume()

    def consume(self) -> None:
        """Take the frames the decoder has: the name, then messages.  While the cluster
        answers a claim of the name (server.link), the rest waits in the decoder;
        the link calls this again once the name is this connection's."""
        server = self.server
        chat = server.chat
        decoder = self.decoder
        next_frame = decoder.next_frame
        link = server.link
        try:
            while self.state is HANDSHAKE:
                if link is not None and id(self) in link.claiming:
                    return
                name = next_frame()
                if name is None:
                    return
                chat.name_received(self, name)
                if self.state is JOINED:
                    decoder.max_payload = server.config.max_message_bytes
            while self.state is JOINED:
                text = next_frame()
                if text is None:
                    return
                chat.message_received(self, text)
        except ProtocolError as e:
            if self.state is HANDSHAKE:
                if isinstance(e, FrameTooLarge):
                    limit = server.config.max_name_bytes
                    chat.bad_name_frame(self, f"the name is too long (at most {limit} bytes)")
                else:
                    chat.bad_name_frame(self, str(e))
            else:
                chat.protocol_error(self, str(e))
