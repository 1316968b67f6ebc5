"""A host for the core's unit tests, on top of tests/fakes.py.

`GuardedHost` is a FakeHost that also records every timer it is asked for (when,
what, for whom), hands out every connection whatever its state (as the server's
``members()`` does: a connection that is gone may linger while its last notice is
sent), and fails at once on a timer loop that never ends instead of hanging.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import structlog
from fakes import FakeHost, FakeMember, Room, settings
from structlog.testing import LogCapture

from chatd.core.chat import Chat
from chatd.wire.framing import FrameDecoder

TIMERS_MAX = 10_000  # more timers than any test needs: a loop that re-arms itself


class GuardedHost(FakeHost):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[float, Callable[[Any], None], Any]] = []

    def call_at(self, when: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        self.calls.append((when, fn, arg))
        if len(self.calls) > TIMERS_MAX:
            raise AssertionError(f"more than {TIMERS_MAX} timers: a timer loop that never ends")
        super().call_at(when, fn, arg)

    def members(self) -> Iterable[Any]:
        return list(self.conns)


class UnitRoom(Room):
    """fakes.Room on a GuardedHost."""

    host: GuardedHost

    def __init__(self, **values: Any) -> None:
        self.host = GuardedHost()
        self.chat = Chat(settings(**values), self.host)


def pairs(m: FakeMember, header_length: int) -> list[tuple[str, str]]:
    """FakeMember.pairs() for a room with another header length."""
    d = FrameDecoder(1 << 30, header_length)
    d.feed(bytes(m.received) + (m.closed or b""))
    frames = d.frames()
    assert d.idle, "a partial frame was delivered"
    return list(zip(frames[::2], frames[1::2], strict=True))


@contextlib.contextmanager
def logger_names() -> Iterator[list[tuple[Any, ...]]]:
    """The arguments each logger was made with (structlog's logger factory), while the
    events themselves are captured and dropped."""
    names: list[tuple[Any, ...]] = []

    def factory(*args: Any) -> Any:
        names.append(args)
        return structlog.ReturnLogger()

    structlog.reset_defaults()
    structlog.configure(processors=[LogCapture()], logger_factory=factory)
    try:
        yield names
    finally:
        structlog.reset_defaults()
