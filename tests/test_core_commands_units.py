"""The in-band commands carried out (chatd.core.commands) on a fake host: who gets what,
the message counters, and the hot log's message events field by field."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from fakes import FakeMember, Room
from structlog.testing import capture_logs
from unit_host import pairs

from chatd.core import commands
from chatd.core.chat import GONE
from chatd.core.names import list_bytes
from chatd.wire import notices
from chatd.wire.chat import NOTICE_SENDER


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    structlog.reset_defaults()  # another test may have configured a level above info
    with capture_logs() as captured:
        yield captured


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def joined(r: Room, *names: str) -> list[FakeMember]:
    """Members called ``names``, with what they were sent on joining taken."""
    members = [r.join(name) for name in names]
    r.flush()
    for m in members:
        m.take()
    return members


def message(m: FakeMember, text: str, **fields: Any) -> dict[str, Any]:
    """The hot log's event for a message of ``m`` (text logged)."""
    return {
        "event": "message",
        "log_level": "info",
        "peer": m.peer,
        "user": m.name,
        "bytes": len(text.encode()),
        "text": text,
        **fields,
    }


# What each command does, and for whom.


def test_a_double_slash_sends_the_text_with_one_slash(logs: list[dict[str, Any]]) -> None:
    r = Room()
    alice, bob = joined(r, "alice", "bob")
    r.say(alice, "//héllo /all")
    r.flush()
    assert bob.take() == [("alice", "/héllo /all")]
    assert alice.take() == []
    assert events(logs, "message") == [message(alice, "/héllo /all")]
    assert events(logs, "message")[0]["bytes"] == 12
    assert (alice.messages, bob.messages, r.chat.stats.messages) == (1, 0, 1)


def test_me_is_an_action_for_the_others(logs: list[dict[str, Any]]) -> None:
    r = Room()
    alice, bob, carol = joined(r, "alice", "bob", "carol")
    r.say(alice, "/me waves")
    r.flush()
    assert bob.take() == [("* alice", "waves")]
    assert carol.take() == [("* alice", "waves")]
    assert alice.take() == []
    assert events(logs, "message") == [message(alice, "waves", kind="action")]
    assert (alice.messages, r.chat.stats.messages) == (1, 1)


def test_msg_reaches_its_one_recipient_under_its_real_name(logs: list[dict[str, Any]]) -> None:
    r = Room()
    alice, bob, carol = joined(r, "alice", "bob", "carol")
    r.say(alice, "/msg BOB psst, it's me")
    r.flush()
    assert bob.take() == [("alice (private)", "psst, it's me")]
    assert alice.take() == [("alice -> bob (private)", "psst, it's me")]  # the copy: it went
    assert carol.take() == []
    assert events(logs, "message") == [message(alice, "psst, it's me", kind="private", to="bob")]
    assert (alice.messages, bob.messages, r.chat.stats.messages) == (1, 0, 1)


def test_msg_to_nobody_tells_the_sender_alone(logs: list[dict[str, Any]]) -> None:
    r = Room()
    alice, bob = joined(r, "alice", "bob")
    r.say(alice, "/msg Nobody hello")
    r.flush()
    assert alice.take() == [(NOTICE_SENDER, "message not sent: nobody called 'Nobody' is online")]
    assert bob.take() == []
    assert events(logs, "message") == []
    assert (alice.messages, r.chat.stats.messages) == (0, 0)


def test_who_answers_the_sender_alone() -> None:
    r = Room()
    alice, bob, carol = joined(r, "alice", "bob", "carol")
    r.say(bob, "/who")
    r.flush()
    assert bob.take() == [(NOTICE_SENDER, "online (3): alice, bob, carol")]
    assert alice.take() == [] and carol.take() == []
    assert r.chat.stats.messages == 0


def test_who_is_cut_to_fit_a_short_frame_header() -> None:
    # 99 bytes at most in a frame: the list gets 75 (list_bytes), less the head.
    r = Room(header_length=2, max_message_bytes=99)
    users = [r.join(f"user{i}") for i in range(10)]
    r.flush()
    for u in users:
        u.received.clear()
    r.say(users[0], "/who")
    r.flush()
    want = "online (10): user0, user1, user2, user3, user4, user5, user6, user7 and 2 more"
    assert pairs(users[0], 2) == [(NOTICE_SENDER, want)]
    assert all(u.received == b"" for u in users[1:])


