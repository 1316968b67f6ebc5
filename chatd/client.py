"""The `chat` command: a terminal client for chatd.

With a terminal on stdin and stdout it is interactive: prompt_toolkit keeps
the input line at the bottom and prints what arrives above it, at once, so a
message never garbles what the user is typing.  Otherwise it is a pipe: each
stdin line is sent, each incoming message is printed as one line (or one JSON
object), and at the end of stdin it half-closes the connection and waits for
the daemon to close its side, which it does only after it has taken every
message sent before.

One asyncio loop runs both halves.  `Chat` owns the connection (connect,
join, read, reconnect); the input side (the prompt, or stdin) calls
`Chat.send_line()` and, at its end, `Chat.finish()`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import random
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, Protocol

from chatd import __version__, commands, protocol
from chatd.commands import ACTION_PREFIX, PRIVATE_SUFFIX
from chatd.room import NOTICE_SENDER

DEFAULT_PORT = 1234
MESSAGE_BYTES = 4096  # the daemon's default max_message_bytes: longer lines go in pieces
MAX_INCOMING = 16 * 1024 * 1024  # largest frame accepted from the daemon
CONNECT_TIMEOUT = 10.0  # seconds to connect, and then to be welcomed
CLOSE_WAIT = 5.0  # seconds the daemon gets to confirm it took everything (pipe mode)
QUIT_WAIT = 2.0  # the same, when the user quits
REASON_WINDOW = 3.0  # a notice this recent before the end of stream gives its reason
BACKOFF_MAX = 30.0
# Pipe mode paces itself under the daemon's default flood limit (flood.rate 10 a
# second, flood.burst 50), its burst a little smaller to absorb network jitter.
DEFAULT_RATE = 10.0
BURST_SECONDS = 4.0

# Exit statuses.
OK = 0
ERROR = 1  # the daemon did not confirm it took what was sent, or stdin failed
USAGE = 2
UNKNOWN_HOST = 3
REFUSED = 4  # the connection could not be made
NAME_REJECTED = 5
KICKED = 6  # or banned while in the chat
DISCONNECTED = 7  # the daemon closed the connection and said why
LOST = 8  # the connection broke, or the daemon closed it without a word
INTERRUPTED = 130

EPILOG = """\
commands (handled by the daemon): /who, /msg NAME TEXT, /me ACTION, /help, /quit;
//TEXT sends the message /TEXT.

