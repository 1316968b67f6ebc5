"""The room on its own: membership, names and batched fan-out."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd.core.names import name_problem
from chatd.core.room import Room
from chatd.wire.chat import NOTICE_SENDER, text_problem
from chatd.wire.framing import FrameDecoder


class Member:
    def __init__(self, name: str) -> None:
        self.name = name
        self.chunks: list[bytes] = []

    def deliver(self, data: bytes) -> None:
        self.chunks.append(data)

    def pairs(self) -> list[tuple[str, str]]:
        d = FrameDecoder(1 << 20)
        d.feed(b"".join(self.chunks))
        frames = d.frames()
        return list(zip(frames[::2], frames[1::2], strict=True))


def test_post_reaches_everyone_but_the_sender_in_one_piece_each() -> None:
    room = Room()
    a, b, c = Member("a"), Member("b"), Member("c")
    for m in (a, b, c):
        room.join(m)
    room.post(a, "one")
    room.post(b, "two")
    room.post(a, "three")
    room.flush()
    assert a.pairs() == [("b", "two")]
    assert b.pairs() == [("a", "one"), ("a", "three")]
    assert c.pairs() == [("a", "one"), ("b", "two"), ("a", "three")]
    assert all(len(m.chunks) == 1 for m in (a, b, c))
    assert room.deliveries == 1 + 2 + 3


def test_non_senders_share_one_bytes_object() -> None:
    room = Room()
    members = [Member(f"m{i}") for i in range(5)]
    for m in members:
        room.join(m)
    room.post(members[0], "x")
    room.post(members[1], "y")
    room.flush()
    shared = {id(m.chunks[0]) for m in members[2:]}
    assert len(shared) == 1


def test_send_to_keeps_its_place_among_broadcasts() -> None:
    room = Room()
    a, b = Member("a"), Member("b")
    room.join(a)
    room.join(b)
    room.post(a, "before")
    room.send_to(b, NOTICE_SENDER, "just for b")
    room.notice("for all")
    room.flush()
    assert b.pairs() == [("a", "before"), (NOTICE_SENDER, "just for b"), (NOTICE_SENDER, "for all")]
    assert a.pairs() == [(NOTICE_SENDER, "for all")]


def test_a_newcomer_gets_nothing_posted_before_it_joined() -> None:
    room = Room()
    a, b = Member("a"), Member("b")
    room.join(a)
    room.notice("early")
    room.join(b)
    room.notice("late")
    room.flush()
    assert a.pairs() == [(NOTICE_SENDER, "early"), (NOTICE_SENDER, "late")]
    assert b.pairs() == [(NOTICE_SENDER, "late")]


def test_joins_during_a_pass_keep_one_delivery_per_member() -> None:
    # A join storm must not cost a send per member per join: joining does not
    # flush, yet each newcomer still gets only what was posted after it joined.
    room = Room()
    old = Member("old")
    room.join(old)
    newcomers = [Member(f"n{i}") for i in range(3)]
    for m in newcomers:
        room.join(m)
        room.send_to(m, NOTICE_SENDER, f"welcome, {m.name}")
        room.notice(f"{m.name} joined", exclude=m)
    assert old.chunks == [] and all(m.chunks == [] for m in newcomers)
    room.flush()
    assert len(old.chunks) == 1
    assert old.pairs() == [(NOTICE_SENDER, f"n{i} joined") for i in range(3)]
    assert newcomers[0].pairs() == [
        (NOTICE_SENDER, "welcome, n0"),
        (NOTICE_SENDER, "n1 joined"),
        (NOTICE_SENDER, "n2 joined"),
    ]
    assert newcomers[2].pairs() == [(NOTICE_SENDER, "welcome, n2")]
    assert all(len(m.chunks) == 1 for m in newcomers)
    assert room.deliveries == 3 + 3 + 2 + 1


def test_newcomers_are_served_before_the_rest_of_the_room() -> None:
    order: list[str] = []

    class Recorder(Member):
        def deliver(self, data: bytes) -> None:
            order.append(self.name)
            super().deliver(data)

    room = Room()
    old = [Recorder(f"o{i}") for i in range(3)]
    for m in old:
        room.join(m)
    room.notice("hello")
    new = [Recorder(f"n{i}") for i in range(2)]
    for m in new:
        room.join(m)
        room.send_to(m, NOTICE_SENDER, "welcome")
    room.flush()
    assert order == ["n0", "n1", "o0", "o1", "o2"]
    assert [m.pairs() for m in new] == [[(NOTICE_SENDER, "welcome")]] * 2


def test_flush_direct_sends_welcomes_and_holds_the_notices() -> None:
    room = Room()
    old = Member("old")
    room.join(old)
    newcomers = [Member(f"n{i}") for i in range(3)]
    for m in newcomers:
        room.join(m)
        room.send_to(m, NOTICE_SENDER, f"welcome, {m.name}")
        room.notice(f"{m.name} joined", exclude=m)
    assert room.notices_only
    room.flush_direct()
    assert old.chunks == []
    assert [m.pairs() for m in newcomers] == [[(NOTICE_SENDER, f"welcome, n{i}")] for i in range(3)]
    room.send_to(old, NOTICE_SENDER, "private, after the notices")
    room.flush_direct()
    assert old.chunks == []  # it must not overtake the notices queued before it
    room.flush()
    assert old.pairs() == [(NOTICE_SENDER, f"n{i} joined") for i in range(3)] + [
        (NOTICE_SENDER, "private, after the notices")
    ]
    assert len(old.chunks) == 1
    assert newcomers[0].pairs() == [
        (NOTICE_SENDER, "welcome, n0"),
        (NOTICE_SENDER, "n1 joined"),
        (NOTICE_SENDER, "n2 joined"),
    ]
    assert newcomers[2].pairs() == [(NOTICE_SENDER, "welcome, n2")]
    assert not room.pending


def test_flush_direct_sends_everything_when_nothing_is_a_broadcast() -> None:
    room = Room()
    a = Member("a")
    room.join(a)
    room.send_to(a, NOTICE_SENDER, "one")
    room.send_to(a, NOTICE_SENDER, "two")
    room.flush_direct()
    assert a.pairs() == [(NOTICE_SENDER, "one"), (NOTICE_SENDER, "two")]
    assert not room.pending


def test_a_members_message_makes_the_batch_more_than_notices() -> None:
    room = Room()
    a, b = Member("a"), Member("b")
    room.join(a)
    room.join(b)
    room.notice("n")
    assert room.notices_only
    room.post(a, "hi")
    assert not room.notices_only
    room.flush()
    assert room.notices_only and b.pairs() == [(NOTICE_SENDER, "n"), ("a", "hi")]


def test_first_names_fit_the_budget_and_follow_joins_and_leaves() -> None:
    room = Room()
    assert room.first_names(10) == ("", set(), 0, None)
    a, b, c = Member("aa"), Member("bb"), Member("cc")
    room.join(a)
    room.join(b)
    assert room.first_names(8) == ("aa, bb", {id(a), id(b)}, 2, None)
    room.join(c)  # 12 bytes with separators: over 8
    assert room.first_names(8) == ("aa, bb", {id(a), id(b)}, 2, id(c))
    room.leave(a)
    assert room.first_names(8) == ("bb, cc", {id(b), id(c)}, 2, None)
    assert room.first_names(4)[0] == "bb"


def test_a_member_who_rejoins_in_the_same_pass_starts_afresh() -> None:
    room = Room()
    a, b = Member("a"), Member("b")
    room.join(a)
    room.notice("one")
    room.join(b)
    room.notice("two")
    room.leave(b)
    room.notice("three")
    room.join(b)
    room.notice("four")
    room.flush()
    assert b.pairs() == [(NOTICE_SENDER, "four")]
    assert a.pairs() == [(NOTICE_SENDER, t) for t in ("one", "two", "three", "four")]


def test_names_are_unique_without_regard_to_case() -> None:
    room = Room()
    room.join(Member("Alice"))
    assert room.name_taken("alice") and room.name_taken("ALICE")
    with pytest.raises(ValueError, match="taken"):
        room.join(Member("aLiCe"))


def test_leave_drops_what_was_queued_for_the_leaver() -> None:
    room = Room()
    a, b = Member("a"), Member("b")
    room.join(a)
    room.join(b)
    room.post(a, "hi")
    assert room.leave(b)
    assert not room.leave(b)
    room.flush()
    assert b.chunks == []
    assert room.names() == ["a"]


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "the name is empty"),
        ("a" * 33, "the name is 33 bytes long, the limit is 32"),
        ("é" * 17, "the name is 34 bytes long, the limit is 32"),
        ("al ice", "the name contains a space"),
        ("al\tice", "the name contains"),
        ("al\u00a0ice", "the name contains a no-break space"),
        ("al\u202eice", "the name contains U+202E RIGHT-TO-LEFT OVERRIDE, an invisible character"),
        ("al\x1bice", "the name contains"),
        ("chatd", "the name 'chatd' is reserved"),
        ("ChatD", "the name 'ChatD' is reserved"),
    ],
)
def test_bad_names(name: str, problem: str) -> None:
    got = name_problem(name, 32)
    assert got is not None and got.startswith(problem), got


@pytest.mark.parametrize(
    "name", ["alice", "Zoë", "李雷", "a" * 32, "bob_2", "x-y.z", "(o_o)", "שלום", "日本語かな"]
)
def test_good_names(name: str) -> None:
    assert name_problem(name, 32) is None


BIDI_CONTROLS = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))


def test_text_problem_refuses_controls_separators_and_bidi_controls_alone() -> None:
    for code in range(0x10000):
        ch = chr(code)
        control = ch != "\t" and unicodedata.category(ch) == "Cc"
        refused = control or code in (0x2028, 0x2029) or code in BIDI_CONTROLS
        assert (text_problem(f"a{ch}b") is not None) == refused, hex(code)


def test_right_to_left_text_passes_untouched() -> None:
    assert text_problem("שלום עולם") is None
    assert text_problem("مرحبا بالعالم") is None
    assert text_problem("mixed: hello שלום 123") is None
    assert text_problem("\u200f\u200e marks alone") is None


def test_text_problem() -> None:
    assert text_problem("hello\tworld") is None
    assert text_problem("ünïcødé ✓") is None
    assert text_problem("two\nlines") is not None
    assert text_problem("\x1b[2J") is not None


def _online_line_by_walking(room: Room, me: object, max_bytes: int) -> str:
    """online_line as first written: a walk over the members (the reference)."""
    others = len(room) - (me in room)
    if not others:
        return "nobody else is online"
    shown: list[str] = []
    size = 0
    for member in room:
        if member is me:
            continue
        size += len(member.name.encode()) + 2
        if size > max_bytes:
            if not shown:
                return f"online: {others} not shown"
            return f"online: {', '.join(shown)} and {others - len(shown)} more"
        shown.append(member.name)
    return f"online: {', '.join(shown)}"


@given(
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 30)), max_size=60),
    budgets=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    who=st.integers(0, 40),
)
def test_online_line_matches_walking_the_room(
    ops: list[tuple[bool, int]], budgets: list[int], who: int
) -> None:
    room = Room()
    people = [Member(f"{'é' * (i % 3)}m{i}") for i in range(31)]
    for join, i in ops:
        if join and people[i] not in room:
            room.join(people[i])
        elif not join and len(room):
            room.leave(list(room)[i % len(room)])
        for budget in budgets:  # asked after every change, so the cache is exercised
            me = people[who] if who < len(people) else Member("outsider")
            got = room.online_line(me, budget)
            assert got == _online_line_by_walking(room, me, budget)
