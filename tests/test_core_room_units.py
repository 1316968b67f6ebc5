"""The room (chatd.core.room) in detail: flush()'s fast paths and counters, a bug in one
member's deliver(), flush_direct()'s batching promise, the cached list of the first
names, and frames cut to fit short headers."""

from __future__ import annotations

import pytest

from chatd.core import room as room_module
from chatd.core.room import Room
from chatd.wire import notices
from chatd.wire.chat import NOTICE_SENDER
from chatd.wire.framing import FrameDecoder, encode


class Member:
    """Records each delivery (and, in ``order``, who was served when)."""

    def __init__(self, name: str, order: list[str] | None = None, *, fail: bool = False) -> None:
        self.name = name
        self.chunks: list[bytes] = []
        self.order = order
        self.fail = fail

    def deliver(self, data: bytes) -> None:
        if self.order is not None:
            self.order.append(self.name)
        if self.fail:
            raise RuntimeError(f"a bug in {self.name}'s deliver()")
        self.chunks.append(data)

    def pairs(self) -> list[tuple[str, str]]:
        d = FrameDecoder(1 << 20)
        d.feed(b"".join(self.chunks))
        frames = d.frames()
        assert d.idle
        return list(zip(frames[::2], frames[1::2], strict=True))


class Counted:
    """A member that counts how often its name is read."""

    def __init__(self, name: str, reads: list[int]) -> None:
        self._name = name
        self.reads = reads

    @property
    def name(self) -> str:
        self.reads[0] += 1
        return self._name

    def deliver(self, data: bytes) -> None:
        pass


def room_of(*names: str) -> tuple[Room[Member], list[Member]]:
    room: Room[Member] = Room()
    members = [Member(name) for name in names]
    for m in members:
        room.join(m)
    return room, members


def notice(text: str) -> tuple[str, str]:
    return (NOTICE_SENDER, text)


# flush(): a lone frame.


def test_a_lone_private_frame_goes_to_its_one_recipient() -> None:
    room, (a, b) = room_of("a", "b")
    room.send_to(a, NOTICE_SENDER, "just you")
    room.flush()
    assert a.chunks == [room.frame(NOTICE_SENDER, "just you")]
    assert b.chunks == []
    assert room.deliveries == 1 and not room.pending
    room.send_to(b, "x (private)", "and you")
    room.flush()
    assert b.pairs() == [("x (private)", "and you")]
    assert room.deliveries == 2


def test_a_lone_private_frame_for_a_member_who_left_is_dropped() -> None:
    room, (a, b) = room_of("a", "b")
    room.send_to(a, NOTICE_SENDER, "too late")
    room.leave(a)
    room.flush()
    assert a.chunks == [] and b.chunks == []
    assert room.deliveries == 0 and not room.pending


def test_a_bug_in_deliver_of_a_lone_private_frame_is_recorded() -> None:
    room: Room[Member] = Room()
    bad = Member("bad", fail=True)
    room.join(bad)
    room.send_to(bad, NOTICE_SENDER, "boom")
    room.flush()
    [(who, error)] = room.failures
    assert who is bad and isinstance(error, RuntimeError)
    assert bad in room  # the server drops it, not the room


def test_a_lone_broadcast_counts_a_delivery_per_recipient() -> None:
    room, (a, b, c) = room_of("a", "b", "c")
    room.post(a, "hi")
    room.flush()
    assert room.deliveries == 2
    assert a.chunks == [] and b.pairs() == c.pairs() == [("a", "hi")]
    assert b.chunks[0] is c.chunks[0]  # one bytes object for all
    room.notice("to all")
    room.flush()
    assert room.deliveries == 5
    room.leave(c)
    room.notice("c left", exclude=c)  # excluding someone who is gone excludes nobody
    room.flush()
    assert room.deliveries == 7
    assert a.pairs() == [notice("to all"), notice("c left")]


