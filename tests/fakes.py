"""Fakes for the pure layers: a Host with a clock the test moves, and members that
record what they are sent.  No sockets, no sleeps."""

from __future__ import annotations

import heapq
import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from chatd.core.admin import Admin, Later, ReloadFailed, handle
from chatd.core.bans import Bans, StateError
from chatd.core.chat import HANDSHAKE, Chat
from chatd.core.history import Row
from chatd.server import config
from chatd.wire.chat import NOTICE_SENDER
from chatd.wire.framing import FrameDecoder
from chatd.wire.tokenbucket import TokenBucket

T0 = 1000.0  # the fake monotonic clock at the start
WALL0 = 1_800_000_000.0  # and the fake wall clock

OPEN = "open"


@dataclass(eq=False)
class FakeMember:
    """A connection as the chat sees it; ``closed`` is None while it is open, else
    the last bytes it was closed with (b"" for none)."""

    peer_host: str
    accepted: float
    since: float
    port: int = 40000
    name: str = ""
    address: str = ""
    state: str = HANDSHAKE
    last_active: float = 0.0
    messages: int = 0
    bucket: TokenBucket | None = None
    dropped: int = 0
    warned_at: int = -1
    queued: int = 0
    received: bytearray = field(default_factory=bytearray)
    closed: bytes | None = None
    fail: bool = False  # deliver() raises, as a bug would

    @property
    def peer(self) -> str:
        return f"{self.peer_host}:{self.port}"

    def deliver(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("a bug in deliver()")
        if self.closed is None:
            self.received += data

    def pairs(self) -> list[tuple[str, str]]:
        """Everything received, as (sender, text) pairs (the last bytes included)."""
        d = FrameDecoder(1 << 30)
        d.feed(bytes(self.received) + (self.closed or b""))
        frames = d.frames()
        assert d.idle, "a partial frame was delivered"
        return list(zip(frames[::2], frames[1::2], strict=True))

    def notices(self) -> list[str]:
        return [text for sender, text in self.pairs() if sender == NOTICE_SENDER]

    def take(self) -> list[tuple[str, str]]:
        """What arrived since the last take()."""
        got = self.pairs()
        self.received.clear()
        return got


class FakeHost:
    """The server as the chat sees it, with clocks that move only when told."""

    def __init__(self) -> None:
        self.t = T0
        self.wall_t = WALL0
        self._timers: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = itertools.count()
        self.conns: list[FakeMember] = []
        self.saved: list[dict[str, Any]] = []
        self.save_error: str | None = None
        self.status_changes = 0
        self.ports = itertools.count(40000)

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.wall_t

    def call_at(self, when: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), fn, arg))

    def close(self, member: Any, last: bytes | None) -> None:
        member.closed = last or b""

    def members(self) -> Iterable[Any]:
        return list(self.conns)  # every connection, whatever its state, as the Host says

    def users_changed(self) -> None:
        self.status_changes += 1

    def save_bans(self, bans: Bans) -> None:
        if self.save_error:
            raise StateError(self.save_error)
        self.saved.append(bans.to_json())

    def advance(self, seconds: float) -> None:
        """Move both clocks on, running the timers that fall due on the way, in order."""
        end = self.t + seconds
        for _ in range(100_000):  # a timer that keeps re-arming itself at once is a bug
            if not (self._timers and self._timers[0][0] <= end):
                break
            when, _, fn, arg = heapq.heappop(self._timers)
            self.wall_t += max(0.0, when - self.t)
            self.t = max(self.t, when)
            fn(arg)
        else:
            raise AssertionError("a timer keeps re-arming itself at once")
        self.wall_t += end - self.t
        self.t = end

    @property
    def timers(self) -> int:
        return len(self._timers)


def settings(**values: Any) -> config.Config:
    """A checked Config with these settings (sections as dicts)."""
    return config.build(values, "<test>")


class Room:
    """A chat on a FakeHost, with helpers to connect, join and say things."""

    def __init__(self, **values: Any) -> None:
        self.host = FakeHost()
        self.chat = Chat(settings(**values), self.host)

    def connect(self, addr: str = "10.0.0.1") -> FakeMember:
        m = FakeMember(addr, self.host.t, self.host.wall_t, port=next(self.host.ports))
        m.last_active = self.host.t
        self.host.conns.append(m)
        self.chat.admit(m)
        return m

    def join(self, name: str, addr: str = "10.0.0.1") -> FakeMember:
        m = self.connect(addr)
        self.chat.name_received(m, name)
        self.flush()
        return m

    def say(self, m: FakeMember, text: str) -> None:
        m.last_active = self.host.t
        self.chat.message_received(m, text)

    def flush(self) -> None:
        room = self.chat.room
        while room.pending:
            room.flush()


ROOT = Admin(pid=1, uid=0, gid=0)


class FakeDaemon:
    """The server as the admin commands see it, on a Room.  Its history file is
    ``disk``, a list of rows; what is asked of it waits in ``asked`` until `settle()`."""

    def __init__(self, **settings: Any) -> None:
        self.room = Room(**settings)
        self.chat = self.room.chat
        self.reload_error: str | None = None
        self.disk: list[Row] = []
        self.asked: list[Callable[[], None]] = []

    def reload(self) -> tuple[list[str], list[str]]:
        if self.reload_error:
            raise ReloadFailed(self.reload_error)
        return ["flood.rate"], ["listen"]

    def counters(self) -> dict[str, int]:
        return {"connections": 7, "bytes_in": 100, "bytes_out": 200}

    def metrics_text(self) -> str:
        return "# TYPE chatd_users gauge\nchatd_users 0.0\n"

    def arm_handover(self) -> None:
        raise ReloadFailed("no file descriptor store here")

    def history_status(self) -> dict[str, Any]:
        return {"file": "", "messages": len(self.disk), "complete": True}

    def read_history(self, limit: int, since: float | None, user: str | None) -> Later:
        later = Later()

        def answer() -> None:
            rows = [
                r
                for r in self.disk
                if (since is None or r[1] >= since)
                and (user is None or r[2].casefold() == user.casefold())
            ]
            later.resolve(rows[-limit:])

        self.asked.append(answer)
        return later

    def forget_history(self, name: str, up_to: int) -> Later:
        later = Later()

        def answer() -> None:
            gone = [r for r in self.disk if r[2].casefold() == name.casefold() and r[0] <= up_to]
            self.disk = [r for r in self.disk if r not in gone]
            later.resolve(len(gone))

        self.asked.append(answer)
        return later

    def settle(self) -> None:
        """The disk answers what was asked of it."""
        asked, self.asked = self.asked, []
        for answer in asked:
            answer()

    def ask(self, cmd: str, **args: Any) -> Any:
        """The reply to a request (a dict, or a Later of one)."""
        return handle(self, ROOT, json.dumps({"cmd": cmd, "args": args}).encode())

    def result(self, cmd: str, **args: Any) -> Any:
        reply = self.ask(cmd, **args)
        assert reply["ok"] is True, reply
        return reply["result"]

    def error(self, cmd: str, **args: Any) -> tuple[str, str]:
        reply = self.ask(cmd, **args)
        assert reply["ok"] is False, reply
        return reply["code"], reply["error"]
