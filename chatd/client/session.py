"""One chat session: connect, join, read, and reconnect when asked to.

`Session` owns the connection; the input side (the prompt, or stdin) calls
`Session.send_line()` and, at its end, `Session.finish()`.  How a connection ended,
and so the exit status and whether to retry, is decided from the kind of the last
notice the daemon sent (chatd.wire.notices), never from its words.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from dataclasses import dataclass
from typing import NoReturn, Protocol

from chatd.client.render import Event, classify
from chatd.wire import framing, notices
from chatd.wire.chat import NOTICE_SENDER
from chatd.wire.errors import os_reason

MESSAGE_BYTES = 4096  # the daemon's default max_message_bytes: longer lines go in pieces
MAX_INCOMING = 16 * 1024 * 1024  # largest frame accepted from the daemon
CONNECT_TIMEOUT = 10.0  # seconds to connect, and then to be welcomed
REASON_WINDOW = 3.0  # a notice this recent before the end of stream gives its reason
HEAD_BYTES = 64  # the first bytes received, kept to recognize another header length
BACKOFF_MAX = 30.0

# Exit statuses.
OK = 0
ERROR = 1  # the daemon did not confirm it took what was sent, or stdin failed
USAGE = 2
UNKNOWN_HOST = 3
REFUSED = 4  # the connection could not be made
NAME_REJECTED = 5
KICKED = 6  # or banned: the name, the address, or while in the chat
BANNED = KICKED
DISCONNECTED = 7  # the daemon closed the connection and said why
LOST = 8  # the connection broke, or the daemon closed it without a word
INTERRUPTED = 130


@dataclass(frozen=True)
class Outcome:
    """What a connection's last notice means for the client."""

    status: int
    retry: bool  # worth a reconnect (--reconnect)
    prefix: str = ""  # before the notice in the client's last line, when it needs one


# Every notice that ends a connection (``ends``), by kind: what it means here.  The
# notice is said once, as the client's last line.  A name still held by our own lost
# connection frees up shortly, hence name_taken's retry (only when the client was in
# the chat before).
OUTCOMES: dict[str, Outcome] = {
    notices.NAME_INVALID.kind: Outcome(NAME_REJECTED, retry=False),
    notices.NAME_TAKEN.kind: Outcome(NAME_REJECTED, retry=True),
    notices.NAME_LOOKALIKE.kind: Outcome(NAME_REJECTED, retry=False),
    notices.NAME_BANNED.kind: Outcome(BANNED, retry=False),
    notices.ADDRESS_BANNED.kind: Outcome(BANNED, retry=False),
    notices.SERVER_FULL.kind: Outcome(DISCONNECTED, retry=True),
    notices.SERVER_BUSY.kind: Outcome(DISCONNECTED, retry=True),
    notices.TOO_MANY_FROM_ADDRESS.kind: Outcome(DISCONNECTED, retry=True),
    notices.HANDSHAKE_TIMEOUT.kind: Outcome(DISCONNECTED, retry=True),
    notices.PROTOCOL_ERROR.kind: Outcome(
        DISCONNECTED, retry=True, prefix="disconnected by the server: "
    ),
    notices.FLOODING.kind: Outcome(DISCONNECTED, retry=True),
    notices.IDLE.kind: Outcome(DISCONNECTED, retry=True),
    notices.SHUTDOWN.kind: Outcome(DISCONNECTED, retry=True),
    notices.RESTART_LOST.kind: Outcome(DISCONNECTED, retry=True),
    notices.RESTART_FAILED.kind: Outcome(DISCONNECTED, retry=True),
    notices.KICKED.kind: Outcome(KICKED, retry=False),
    notices.BANNED.kind: Outcome(BANNED, retry=False),
    notices.NAME_TAKEN_CLUSTER.kind: Outcome(DISCONNECTED, retry=True),
}


def ending(text: str) -> notices.Notice | None:
    """The notice ``text`` is if it is one the daemon ends a connection with."""
    notice = notices.recognize(text)
    return notice if notice is not None and notice.ends else None


def split_line(line: str, limit: int) -> list[str]:
    """``line`` as messages of at most ``limit`` bytes, each meaning what its part did."""
    if len(line.encode()) <= limit:
        return [line]
    prefix = ""
    text = line
    if line.startswith("//"):
        text = line[1:]
    elif line.startswith("/"):
        words = line.split(maxsplit=2)
        command = words[0].lower()
        if command == "/me" and len(words) > 1:
            prefix, text = "/me ", line[3:].strip()
        elif command == "/msg" and len(words) == 3:
            prefix, text = f"/msg {words[1]} ", words[2]
        else:
            # No command is this long: the daemon answers its first part as it
            # would the whole (a longer frame would be a protocol error).
            data = line.encode()
            return [data[: char_end(data, limit)].decode()]
    room = limit - len(prefix.encode()) - 1  # 1: a piece may need a second slash
    if room < 4:
        return [line]
    pieces = []
    data = text.encode()
    while data:
        end = char_end(data, room)
        piece = data[:end].decode()
        data = data[end:]
        if not prefix and piece.startswith("/"):
            piece = "/" + piece
        pieces.append(prefix + piece)
    return pieces