def test_a_bug_in_deliver_of_a_broadcast_costs_that_member_alone() -> None:
    room: Room[Member] = Room()
    a, bad, c = Member("a"), Member("bad", fail=True), Member("c")
    for m in (a, bad, c):
        room.join(m)
    room.notice("one")
    room.flush()
    assert [(who, type(e)) for who, e in room.failures] == [(bad, RuntimeError)]
    assert a.pairs() == c.pairs() == [notice("one")]
    room.failures.clear()
    room.notice("two")
    room.post(a, "three")
    room.flush()
    assert [(who, type(e)) for who, e in room.failures] == [(bad, RuntimeError)]
    assert c.pairs() == [notice("one"), notice("two"), ("a", "three")]


def test_a_lone_frame_posted_before_a_join_is_not_for_the_newcomer() -> None:
    room, (a,) = room_of("a")
    room.notice("early")
    b = Member("b")
    room.join(b)
    room.flush()
    assert a.pairs() == [notice("early")]
    assert b.chunks == []
    assert room.deliveries == 1


# flush(): newcomers.


def test_newcomers_who_joined_at_one_point_share_their_tail() -> None:
    room, (a,) = room_of("a")
    room.notice("x")
    b, c = Member("b"), Member("c")
    room.join(b)
    room.join(c)
    room.notice("y")
    room.notice("z")
    room.flush()
    assert a.pairs() == [notice("x"), notice("y"), notice("z")]
    assert b.pairs() == c.pairs() == [notice("y"), notice("z")]
    assert b.chunks[0] is c.chunks[0]
    assert room.deliveries == 3 + 2 + 2
    room.notice("w")
    d = Member("d")
    room.join(d)
    room.notice("v")
    room.flush()
    assert d.pairs() == [notice("v")]
    assert room.deliveries == 7 + 3 * 2 + 1


def test_a_newcomer_after_the_last_broadcast_gets_no_empty_delivery() -> None:
    room, (a,) = room_of("a")
    room.notice("x")
    b = Member("b")
    room.join(b)
    room.flush()
    assert b.chunks == []
    assert a.pairs() == [notice("x")]
    assert room.deliveries == 1


def test_one_who_joined_and_left_in_the_pass_is_no_newcomer() -> None:
    order: list[str] = []
    room: Room[Member] = Room()
    old = [Member(f"o{i}", order) for i in range(3)]
    for m in old:
        room.join(m)
    room.notice("hello")
    n0, gone = Member("n0", order), Member("gone", order)
    room.join(n0)
    room.join(gone)
    room.leave(gone)
    room.notice("bye")
    room.flush()
    assert order == ["n0", "o0", "o1", "o2"]
    assert n0.pairs() == [notice("bye")]


# flush_direct(): private frames now, in one piece each, broadcasts later.


def test_flush_direct_batches_each_members_private_frames_up_to_its_first_broadcast() -> None:
    room, (a, b) = room_of("a", "b")
    room.notice("before")
    room.flush()
    assert room.deliveries == 2
    x = Member("x")
    room.join(x)
    room.send_to(x, NOTICE_SENDER, "for x, who leaves")
    room.leave(x)
    room.send_to(a, NOTICE_SENDER, "p1")
    room.notice("not for a", exclude=a)
    room.send_to(b, NOTICE_SENDER, "q1")
    room.send_to(a, NOTICE_SENDER, "p2")
    room.notice("for all")
    room.send_to(a, NOTICE_SENDER, "p3")
    room.send_to(b, NOTICE_SENDER, "q2")
    room.flush_direct()
    assert len(a.chunks) == 2  # "before", then p1 and p2 in one delivery
    assert a.chunks[1] == room.frame(NOTICE_SENDER, "p1") + room.frame(NOTICE_SENDER, "p2")
    assert len(b.chunks) == 1  # b's first frame due is a broadcast: it all waits
    assert x.chunks == []
    assert room.deliveries == 4
    assert room.pending
    room.flush()
    assert a.pairs() == [notice(t) for t in ("before", "p1", "p2", "for all", "p3")]
    assert b.pairs() == [notice(t) for t in ("before", "not for a", "q1", "for all", "q2")]
    assert len(a.chunks) == 3 and len(b.chunks) == 2
    assert room.deliveries == 4 + 2 + 4