def test_quit_leaves_without_a_last_notice(logs: list[dict[str, Any]]) -> None:
    r = Room()
    alice, bob = joined(r, "alice", "bob")
    r.say(alice, "/quit now")
    assert alice.state is GONE and alice.closed == b""
    r.flush()
    assert bob.take() == [(NOTICE_SENDER, "alice left (quit)")]
    assert [e["reason"] for e in events(logs, "leave")] == ["quit"]


def test_help_and_usage_answer_the_sender_alone() -> None:
    r = Room()
    alice, bob = joined(r, "alice", "bob")
    r.say(alice, "/help")
    r.say(alice, "/me")
    r.flush()
    assert alice.take() == [(NOTICE_SENDER, line()) for line in notices.HELP] + [
        (NOTICE_SENDER, "usage: /me ACTION")
    ]
    assert bob.take() == []
    assert r.chat.stats.messages == 0


# The message events: the text only if log.messages, none at all below info.


def test_without_log_messages_the_events_keep_the_size_only(logs: list[dict[str, Any]]) -> None:
    r = Room(log={"messages": False})
    alice, _bob = joined(r, "alice", "bob")
    r.say(alice, "hello")
    r.say(alice, "/me waves")
    r.say(alice, "/msg bob psst")
    r.flush()
    base = {"event": "message", "log_level": "info", "peer": alice.peer, "user": "alice"}
    assert events(logs, "message") == [
        {**base, "bytes": 5},
        {**base, "bytes": 5, "kind": "action"},
        {**base, "bytes": 4, "kind": "private", "to": "bob"},
    ]
    assert r.chat.stats.messages == 3


def test_plain_messages_are_logged_and_counted(logs: list[dict[str, Any]]) -> None:
    r = Room()
    alice, bob = joined(r, "alice", "bob")
    r.say(alice, "one")
    r.say(alice, "two")
    r.say(bob, "three")
    assert events(logs, "message") == [
        message(alice, "one"),
        message(alice, "two"),
        message(bob, "three"),
    ]
    assert (alice.messages, bob.messages, r.chat.stats.messages) == (2, 1, 3)


def test_no_message_events_below_info_but_the_counters_go_on(logs: list[dict[str, Any]]) -> None:
    r = Room()
    alice, _bob = joined(r, "alice", "bob")
    r.chat.log_messages = False
    r.say(alice, "hello")
    r.say(alice, "//again")
    assert events(logs, "message") == []
    assert (alice.messages, r.chat.stats.messages) == (2, 2)


def test_message_events_are_on_by_default(logs: list[dict[str, Any]]) -> None:
    r = Room()
    assert r.chat.log_messages is True
    (alice,) = joined(r, "alice")
    r.say(alice, "anyone?")
    assert events(logs, "message") == [message(alice, "anyone?")]


# The /who line and the room it gets in a notice.


def test_who_line_fits_its_budget_with_the_head_counted() -> None:
    names = ["aa", "bb", "cc"]
    # "online (3): " is 12 bytes; each name costs its length and 2.
    assert commands.who_line(names, 24) == "online (3): aa, bb, cc"
    assert commands.who_line(names, 23) == "online (3): aa, bb and 1 more"
    assert commands.who_line(names, 12) == "online (3): 3 not shown"  # not one fits
    assert commands.who_line([], 100) == "online (0): "


@pytest.mark.parametrize(
    ("header_length", "before", "budget"),
    [(10, 0, 4000), (4, 0, 4000), (4, 6000, 3975), (3, 0, 975), (3, 100, 875), (2, 10, 65)],
)
def test_list_bytes(header_length: int, before: int, budget: int) -> None:
    assert list_bytes(header_length, before) == budget


def test_list_bytes_counts_nothing_before_by_default() -> None:
    assert list_bytes(3) == 975 == list_bytes(3, 0)
