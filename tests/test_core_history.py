"""The history in memory (chatd.core.history) and what the chat does with it: replay on
join, /history, retention by count and by age, forget, and the admin's history and
forget commands.  A fake clock, no sockets, no sleeps."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from fakes import WALL0, FakeDaemon, FakeMember, Room
from structlog.testing import capture_logs

from chatd.core.admin import Later
from chatd.core.history import RING, History, age_cutoff, excess
from chatd.wire import chat, control, notices
from chatd.wire.chat import NOTICE_SENDER, history_sender
from chatd.wire.framing import FrameDecoder

MEMORY = {"file": ""}  # history in memory alone: the ring is all of it
DAY = 86400.0


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    structlog.reset_defaults()
    with capture_logs() as captured:
        yield captured


def said(name: str, text: str, t: float) -> tuple[str, str]:
    """How a message said at ``t`` comes back from the history."""
    return (history_sender(name, t), text)


def replayed(*messages: tuple[str, str]) -> list[tuple[str, str]]:
    """The frames of a replay of ``messages``."""
    n = len(messages)
    begin = notices.HISTORY_BEGIN(count=n, s="" if n == 1 else "s")
    return [(NOTICE_SENDER, begin), *messages, (NOTICE_SENDER, "now")]


def newcomer(r: Room, name: str) -> list[tuple[str, str]]:
    """What ``name`` gets on joining, after the welcome."""
    m = r.join(name, addr="10.0.0.9")
    got = m.take()
    assert got[0][0] == NOTICE_SENDER and got[0][1].startswith(f"welcome, {name}")
    return got[1:]


# Replay on join.


def test_a_newcomer_gets_what_was_said_in_order_with_the_times() -> None:
    r = Room(history=MEMORY)
    alice = r.join("alice")
    t0 = r.host.wall_t
    r.say(alice, "first")
    r.host.advance(61)
    r.say(alice, "second")
    r.flush()
    assert newcomer(r, "bob") == replayed(
        said("alice", "first", t0), said("alice", "second", t0 + 61)
    )
    assert history_sender("alice", WALL0) == "alice [2027-01-15 08:00:00 UTC]"


def test_nothing_said_nothing_replayed() -> None:
    r = Room(history=MEMORY)
    r.join("alice")
    assert newcomer(r, "bob") == []


def test_only_the_last_replay_on_join_and_none_with_zero() -> None:
    r = Room(history={**MEMORY, "replay_on_join": 2})
    alice = r.join("alice")
    for i in range(5):
        r.say(alice, f"m{i}")
    t = r.host.wall_t
    assert newcomer(r, "bob") == replayed(said("alice", "m3", t), said("alice", "m4", t))
    cfg = r.chat.settings
    r.chat.reconfigure(
        dataclasses.replace(cfg, history=dataclasses.replace(cfg.history, replay_on_join=0))
    )
    assert newcomer(r, "carol") == []


def test_private_messages_actions_and_notices_are_never_replayed() -> None:
    r = Room(history=MEMORY)
    alice, bob = r.join("alice"), r.join("bob")
    bob.take()
    r.say(alice, "/msg bob a secret")
    r.say(alice, "/me waves")
    r.chat.say("an admin's notice")
    r.say(alice, "//slash is a message")
    r.say(alice, "/who")
    r.flush()
    assert bob.take()[0] == ("alice (private)", "a secret")
    t = r.host.wall_t
    assert newcomer(r, "carol") == replayed(said("alice", "/slash is a message", t))
    assert [row[3] for row in r.chat.history.ring] == ["/slash is a message"]


def test_what_is_said_in_the_pass_of_a_join_comes_once() -> None:
    # Said before the join, in the same pass: replayed, not also delivered live.
    r = Room(history=MEMORY)
    alice = r.join("alice")
    r.say(alice, "before")
    bob = r.connect("10.0.0.9")
    r.chat.name_received(bob, "bob")
    r.say(alice, "after")
    r.flush()
    t = r.host.wall_t
    got = bob.take()[1:]
    assert got == [*replayed(said("alice", "before", t)), ("alice", "after")]


def test_the_replay_is_built_once_for_a_join_storm_and_again_after_a_message() -> None:
    r = Room(history=MEMORY)
    alice = r.join("alice")
    r.say(alice, "hello")
    h = r.chat.history
    first = h.replay(20, r.host.wall_t)
    assert h.replay(20, r.host.wall_t) is first  # the same bytes, not built again
    r.say(alice, "again")
    assert h.replay(20, r.host.wall_t) is not first
    assert h.replay(20, r.host.wall_t).count(b"again") == 1


# /history.


def test_history_command_sends_the_last_n_to_the_sender_alone() -> None:
    r = Room(history=MEMORY)
    alice, bob = r.join("alice"), r.join("bob")
    for i in range(4):
        r.say(alice, f"m{i}")
    r.flush()
    bob.take(), alice.take()
    t = r.host.wall_t
    r.say(bob, "/history 2")
    r.flush()
    assert bob.take() == replayed(said("alice", "m2", t), said("alice", "m3", t))
    assert alice.take() == []
    r.say(bob, "/history")  # 20 by default: all four
    r.flush()
    assert bob.take() == replayed(*[said("alice", f"m{i}", t) for i in range(4)])
    r.say(bob, "/history 1")
    r.flush()
    assert bob.take() == [
        (NOTICE_SENDER, "1 earlier message"),
        said("alice", "m3", t),
        (
            NOTICE_SENDER,
            "now",
        ),
    ]


def test_history_command_with_nothing_said_off_or_a_bad_count() -> None:
    r = Room(history=MEMORY)
    bob = r.join("bob")
    bob.take()
    r.say(bob, "/history")
    r.flush()
    assert bob.take() == [(NOTICE_SENDER, "no earlier messages")]
    r.say(bob, "/history x")
    r.say(bob, "/history 0")
    r.flush()
    usage = "usage: /history [N], N from 1 to 100"
    assert bob.take() == [(NOTICE_SENDER, usage), (NOTICE_SENDER, usage)]
    off = Room(history={**MEMORY, "keep_messages": 0})
    carol = off.join("carol")
    off.say(carol, "not kept")
    off.say(carol, "/history")
    off.flush()
    assert carol.take()[-1] == (NOTICE_SENDER, "no history is kept on this server")
    assert len(off.chat.history.ring) == 0


def test_history_command_is_capped() -> None:
    r = Room(history={**MEMORY, "keep_messages": 500}, flood={"rate": 0})
    alice = r.join("alice")
    for i in range(150):
        r.say(alice, f"m{i}")
    r.flush()
    alice.take()
    r.say(alice, "/history 99999999999999")
    r.flush()
    got = alice.take()
    assert got[0] == (NOTICE_SENDER, "100 earlier messages") and len(got) == 102
    assert got[1][1] == "m50"


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("/history", chat.History(20)),
        ("/HISTORY 5", chat.History(5)),
        ("/history 007", chat.History(7)),
        ("/history 100", chat.History(100)),
        ("/history 101", chat.History(100)),
        ("/history " + "9" * 5000, chat.History(100)),
        ("/history -1", chat.Reply(("usage: /history [N], N from 1 to 100",))),
        ("/history 1 2", chat.Reply(("usage: /history [N], N from 1 to 100",))),
        ("/history ٣", chat.Reply(("usage: /history [N], N from 1 to 100",))),
    ],
)
def test_parse_history(text: str, command: chat.Command) -> None:
    assert chat.parse(text) == command


def test_help_says_what_history_takes() -> None:
    line = "/history [N] - the last N messages said here "
    line += f"({chat.HISTORY_DEFAULT}, at most {chat.HISTORY_MAX})"
    assert line in [h() for h in notices.HELP]


# Retention, with the clock the test moves.


def test_retention_by_count_keeps_the_newest() -> None:
    r = Room(history={**MEMORY, "keep_messages": 3})
    alice = r.join("alice")
    for i in range(5):
        r.say(alice, f"m{i}")
    t = r.host.wall_t
    assert newcomer(r, "bob") == replayed(*[said("alice", f"m{i}", t) for i in (2, 3, 4)])
    assert r.chat.history.size(t)[0] == 3
    assert excess(5, 3) == 2 and excess(3, 3) == 0 and excess(2, 3) == 0


def test_retention_by_age_drops_what_is_older_than_keep_days() -> None:
    r = Room(history={**MEMORY, "keep_days": 1})
    alice = r.join("alice")
    t0 = r.host.wall_t
    r.say(alice, "old")
    r.host.advance(0.75 * DAY)
    r.say(alice, "newer")
    assert newcomer(r, "bob") == replayed(
        said("alice", "old", t0), said("alice", "newer", t0 + 0.75 * DAY)
    )
    r.host.advance(0.5 * DAY)  # "old" is 1.25 days old, "newer" half a day
    assert newcomer(r, "carol") == replayed(said("alice", "newer", t0 + 0.75 * DAY))
    assert r.chat.history.size(r.host.wall_t) == (1, t0 + 0.75 * DAY)
    r.host.advance(DAY)
    assert newcomer(r, "dave") == []
    assert r.chat.history.size(r.host.wall_t) == (0, None)
    assert age_cutoff(10 * DAY, 2) == 8 * DAY and age_cutoff(10 * DAY, 0) is None


def test_no_age_limit_with_keep_days_zero() -> None:
    r = Room(history={**MEMORY, "keep_days": 0})
    alice = r.join("alice")
    r.say(alice, "kept")
    r.host.advance(3650 * DAY)
    assert [m[1] for m in newcomer(r, "bob")][1:2] == ["kept"]


def test_a_reload_shrinks_and_grows_the_ring() -> None:
    r = Room(history=MEMORY)
    alice = r.join("alice")
    for i in range(10):
        r.say(alice, f"m{i}")
    cfg = r.chat.settings
    smaller = dataclasses.replace(cfg, history=dataclasses.replace(cfg.history, keep_messages=4))
    r.chat.reconfigure(smaller)
    assert [row[3] for row in r.chat.history.ring] == ["m6", "m7", "m8", "m9"]
    bigger = dataclasses.replace(cfg, history=dataclasses.replace(cfg.history, keep_messages=10**6))
    r.chat.reconfigure(bigger)
    assert r.chat.history.ring.maxlen == RING
    off = dataclasses.replace(cfg, history=dataclasses.replace(cfg.history, keep_messages=0))
    r.chat.reconfigure(off)
    r.say(alice, "unkept")
    assert not r.chat.history.keeping and len(r.chat.history.ring) == 0


def test_ids_go_on_from_the_disk_and_every_row_reaches_the_sink() -> None:
    r = Room()  # with a file: what the disk held is loaded at start
    h = r.chat.history
    h.load([(41, WALL0 - 5, "old", "from the disk")], floor=30, last_id=41)
    sunk: list[tuple[int, float, str, str]] = []
    h.sink = sunk.append
    alice = r.join("alice")
    r.say(alice, "new")
    assert sunk == [(42, r.host.wall_t, "alice", "new")]
    assert newcomer(r, "bob")[1:3] == [
        said("old", "from the disk", WALL0 - 5),
        said("alice", "new", r.host.wall_t),
    ]


# Queries and merges (chatctl history).


def rows(*spec: tuple[int, float, str]) -> list[tuple[int, float, str, str]]:
    return [(i, t, name, f"text {i}") for i, t, name in spec]


def test_a_query_the_ring_answers_whole() -> None:
    h = History(Room(history=MEMORY).chat.settings.history, 10)
    for i in range(1, 6):
        h.add("alice" if i % 2 else "Bob", f"text {i}", WALL0 + i)
    found, whole = h.query(2, None, None, WALL0 + 10)
    assert [r[0] for r in found] == [4, 5] and whole
    found, whole = h.query(10, None, "BOB", WALL0 + 10)
    assert [r[0] for r in found] == [2, 4] and whole  # memory alone: all there is
    found, whole = h.query(10, WALL0 + 3, None, WALL0 + 10)
    assert [r[0] for r in found] == [3, 4, 5] and whole


def test_a_query_deeper_than_the_ring_needs_the_disk() -> None:
    h = History(Room().chat.settings.history, 10)  # with a file
    h.load(rows((10, WALL0 + 10, "a"), (11, WALL0 + 11, "b")), floor=1, last_id=11)
    found, whole = h.query(5, None, None, WALL0 + 20)
    assert len(found) == 2 and not whole
    found, whole = h.query(2, None, None, WALL0 + 20)
    assert len(found) == 2 and whole  # the last two are the ring's
    found, whole = h.query(5, WALL0 + 10.5, None, WALL0 + 20)
    assert [r[0] for r in found] == [11] and whole  # since is after the ring's oldest
    h2 = History(Room().chat.settings.history, 10)
    h2.load(rows((1, WALL0, "a")), floor=1, last_id=1)
    assert h2.query(5, None, None, WALL0)[1]  # the ring begins where the disk does
    disk = rows((8, WALL0 + 8, "a"), (9, WALL0 + 9, "a"), (10, WALL0 + 10, "a"))
    merged = History.merge(disk, found, 3)
    assert [r[0] for r in merged] == [9, 10, 11]


def test_the_admin_history_command_from_memory_and_from_the_disk() -> None:
    d = FakeDaemon(flood={"rate": 0})
    alice = d.room.join("alice")
    d.disk = rows((1, WALL0 - 100, "old"), (2, WALL0 - 50, "alice"))
    d.chat.history.load([], floor=1, last_id=2)
    d.room.say(alice, "now")
    reply = d.ask("history", limit=1)  # the ring has it
    assert reply["ok"] and reply["result"]["messages"] == [
        {"id": 3, "time": control.iso(WALL0), "name": "alice", "text": "now"}
    ]
    later = d.ask("history", limit=10, user="ALICE")  # deeper: the disk
    assert isinstance(later, Later) and later.outcome is None
    d.disk.append((3, WALL0, "alice", "now"))  # written meanwhile
    d.settle()
    assert later.outcome is not None
    ok, reply = later.outcome
    assert ok and [m["id"] for m in reply["result"]["messages"]] == [2, 3]
    assert d.error("history", limit=0) == (
        "bad_request",
        "history: limit must be 1 to 10000, got 0",
    )
    code, error = d.error("history", since="yesterday")
    assert (code, error) == (
        "bad_request",
        "history: since: expected a time such as 2026-11-25T18:31:42Z (UTC), got 'yesterday'",
    )


def test_forget_drops_a_name_from_memory_and_disk_and_is_logged(
    logs: list[dict[str, Any]],
) -> None:
    d = FakeDaemon(flood={"rate": 0})
    eve, bob = d.room.join("Eve"), d.room.join("bob")
    for text in ("spam", "more spam"):
        d.room.say(eve, text)
    d.room.say(bob, "hi")
    d.disk = [(1, WALL0, "Eve", "spam"), (2, WALL0, "Eve", "more spam"), (3, WALL0, "bob", "hi")]
    later = d.ask("forget", name="eve")
    assert [row[2] for row in d.chat.history.ring] == ["bob"]
    d.settle()
    assert later.outcome == (True, {"ok": True, "result": {"forgotten": "eve", "messages": 2}})
    (event,) = [e for e in logs if e["event"] == "forget"]
    assert (event["user"], event["messages"], event["admin_uid"]) == ("eve", 2, 0)
    assert newcomer(d.room, "carol")[1:2] == [said("bob", "hi", WALL0)]
    memory = FakeDaemon(history=MEMORY)
    x = memory.room.join("x")
    memory.room.say(x, "gone")
    assert memory.result("forget", name="X") == {"forgotten": "X", "messages": 1}
    assert memory.error("forget", name=" ") == ("bad_request", "forget: name is empty")


def test_a_later_passes_failures_on_and_settles_once() -> None:
    first = Later()
    second = first.then(lambda v: v + 1)
    seen: list[Any] = []
    second.on_done(seen.append)
    first.resolve(1)
    first.resolve(5)  # settled already
    assert seen == [(True, 2)]
    failing = Later()
    after = failing.then(lambda v: v)
    failing.fail(control.RequestError(control.FAILED, "disk"))
    assert after.outcome is not None and not after.outcome[0]
    assert str(after.outcome[1]) == "disk"
    raising = Later()
    bug = raising.then(lambda v: 1 / 0)
    raising.resolve(0)
    assert bug.outcome is not None and bug.outcome[1].code == control.INTERNAL


# The replayed sender on the wire.


def test_a_replayed_sender_is_read_back_and_cannot_be_a_name() -> None:
    from chatd.core.names import name_problem

    sender = history_sender("alice", WALL0)
    assert chat.read_sender(sender) == ("history", "alice", "")
    assert chat.read_history(sender) == ("alice", WALL0)
    for forged in (
        "alice[2027-01-15 08:00:00 UTC]",  # no space: a name would need it
        "a b [2027-01-15 08:00:00 UTC]",
        "alice [2027-13-45 08:00:00 UTC]",
        "alice [2027-01-15 08:00:00]",
        "alice [14:03]",
    ):
        assert chat.read_sender(forged)[0] == "message", forged
    for name in ("alice]", "alice[14:03]", "bob[afk]", "x[2027-01-15_08:00:00_UTC]"):
        assert name_problem(name, 64) == (
            "the name may not end like the sender of a replayed message, ']'"
        ), name
    assert name_problem("[afk]bob", 32) is None
    assert name_problem(sender, 64)  # a space, and the end


def test_a_name_with_brackets_cannot_pass_for_a_replay(logs: list[dict[str, Any]]) -> None:
    r = Room(history=MEMORY)
    bob = r.join("bob")
    for name in ("alice[2027-01-15_08:00:00_UTC]", "alice]", "alice [2027-01-15 08:00:00 UTC]"):
        m = r.connect()
        r.chat.name_received(m, name)
        assert m.closed is not None, name
    ok = r.connect()
    r.chat.name_received(ok, "[alice]x")
    r.flush()
    ok.take()
    r.say(ok, "hello")
    r.flush()
    got = bob.take()[-1]
    assert got == ("[alice]x", "hello") and chat.read_sender(got[0])[0] == "message"


def test_long_names_are_cut_to_a_short_header_in_a_replay() -> None:
    r = Room(header_length=2, max_message_bytes=50, max_name_bytes=90, history=MEMORY)
    name = "n" * 90
    talker = r.join(name)
    r.say(talker, "hi")
    m: FakeMember = r.join("late", addr="10.0.0.9")
    decoder = FrameDecoder(1000, 2)
    decoder.feed(bytes(m.received))
    frames = decoder.frames()
    pairs = list(zip(frames[::2], frames[1::2], strict=True))
    assert pairs[1] == (NOTICE_SENDER, "1 earlier message")
    assert pairs[2] == (history_sender(name, r.host.wall_t)[:99], "hi")


def test_a_name_ban_saved_before_the_rule_on_brackets_still_loads_and_lifts() -> None:
    from chatd.core.bans import Bans

    doc = {
        "version": 1,
        "bans": [
            {
                "kind": "name",
                "target": "bob[afk]",
                "reason": "",
                "created": WALL0,
                "expires": None,
                "by": 0,
            }
        ],
    }
    d = FakeDaemon()
    d.chat.moderation.load_bans(Bans.from_json(doc, WALL0))
    assert d.result("unban", target="bob[afk]")["unbanned"]["target"] == "bob[afk]"
    assert d.error("ban", target="eve]")[1] == (
        "ban: not a user name: the name may not end like the sender of a replayed message, ']'"
    )