@pytest.mark.parametrize("first", ["notice", "post"])
def test_flush_direct_leaves_every_broadcast_queued(first: str) -> None:
    room, (a, b) = room_of("a", "b")
    for kind in (first, "post" if first == "notice" else "notice"):
        if kind == "notice":
            room.notice("n")
        else:
            room.post(a, "hi")
    room.flush_direct()
    assert a.chunks == [] and b.chunks == []
    assert room.pending and room.deliveries == 0
    room.flush()
    assert len(b.pairs()) == 2 and a.pairs() == [notice("n")]


# The first names, cached.


def test_the_first_names_are_read_once_until_they_may_change() -> None:
    reads = [0]
    room: Room[Counted] = Room()
    a, b, c = Counted("aa", reads), Counted("bb", reads), Counted("cc", reads)
    for m in (a, b, c):
        room.join(m)
    full = ("aa, bb", {id(a), id(b)}, 2, id(c))
    assert room.first_names(8) == full
    before = reads[0]
    assert room.first_names(8) == full
    assert reads[0] == before  # the cached answer
    d = Counted("dd", reads)
    room.join(d)  # the list was full: still right
    before = reads[0]
    assert room.first_names(8) == full
    assert reads[0] == before
    assert room.first_names(100) == ("aa, bb, cc, dd", {id(a), id(b), id(c), id(d)}, 4, None)
    assert reads[0] > before  # another budget: read again
    room.join(Counted("ee", reads))  # it named everyone: the newcomer may fit too
    assert room.first_names(100)[2] == 5


def test_the_online_line_leaves_the_newcomer_out_wherever_it_is() -> None:
    room, (a, b, c, d) = room_of("aa", "bb", "cccccccc", "dd")
    assert room.first_names(12) == ("aa, bb", {id(a), id(b)}, 2, id(c))
    assert room.online_line(c, 12) == "online: aa, bb, dd"  # c was the first not to fit
    assert room.online_line(a, 12) == "online: bb and 2 more"
    assert room.online_line(d, 12) == "online: aa, bb and 1 more"
    assert room.online_line(Member("out"), 12) == "online: aa, bb and 2 more"
    assert room.online_line(Member("out"), 0) == "online: 4 not shown"


def test_the_online_line_of_one_alone() -> None:
    room, (a,) = room_of("a")
    assert room.online_line(a) == "nobody else is online"
    assert room.online_line(Member("out")) == "online: a"


# Frames, cut to fit the header.


@pytest.mark.parametrize(
    ("header_length", "text", "payload"),
    [
        (2, "x" * 150, b"99" + b"x" * 99),
        (2, "é" * 60, b"98" + "é".encode() * 49),
        (3, "y" * 1000, b"999" + b"y" * 999),
        (4, "z" * 10000, b"9999" + b"z" * 9999),
        (2, "short", b"5 short"),
    ],
)
def test_a_notice_too_long_for_the_header_is_cut(
    header_length: int, text: str, payload: bytes
) -> None:
    room: Room[Member] = Room(header_length)
    sender = encode(NOTICE_SENDER, header_length)
    assert room.frame(NOTICE_SENDER, text) == sender + payload


def test_a_sender_too_long_for_the_header_is_cut() -> None:
    room: Room[Member] = Room(1)
    assert room.frame("abcdefghijk", "x") == b"9abcdefghi1x"
    assert room.frame("abcdefghijk", "") == b"9abcdefghi0"