exit status: 0 done, 1 the daemon did not confirm it took every message,
2 usage error, 3 unknown host, 4 cannot connect, 5 name rejected,
6 kicked or banned, 7 disconnected by the server, 8 connection lost,
130 interrupted.
"""

_LEFT = re.compile(r" (left|was kicked|was banned)( \(.*\))?\Z")
# The notices the daemon closes a joined connection with (what it sends after
# is lost): such a close does not confirm a pipe's messages.
_CLOSE_NOTICES = (
    "protocol error: ",
    "disconnected",
    "the server is shutting down",
    "you were kicked",
    "you were banned",
)


# What arrives, and how it is shown.


@dataclass(frozen=True)
class Event:
    """One line for the screen.

    ``kind`` is message, private, action or notice (from the daemon), or
    command (one the user typed, shown back).  ``own`` lines are the user's.
    """

    kind: str
    name: str
    text: str
    when: datetime
    own: bool = False
    to: str = ""


def classify(sender: str, text: str, when: datetime | None = None) -> Event:
    """Read a frame pair: a private message or an action has a space in its sender."""
    when = when or datetime.now()
    if sender == NOTICE_SENDER:
        return Event("notice", sender, text, when)
    if sender.endswith(PRIVATE_SUFFIX):
        name = sender[: -len(PRIVATE_SUFFIX)]
        if name and not any(c.isspace() for c in name):
            return Event("private", name, text, when)
    if sender.startswith(ACTION_PREFIX):
        name = sender[len(ACTION_PREFIX) :]
        if name and not any(c.isspace() for c in name):
            return Event("action", name, text, when)
    return Event("message", sender, text, when)


def own_event(me: str, line: str) -> Event:
    """How a line the user sends is shown back to them."""
    now = datetime.now()
    if line.startswith("//"):
        return Event("message", me, line[1:], now, own=True)
    if line.startswith("/"):
        words = line.split(maxsplit=2)
        command = words[0].lower()
        if command == "/me" and len(words) > 1:
            return Event("action", me, line[3:].strip(), now, own=True)
        if command == "/msg" and len(words) == 3 and words[2].strip():
            return Event("private", me, words[2], now, own=True, to=words[1])
        return Event("command", me, line, now, own=True)
    return Event("message", me, line, now, own=True)


def plain(event: Event) -> str:
    """The line printed in pipe mode: "HH:MM:SS name: text"."""
    t = event.when.strftime("%H:%M:%S")
    if event.kind == "action":
        return f"{t} * {event.name} {event.text}"
    if event.kind == "private":
        if event.own:
            return f"{t} {event.name} -> {event.to} (private): {event.text}"
        return f"{t} {event.name} (private): {event.text}"
    if event.kind == "command":
        return f"{t} {event.text}"
    return f"{t} {event.name}: {event.text}"


def as_json(event: Event) -> str:
    doc: dict[str, Any] = {
        "time": event.when.astimezone().isoformat(timespec="seconds"),
        "type": event.kind,
        "from": event.name,
        "text": event.text,
    }
    return json.dumps(doc, ensure_ascii=False)


def styled(event: Event) -> list[tuple[str, str]]:
    """Fragments for prompt_toolkit: the text carries the distinction, color adds to it."""
    t = ("class:time", event.when.strftime("%H:%M:%S") + " ")
    me = " class:own" if event.own else ""
    if event.kind == "notice":
        return [t, ("class:notice", f"-- {event.text}")]
    if event.kind == "action":
        return [t, ("class:action" + me, f"* {event.name} {event.text}")]
    if event.kind == "private":
        who = f"{event.name} -> {event.to}" if event.own else event.name
        return [
            t,
            ("class:private class:name" + me, f"{who} (private):"),
            ("class:private" + me, f" {event.text}"),
        ]
    if event.kind == "command":
        return [t, ("class:command", event.text)]
    return [t, ("class:name" + me, f"{event.name}:"), ("class:text" + me, f" {event.text}")]


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


def is_quit(line: str) -> bool:
    """A line the daemon takes as /quit (words after it included): the client leaves."""
    text = line.strip()
    return text.startswith("/") and isinstance(commands.parse(text), commands.Quit)


def is_room_event(text: str) -> bool:
    """A notice about the room, never the reason for a disconnect."""
    return text.startswith("welcome, ") or text.endswith(" joined") or bool(_LEFT.search(text))


# The connection.


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


class Chat:
    def __init__(
        self,
        host: str,
        port: int,
        name: str,
        ui: UI,
        *,
        header_length: int = protocol.DEFAULT_HEADER_LENGTH,
        reconnect: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.name = name
        self.ui = ui
        self.hl = header_length
        self.reconnect = reconnect
        self.where = f"{host} port {port}"
        self.limit = min(MESSAGE_BYTES, protocol.max_length(header_length))
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
            writer.write(protocol.encode(self.name, self.hl))
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
                f"unknown host {self.host!r}: {(e.strerror or str(e)).lower()}",
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
        decoder = protocol.FrameDecoder(MAX_INCOMING, self.hl)
        sender: str | None = None
        last_notice = ("", 0.0)
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            wait = None if self.joined.is_set() else max(0.0, deadline - time.monotonic())
            try:
                # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a
                # cancellation (Ctrl-C) that comes as the data does.
                async with asyncio.timeout(wait):
                    data = await reader.read(65536)
            except TimeoutError:
                raise Ended(
                    LOST, f"{self.where} did not answer within {CONNECT_TIMEOUT:g} s", retry=True
                ) from None
            except OSError as e:
                why = (e.strerror or str(e)).lower()
                raise Ended(LOST, f"connection to {self.where} lost: {why}", retry=True) from None
            if not data:
                raise self._ended(*last_notice)
            decoder.feed(data)
            try:
                while (frame := decoder.next_frame()) is not None:
                    if sender is None:
                        sender = frame
                        continue
                    event = classify(sender, frame)
                    sender = None
                    if event.kind == "notice":
                        last_notice = (event.text, time.monotonic())
                        if not self.joined.is_set() and event.text.startswith("welcome, "):
                            self._welcomed()
                    self.ui.show(event)
            except protocol.ProtocolError as e:
                raise Ended(LOST, f"protocol error from {self.where}: {e}", retry=True) from None

    def _welcomed(self) -> None:
        if self.was_joined:
            self.ui.status(f"reconnected to {self.where}")
        self.was_joined = True
        self.attempt = 0
        self.joined.set()
        self.ui.state_changed()

    def _ended(self, notice: str, when: float) -> Ended:
        """Why the daemon closed the connection, from the notice it sent last."""
        recent = time.monotonic() - when < REASON_WINDOW
        reason = notice if notice and recent and not is_room_event(notice) else ""
        if self.closing and not (self.confirming and reason.startswith(_CLOSE_NOTICES)):
            return Ended(OK)
        if not self.joined.is_set():
            if reason.startswith("name rejected"):
                # A name still held by our own lost connection frees up shortly.
                return Ended(NAME_REJECTED, reason, retry=self.was_joined and "taken" in reason)
            if reason:
                # A full server frees up; a ban is for an admin to lift.
                retry = "banned" not in reason
                return Ended(DISCONNECTED, f"refused by the server: {reason}", retry=retry)
            return Ended(LOST, f"{self.where} closed the connection before welcoming", retry=True)
        if reason.startswith(("you were kicked", "you were banned")):
            return Ended(KICKED, reason)
        if reason:
            return Ended(DISCONNECTED, f"disconnected by the server: {reason}", retry=True)
        return Ended(LOST, f"connection to {self.where} lost", retry=True)

    def send_line(self, line: str) -> bool:
        """Send one line (in pieces if it is long); False when not connected."""
        writer = self.writer
        if writer is None or not self.joined.is_set() or writer.is_closing():
            return False
        for piece in split_line(line, self.limit):
            writer.write(protocol.encode(piece, self.hl))
        return True

    def send(self, message: str) -> bool:
        """Send one message as it is; False when not connected."""
        writer = self.writer
        if writer is None or not self.joined.is_set() or writer.is_closing():
            return False
        writer.write(protocol.encode(message, self.hl))
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


# Pipe mode.


class PipeUI:
    def __init__(self, json_lines: bool) -> None:
        self.format: Callable[[Event], str] = as_json if json_lines else plain
        self.out = sys.stdout

    def show(self, event: Event) -> None:
        try:
            self.out.write(self.format(event) + "\n")
            self.out.flush()
        except BrokenPipeError:
            # Nobody reads any more: keep sending, stop printing.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.out.fileno())
            os.close(devnull)

    def status(self, text: str) -> None:
        print(f"chat: {text}", file=sys.stderr, flush=True)

    def state_changed(self) -> None:
        pass


class Lines:
    """Lines from a file descriptor, read without blocking the loop when it can be polled."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.eof = False
        self.number = 0
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(fd, lambda: None)
        except (OSError, ValueError):
            self.pollable = False  # a regular file or /dev/null: reading never blocks
        else:
            loop.remove_reader(fd)
            self.pollable = True

    async def _wait_readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self.fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(self.fd)

    async def next(self) -> bytes | None:
        """The next line without its end of line, or None at the end."""
        while b"\n" not in self.buf and not self.eof:
            if self.pollable:
                await self._wait_readable()
            else:
                await asyncio.sleep(0)
            data = os.read(self.fd, 65536)
            self.buf += data
            self.eof = not data
        if not self.buf:
            return None
        line, _, self.buf = self.buf.partition(b"\n")
        self.number += 1
        return line.removesuffix(b"\r")


