"""Hypothesis stateful tests of the room: any sequence of joins, leaves, kicks,
messages, notices, private sends and flushes keeps the invariants.

- Names are unique without regard to case; a taken name is refused.
- Every member receives every frame posted while it was a member (and meant
  for it) exactly once, in the order posted, and nothing else: not its own
  messages, not what was posted before it joined.

A "fragile" member dies when something is delivered to it, the way a
connection with a reset peer does, and a "buggy" one raises from deliver():
neither may change the room during the flush.  After it, as the server does,
each leaves and a leave notice is posted.  `make fuzz` runs more examples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from chatd.core.room import Room
from chatd.wire.chat import NOTICE_SENDER
from chatd.wire.framing import FrameDecoder

NAMES = ["alice", "Alice", "ALICE", "bob", "Bob", "carol", "dave", "eve", "ÉVE", "éve"]
EXAMPLES = int(os.environ.get("CHATD_FUZZ_EXAMPLES", "0")) or 60


@dataclass(eq=False)
class Member:
    name: str
    room: Room
    deaths: list[Member]  # fragile members in the order they died
    kind: str = "sound"  # or fragile, buggy
    received: bytearray = field(default_factory=bytearray)
    dead: bool = False

    def deliver(self, data: bytes) -> None:
        if self.dead:  # its connection is closed: what comes is dropped
            return
        if self.kind == "buggy":
            self.dead = True
            raise RuntimeError(f"a bug in {self.name}'s deliver()")
        self.received += data
        if self.kind == "fragile":
            # As a connection does on a send error: it closes, and the server
            # drops it once the fan-out is over.
            self.dead = True
            self.deaths.append(self)

    def pairs(self) -> list[tuple[str, str]]:
        d = FrameDecoder(1 << 30)
        d.feed(self.received)
        frames = d.frames()
        assert d.idle, "a partial frame was delivered"
        return list(zip(frames[::2], frames[1::2], strict=True))


@dataclass
class Posted:
    pair: tuple[str, str]
    exclude: Member | None
    only: Member | None

    def meant_for(self, m: Member) -> bool:
        return self.only is m if self.only is not None else self.exclude is not m


class RoomMachine(RuleBasedStateMachine):
    members = Bundle("members")

    def __init__(self) -> None:
        super().__init__()
        self.room = Room()
        self.log: list[Posted] = []  # everything posted, in order
        self.joined_at: dict[int, int] = {}  # id(member) -> len(log) when it joined
        self.present: list[Member] = []  # the model's membership, in join order
        self.deaths: list[Member] = []
        self.n = 0

    def _text(self, text: str) -> str:
        self.n += 1
        return f"{self.n}:{text}"

    def _post(self, pair: tuple[str, str], exclude: Member | None, only: Member | None) -> None:
        self.log.append(Posted(pair, exclude, only))

    def _sync_deaths(self) -> None:
        """After a flush, as the server does: the members that died in it leave."""
        for failed, error in self.room.failures:
            assert isinstance(error, RuntimeError)
            self.deaths.append(failed)  # type: ignore[arg-type]
        self.room.failures.clear()
        for m in self.deaths:
            assert m in self.room, "the room changed during the flush"
            self.room.leave(m)
            self.present.remove(m)
            text = f"{m.name} left (closed)"
            self.room.notice(text)
            self._post((NOTICE_SENDER, text), None, None)
        self.deaths.clear()

    @rule(
        target=members,
        name=st.sampled_from(NAMES),
        kind=st.sampled_from(["sound", "sound", "sound", "fragile", "buggy"]),
    )
    def join(self, name: str, kind: str) -> Member | None:
        m = Member(name, self.room, self.deaths, kind=kind)
        taken = any(p.name.casefold() == name.casefold() for p in self.present)
        try:
            self.room.join(m)
        except ValueError:
            assert taken, f"{name!r} refused though free"
            self._sync_deaths()
            return None
        assert not taken, f"{name!r} accepted though taken"
        # The join flushed what was pending (some fragile members may have died
        # there, their notices posted before this member came in).
        self._sync_deaths()
        self.joined_at[id(m)] = len(self.log)
        self.present.append(m)
        return m

    @rule(m=consumes(members))
    def leave(self, m: Member | None) -> None:
        if m is None:
            return
        was_here = m in self.present
        assert self.room.leave(m) == was_here
        if was_here:
            self.present.remove(m)

    @rule(m=consumes(members), reason=st.sampled_from(["kicked", "quit", "slow consumer"]))
    def kick(self, m: Member | None, reason: str) -> None:
        # The server's drop(): leave, then tell the others.
        if m is None or m not in self.present:
            return
        assert self.room.leave(m)
        self.present.remove(m)
        text = f"{m.name} left ({reason})"
        self.room.notice(text)
        self._post((NOTICE_SENDER, text), None, None)

    @rule(m=members, text=st.text(max_size=12))
    def post(self, m: Member | None, text: str) -> None:
        if m is None or m not in self.present:
            return
        text = self._text(text)
        self.room.post(m, text)
        self._post((m.name, text), m, None)

    @rule(m=members, text=st.text(max_size=12), as_name=st.sampled_from(["* {}", "{} (private)"]))
    def post_as(self, m: Member | None, text: str, as_name: str) -> None:
        if m is None or m not in self.present:
            return
        text = self._text(text)
        name = as_name.format(m.name)
        self.room.post(m, text, as_name=name)
        self._post((name, text), m, None)

    @rule(text=st.text(max_size=12), exclude=st.one_of(st.none(), members))
    def notice(self, text: str, exclude: Member | None) -> None:
        text = self._text(text)
        self.room.notice(text, exclude=exclude)
        self._post((NOTICE_SENDER, text), exclude, None)

    @rule(m=members, sender=st.sampled_from([NOTICE_SENDER, "x (private)"]), text=st.text())
    def send_to(self, m: Member | None, sender: str, text: str) -> None:
        if m is None or m not in self.present:
            return
        text = self._text(text)
        self.room.send_to(m, sender, text)
        self._post((sender, text), None, m)

    @rule()
    def flush(self) -> None:
        self.room.flush()
        self._sync_deaths()

    @rule()
    def flush_direct(self) -> None:
        # Private frames may go ahead of queued broadcasts, never out of order.
        self.room.flush_direct()
        self._sync_deaths()
        for m in self.present:
            since = self.joined_at[id(m)]
            want = [p.pair for p in self.log[since:] if p.meant_for(m)]
            got = m.pairs()
            assert got == want[: len(got)], m.name

    @precondition(lambda self: not self.room.pending)
    @invariant()
    def everyone_got_exactly_their_share(self) -> None:
        for m in self.present:
            since = self.joined_at[id(m)]
            want = [p.pair for p in self.log[since:] if p.meant_for(m)]
            assert m.pairs() == want, m.name

    @invariant()
    def membership_matches_and_names_are_unique(self) -> None:
        names = self.room.names()
        assert len({n.casefold() for n in names}) == len(names)
        assert names == [m.name for m in self.present]
        assert len(self.room) == len(self.present)

    def teardown(self) -> None:
        # Whatever is pending reaches everyone still here.
        while self.room.pending:
            self.room.flush()
            self._sync_deaths()
        self.everyone_got_exactly_their_share()


RoomMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=40, deadline=None
)
test_room_machine = RoomMachine.TestCase
