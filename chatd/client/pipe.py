"""Pipe mode: each stdin line is sent, each incoming message printed as one line (or
one JSON object).

At the end of stdin the client half-closes the connection and waits for the daemon to
close its side, which it does only after it has taken every message sent before.  The
lines are paced by the same token bucket the daemon's flood control uses, set to the
daemon's default limit, so a long input is not cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable

from chatd.client.render import Event, as_json, plain, safe
from chatd.client.session import ERROR, Ended, Session, split_line
from chatd.wire.chat import is_quit, text_problem
from chatd.wire.errors import os_reason
from chatd.wire.tokenbucket import TokenBucket

CLOSE_WAIT = 5.0  # seconds the daemon gets to confirm it took everything
# Pace under the daemon's default flood limit (flood.rate 10 a second, flood.burst
# 50), the burst a little smaller to absorb network jitter.
DEFAULT_RATE = 10.0
BURST_SECONDS = 4.0


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
        print(f"chat: {safe(text)}", file=sys.stderr, flush=True)

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
    """At most ``rate`` messages a second after a burst of ``burst`` (rate 0: no limit)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.bucket = TokenBucket(rate, burst, time.monotonic()) if rate > 0 else None

    async def take(self) -> None:
        bucket = self.bucket
        if bucket is None:
            return
        while not bucket.take(time.monotonic()):
            await asyncio.sleep(bucket.delay(time.monotonic()))


async def feed_stdin(chat: Session, ui: PipeUI, pace: Pace) -> None:
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
        problem = text_problem(line)
        if problem:
            ui.status(f"line {lines.number} not sent: messages may not contain {problem}")
            continue
        for message in split_line(line, chat.limit):
            await pace.take()
            while not chat.send(message):
                await chat.joined.wait()
        await chat.drain()


async def pipe_mode(chat: Session, ui: PipeUI, rate: float) -> Ended:
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
        ui.status(f"cannot read stdin: {os_reason(e)}")
        await chat.finish(runner, CLOSE_WAIT, confirm=False)
        return Ended(ERROR)
    return await chat.finish(runner, CLOSE_WAIT, confirm=True)