class Pace:
    """A token bucket: at most ``rate`` messages a second after a burst of ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.last = time.monotonic()

    async def take(self) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            await asyncio.sleep((1 - self.tokens) / self.rate)
            self.tokens = 1.0
            self.last = time.monotonic()
        self.tokens -= 1


async def feed_stdin(chat: Chat, ui: PipeUI, pace: Pace) -> None:
    """Send every stdin line, once joined; wait for a reconnect when disconnected."""
    lines = Lines(sys.stdin.fileno())
    await chat.joined.wait()
    while (raw := await lines.next()) is not None:
        try:
            line = raw.decode()
        except UnicodeDecodeError:
            ui.status(f"line {lines.number} is not valid UTF-8; not sent")
            continue
        if not line:
            continue
        if is_quit(line):
            return
        for message in split_line(line, chat.limit):
            await pace.take()
            while not chat.send(message):
                await chat.joined.wait()
        await chat.drain()


async def pipe_mode(chat: Chat, ui: PipeUI, rate: float) -> Ended:
    runner = asyncio.create_task(chat.run())
    feeder = asyncio.create_task(feed_stdin(chat, ui, Pace(rate, int(rate * BURST_SECONDS))))
    await asyncio.wait({runner, feeder}, return_when=asyncio.FIRST_COMPLETED)
    if runner.done():
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await feeder
        return runner.result()
    try:
        feeder.result()
    except OSError as e:
        ui.status(f"cannot read stdin: {(e.strerror or str(e)).lower()}")
        await chat.finish(runner, CLOSE_WAIT, confirm=False)
        return Ended(ERROR)
    return await chat.finish(runner, CLOSE_WAIT, confirm=True)


# Interactive mode.


STYLE_RULES = {
    "time": "#888888",
    "name": "bold",
    "own": "ansiblue",
    "private": "ansimagenta",
    "action": "ansiyellow italic",
    "notice": "ansicyan",
    "command": "#888888 italic",
    "status": "ansired bold",
    "prompt": "bold",
    "prompt.offline": "ansired",
}


def no_color() -> bool:
    """NO_COLOR (https://no-color.org) or a terminal without color."""
    return bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM", "") in ("", "dumb")


class TerminalUI:
    def __init__(self) -> None:
        from prompt_toolkit.output import ColorDepth
        from prompt_toolkit.styles import Style

        self.style = Style.from_dict(STYLE_RULES)
        self.color_depth = ColorDepth.DEPTH_1_BIT if no_color() else None
        self.dumb = os.environ.get("TERM", "") in ("", "dumb")
        self.prompt: Callable[[], str] = lambda: ""  # the prompt as plain text

    def _print(self, fragments: list[tuple[str, str]]) -> None:
        from prompt_toolkit import print_formatted_text
        from prompt_toolkit.application import get_app_or_none
        from prompt_toolkit.formatted_text import FormattedText
        from prompt_toolkit.renderer import print_formatted_text as render

        app = get_app_or_none()
        if self.dumb and app is not None and app.is_running and not app.is_done:
            # A dumb terminal cannot move the cursor: the line goes below what is
            # being typed, and the prompt and the typed text are written again.
            text = "".join(t for _, t in fragments)
            typed = app.current_buffer.text
            out = sys.__stdout__
            if out is not None:
                out.write(f"\n{text}\n{self.prompt()}{typed}")
                out.flush()
            return
        if app is None or not app.is_running or app.is_done or self.dumb:
            print_formatted_text(
                FormattedText(fragments),
                style=self.style,
                color_depth=self.color_depth,
                include_default_pygments_style=False,
            )
            return
        # Above a running prompt.  Not print_formatted_text, which goes through
        # run_in_terminal: that switches the terminal to cooked mode for the
        # print, and a key pressed just then (Ctrl-D, Ctrl-C) is lost.
        app.renderer.erase()
        render(app.output, [*fragments, ("", "\n")], self.style, color_depth=app.color_depth)
        app.output.flush()
        app.invalidate()

    def show(self, event: Event) -> None:
        self._print(styled(event))

    def status(self, text: str) -> None:
        now = datetime.now().strftime("%H:%M:%S")
        self._print([("class:time", now + " "), ("class:status", f"!! {text}")])

    def state_changed(self) -> None:
        from prompt_toolkit.application import get_app_or_none

        app = get_app_or_none()
        if app is not None:
            app.invalidate()


class Interrupted(Exception):
    """Ctrl-C at the prompt."""


async def interactive_mode(chat: Chat, ui: TerminalUI) -> Ended:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.application import get_app
    from prompt_toolkit.buffer import Buffer
    from prompt_toolkit.formatted_text import StyleAndTextTuples
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
    from prompt_toolkit.patch_stdout import patch_stdout

    def prompt() -> StyleAndTextTuples:
        if chat.connected:
            return [("class:prompt", f"{chat.name}> ")]
        state = "(offline) " if chat.was_joined else "(connecting) "
        return [("class:prompt.offline", state), ("class:prompt", f"{chat.name}> ")]

    ui.prompt = lambda: "".join(text for _, text, *_ in prompt())
    keys = KeyBindings()

    @keys.add("c-c")
    @keys.add("<sigint>")
    def _interrupt(event: KeyPressEvent) -> None:
        # Not KeyboardInterrupt: raised in a task, that one escapes asyncio.run.
        event.app.exit(exception=Interrupted())

    session: PromptSession[str] = PromptSession(
        prompt,
        key_bindings=keys,
        history=InMemoryHistory(),
        erase_when_done=True,
        style=ui.style,
        color_depth=ui.color_depth,
        include_default_pygments_style=False,
    )

    def accept(buffer: Buffer) -> bool:
        # One prompt for the whole session: the line is sent from here and the
        # prompt stays up (the terminal never leaves raw mode between lines, so
        # no key typed right after Enter is lost).
        text = buffer.text
        if is_quit(text):
            get_app().exit(result="/quit")  # not session.app: a dumb terminal runs another
            return True
        buffer.append_to_history()
        buffer.reset()  # before the line is shown back: a dumb terminal writes the rest
        for line in text.splitlines():
            if not line.strip():
                continue
            if is_quit(line):  # in a pasted block: what came before it is sent
                get_app().exit(result="/quit")
                return False
            if chat.send_line(line):
                ui.show(own_event(chat.name, line))
            else:
                ui.status("not connected; message not sent")
        return False

    session.default_buffer.accept_handler = accept
    runner = asyncio.create_task(chat.run())
    status = OK
    with patch_stdout(raw=True):
        asking = asyncio.ensure_future(session.prompt_async())
        await asyncio.wait({asking, runner}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            if session.default_buffer.text:
                session.app.erase_when_done = False  # what was typed stays, to copy
            asking.cancel()
            with contextlib.suppress(asyncio.CancelledError, EOFError, Interrupted):
                await asking
            return runner.result()
        try:
            asking.result()
        except EOFError:
            pass
        except Interrupted:
            status = INTERRUPTED
        end = await chat.finish(runner, QUIT_WAIT, confirm=False)
    return Ended(status) if end.status == OK else end


# The command.


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chat",
        description="Chat on a chatd server. Interactive when stdin and stdout are a terminal;\n"
        "otherwise each stdin line is sent and each incoming message printed as one line.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("host", metavar="HOST", help="the chatd server's host name or address")
    p.add_argument(
        "-u",
        "--user",
        metavar="NAME",
        help="your name in the chat (default: your login name)",
    )
    p.add_argument(
        "-p",
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help=f"the server's port (default: {DEFAULT_PORT})",
    )
    p.add_argument(
        "--header-length",
        type=header_length,
        default=protocol.DEFAULT_HEADER_LENGTH,
        metavar="N",
        help="bytes in a frame header, as the server's header_length "
        f"(default: {protocol.DEFAULT_HEADER_LENGTH})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print each incoming message as one JSON object per line "
        "(time, type, from, text); implies line mode even on a terminal",
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="when the connection fails or drops, retry with backoff (1 s doubling to 30 s)",
    )
    p.add_argument(
        "--rate",
        type=rate,
        default=DEFAULT_RATE,
        metavar="N",
        help="in line mode, send at most N messages a second after a first "
        f"{BURST_SECONDS:g} seconds' worth, to stay under the server's flood limit "
        f"(default: {DEFAULT_RATE:g}, as the server's default; 0: no limit)",
    )
    p.add_argument("--version", action="version", version=f"chat {__version__}")
    return p


def port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return int(text)


def rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1e6:
        raise argparse.ArgumentTypeError(f"expected a number of messages a second, got {text!r}")
    return value


def header_length(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 20:
        raise argparse.ArgumentTypeError(f"expected an integer 1-20, got {text!r}")
    return int(text)


def default_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


async def _main(args: argparse.Namespace, interactive: bool) -> Ended:
    ui: TerminalUI | PipeUI = TerminalUI() if interactive else PipeUI(args.json)
    chat = Chat(
        args.host,
        args.port,
        args.user,
        ui,
        header_length=args.header_length,
        reconnect=args.reconnect,
    )
    if isinstance(ui, TerminalUI):
        return await interactive_mode(chat, ui)
    return await pipe_mode(chat, ui, args.rate)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.user is None:
        args.user = default_name()
        if not args.user:
            p.error("no login name to use: give one with -u NAME")
    if len(args.user.encode()) > protocol.max_length(args.header_length):
        p.error(f"the name does not fit a {args.header_length}-byte header")
    interactive = not args.json and sys.stdin.isatty() and sys.stdout.isatty()
    try:
        end = asyncio.run(_main(args, interactive))
    except KeyboardInterrupt:
        return INTERRUPTED
    if end.message:
        print(f"chat: {end.message}", file=sys.stderr)
    return end.status