def test_sender_frames_are_kept_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(room_module, "NAME_FRAMES_KEPT", 3)
    room: Room[Member] = Room()
    for sender in ("s0", "s1", "s2"):
        room.frame(sender, "x")
    assert len(room._name_frames) == 3
    assert room.frame("s0", "y") == encode("s0") + encode("y")  # known: kept as it is
    assert len(room._name_frames) == 3
    assert room.frame("s3", "z") == encode("s3") + encode("z")  # a fourth: start over
    assert list(room._name_frames) == ["s3"]


# Notices of several joins or leaves in a row (a join storm) reach a member as one.


def _join(room: Room[Member], m: Member) -> None:
    room.join(m)
    room.notice(notices.JOINED(name=m.name), exclude=m, run=(notices.JOINED_MANY, "", m.name))


def _leave(room: Room[Member], m: Member, reason: str) -> None:
    room.leave(m)
    run = (notices.LEFT_MANY, reason, m.name)
    room.notice(notices.LEFT(name=m.name, reason=reason), run=run)


def test_joins_in_a_row_reach_a_member_as_one_notice() -> None:
    room: Room[Member] = Room()
    old = Member("old")
    room.join(old)
    room.flush()
    newcomers = [Member(f"n{i}") for i in range(5)]
    for m in newcomers:
        _join(room, m)
    room.flush()
    assert old.pairs() == [(NOTICE_SENDER, "n0, n1 and 3 others joined")]
    # Each newcomer is told of those after it, never of itself.
    assert newcomers[0].pairs() == [(NOTICE_SENDER, "n1, n2 and 2 others joined")]
    assert newcomers[2].pairs() == [(NOTICE_SENDER, "n3 and n4 joined")]
    assert newcomers[3].pairs() == [(NOTICE_SENDER, "n4 joined")]
    assert newcomers[4].pairs() == []
    assert notices.recognize("n0, n1 and 3 others joined") is notices.JOINED_MANY
    assert notices.recognize("n3 and n4 joined") is notices.JOINED_MANY


def test_one_join_alone_is_the_notice_of_one_join_byte_for_byte() -> None:
    room: Room[Member] = Room()
    old = Member("old")
    room.join(old)
    room.flush()
    _join(room, Member("alice"))
    room.flush()
    assert old.chunks == [encode(NOTICE_SENDER) + encode("alice joined")]


def test_a_message_or_another_reason_ends_a_row_of_notices() -> None:
    room: Room[Member] = Room()
    old, talker = Member("old"), Member("talker")
    gone = [Member(f"g{i}") for i in range(5)]
    for m in (old, talker, *gone):
        room.join(m)
    room.flush()
    _leave(room, gone[0], "quit")
    _leave(room, gone[1], "quit")
    room.post(talker, "hi")
    _leave(room, gone[2], "quit")
    _leave(room, gone[3], "quit")
    _leave(room, gone[4], "closed")
    room.flush()
    assert old.pairs() == [
        (NOTICE_SENDER, "g0 and g1 left (quit)"),
        ("talker", "hi"),
        (NOTICE_SENDER, "g2 and g3 left (quit)"),
        (NOTICE_SENDER, "g4 left (closed)"),
    ]
    # The talker does not get its own message: for it the four leaves are in a row.
    assert talker.pairs() == [
        (NOTICE_SENDER, "g0, g1 and 2 others left (quit)"),
        (NOTICE_SENDER, "g4 left (closed)"),
    ]
    assert notices.recognize("g0 and g1 left (quit)") is notices.LEFT_MANY


def test_a_private_frame_between_joins_keeps_its_place() -> None:
    room: Room[Member] = Room()
    old = Member("old")
    room.join(old)
    room.flush()
    _join(room, Member("a"))
    room.send_to(old, NOTICE_SENDER, "for you")
    _join(room, Member("b"))
    _join(room, Member("c"))
    room.flush()
    assert old.pairs() == [
        (NOTICE_SENDER, "a joined"),
        (NOTICE_SENDER, "for you"),
        (NOTICE_SENDER, "b and c joined"),
    ]