def char_end(data: bytes, end: int) -> int:
    """Where to cut UTF-8 ``data`` at ``end`` bytes at most, never in a character."""
    end = min(end, len(data))
    while end < len(data) and data[end] & 0xC0 == 0x80:
        end -= 1
    return end


class UI(Protocol):
    def show(self, event: Event) -> None: ...

    def status(self, text: str) -> None: ...

    def state_changed(self) -> None: ...


class Ended(Exception):
    """The end of one connection: exit status, what to tell the user, whether to retry."""

    def __init__(self, status: int, message: str = "", retry: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry = retry


class Session:
    def __init__(
        self,
        host: str,
        port: int,
        name: str,
        ui: UI,
        *,
        header_length: int = framing.DEFAULT_HEADER_LENGTH,
        reconnect: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.name = name
        self.ui = ui
        self.hl = header_length
        self.reconnect = reconnect
        self.where = f"{host} port {port}"
        self.limit = min(MESSAGE_BYTES, framing.max_length(header_length))
        self.joined = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None
        self.closing = False
        self.confirming = False  # closing, and the daemon's close must confirm
        self.was_joined = False  # joined once: a reconnect is under way
        self.last_failure: Ended | None = None
        self.attempt = 0  # failed attempts since the last welcome, for the backoff

    @property
    def connected(self) -> bool:
        return self.joined.is_set()

    async def run(self) -> Ended:
        """Connect and chat until the end; with ``reconnect``, retry what can be retried."""
        while True:
            try:
                await self._session()
            except Ended as e:
                end = e
            if end.status == OK or (self.closing and not self.confirming):
                return Ended(OK)
            if self.closing:
                return end
            self.last_failure = end
            if not (self.reconnect and end.retry):
                return end
            delay = min(BACKOFF_MAX, 2.0**self.attempt) * random.uniform(0.8, 1.2)
            self.attempt += 1
            self.ui.status(f"{end.message}; reconnecting in {delay:.1f} s")
            await asyncio.sleep(delay)

    async def _session(self) -> NoReturn:
        reader, writer = await self._connect()
        self.writer = writer
        try:
            writer.write(framing.encode(self.name, self.hl))
            await self._read(reader)
        except Ended as e:
            if e.status != OK:  # known to finish() at once, while the close is awaited
                self.last_failure = e
            raise
        finally:
            self.writer = None
            was = self.joined.is_set()
            self.joined.clear()
            if was:
                self.ui.state_changed()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise Ended(
                UNKNOWN_HOST,
                f"unknown host {self.host!r}: {os_reason(e)}",
                retry=e.errno == socket.EAI_AGAIN,
            ) from None
        except UnicodeError:  # the IDNA codec refuses it: an empty or too long label
            raise Ended(
                UNKNOWN_HOST, f"unknown host {self.host!r}: not a valid host name"
            ) from None
        errors: list[str] = []
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await loop.sock_connect(sock, addr)
            except (OSError, TimeoutError) as e:
                sock.close()
                if isinstance(e, ConnectionRefusedError):
                    errors.insert(0, "connection refused")
                elif isinstance(e, OSError) and e.strerror:
                    errors.append(e.strerror.lower())
                else:
                    errors.append(f"no answer within {CONNECT_TIMEOUT:g} s")
                continue
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return await asyncio.open_connection(sock=sock)
        reason = errors[0] if errors else "no address"
        raise Ended(REFUSED, f"cannot connect to {self.where}: {reason}", retry=True)

    async def _read(self, reader: asyncio.StreamReader) -> NoReturn:
        decoder = framing.FrameDecoder(MAX_INCOMING, self.hl)
        sender: str | None = None
        last_notice = ("", 0.0)
        held: Event | None = None  # an ending notice, said once if the connection ends
        head = b""  # the first bytes, to tell a header length that is not ours
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            wait = None if self.joined.is_set() else max(0.0, deadline - time.monotonic())
            try:
                # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a
                # cancellation (Ctrl-C) that comes as the data does.
                async with asyncio.timeout(wait):
                    data = await reader.read(65536)
            except TimeoutError:
                self._other_header_length(head)
                raise Ended(
                    LOST, f"{self.where} did not answer within {CONNECT_TIMEOUT:g} s", retry=True
                ) from None
            except OSError as e:
                raise Ended(
                    LOST, f"connection to {self.where} lost: {os_reason(e)}", retry=True
                ) from None
            if not data:
                if held is not None and not self._ends_with(held.text, last_notice[1]):
                    self.ui.show(held)  # the close is not that notice's: show it after all
                raise self._ended(*last_notice)
            if len(head) < HEAD_BYTES:
                head += data[: HEAD_BYTES - len(head)]
            decoder.feed(data)
            try:
                while (frame := decoder.next_frame()) is not None:
                    if sender is None:
                        sender = frame
                        continue
                    event = classify(sender, frame)
                    sender = None
                    if held is not None:
                        self.ui.show(held)  # more came: it did not end the connection
                        held = None
                    if event.kind == "notice":
                        last_notice = (event.text, time.monotonic())
                        if not self.joined.is_set() and notices.WELCOME.match(event.text):
                            self._welcomed()
                        if ending(event.text) is not None:
                            held = event
                            continue
                    self.ui.show(event)
            except framing.ProtocolError as e:
                if not self.joined.is_set():
                    self._other_header_length(head)
                raise Ended(LOST, f"protocol error from {self.where}: {e}", retry=True) from None

    def _ends_with(self, text: str, when: float) -> bool:
        """Whether the notice ``text``, received at ``when``, explains the close."""
        return ending(text) is not None and time.monotonic() - when < REASON_WINDOW

    def _other_header_length(self, head: bytes) -> None:
        """Raise Ended if ``head`` reads as the daemon's frames with another header length."""
        for hl in range(1, 21):
            if hl == self.hl:
                continue
            decoder = framing.FrameDecoder(len(head), hl)
            decoder.feed(head)
            try:
                first = decoder.next_frame()
            except framing.ProtocolError:
                continue
            if first == NOTICE_SENDER:
                raise Ended(
                    USAGE,
                    f"{self.where} sends frames with another header length ({hl}); the "
                    f"daemon's header_length must match --header-length ({self.hl})",
                )

    def _welcomed(self) -> None:
        if self.was_joined:
            self.ui.status(f"reconnected to {self.where}")
        self.was_joined = True
        self.attempt = 0
        self.joined.set()
        self.ui.state_changed()

    def _ended(self, last: str, when: float) -> Ended:
        """Why the daemon closed the connection, from the notice it sent last."""
        notice = ending(last) if self._ends_with(last, when) else None
        if self.closing and not (self.confirming and notice is not None):
            return Ended(OK)
        if notice is None:
            if not self.joined.is_set():
                return Ended(
                    LOST, f"{self.where} closed the connection before welcoming", retry=True
                )
            return Ended(LOST, f"connection to {self.where} lost", retry=True)
        outcome = OUTCOMES[notice.kind]
        retry = outcome.retry and (notice is not notices.NAME_TAKEN or self.was_joined)
        return Ended(outcome.status, outcome.prefix + last, retry=retry)

    def send_line(self, line: str) -> bool:
        """Send one line (in pieces if it is long); False when not connected."""
        writer = self.writer
        if writer is None or not self.joined.is_set() or writer.is_closing():
            return False
        for piece in split_line(line, self.limit):
            writer.write(framing.encode(piece, self.hl))
        return True

    def send(self, message: str) -> bool:
        """Send one message as it is; False when not connected."""
        writer = self.writer
        if writer is None or not self.joined.is_set() or writer.is_closing():
            return False
        writer.write(framing.encode(message, self.hl))
        return True

    async def drain(self) -> None:
        writer = self.writer
        if writer is not None:
            with contextlib.suppress(OSError):
                await writer.drain()

    async def finish(self, runner: asyncio.Task[Ended], wait: float, *, confirm: bool) -> Ended:
        """Leave: half-close, and wait up to ``wait`` s for the daemon to close its side.

        With ``confirm``, not getting that confirmation is a failure.
        """
        self.closing = True
        self.confirming = confirm
        writer = self.writer
        if writer is None or not self.joined.is_set():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            if confirm and self.last_failure is not None:
                return self.last_failure
            return Ended(OK)
        with contextlib.suppress(OSError):
            await writer.drain()
            writer.write_eof()
        await asyncio.wait({runner}, timeout=wait)
        if runner.done():
            return runner.result()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        if not confirm:
            return Ended(OK)
        return Ended(
            ERROR, f"{self.where} did not confirm within {wait:g} s that it took every message"
        )
