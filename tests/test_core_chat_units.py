"""The chat's rules (chatd.core.chat) in detail, on a host that records its timers: the
log events of admit, name_received, drop, enforce and kick field by field, the
counters, the timers each rule sets, and the holding back of notices at its edges."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from fakes import T0, WALL0, FakeMember, Room, settings
from structlog.testing import capture_logs
from unit_host import UnitRoom, logger_names, pairs

from chatd.core.bans import Ban
from chatd.core.chat import (
    GONE,
    JOINED,
    NOTICE_INTERVAL,
    NOTICE_INTERVAL_MAX,
    NOTICE_SHARE,
)
from chatd.core.room import Room as CoreRoom
from chatd.wire.chat import NOTICE_SENDER


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    structlog.reset_defaults()  # another test may have configured a level above info
    with capture_logs() as captured:
        yield captured


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def notice(text: str) -> tuple[str, str]:
    return (NOTICE_SENDER, text)


def rejected(m: FakeMember, reason: str, **fields: Any) -> dict[str, Any]:
    return {
        "event": "rejected",
        "log_level": "info",
        "peer": m.peer,
        "reason": reason,
        **fields,
    }


def leave(m: FakeMember, reason: str, level: str = "info", **fields: Any) -> dict[str, Any]:
    return {
        "event": "leave",
        "log_level": level,
        "peer": m.peer,
        "user": m.name,
        "reason": reason,
        **fields,
    }


def disconnect(m: FakeMember, reason: str, **fields: Any) -> dict[str, Any]:
    return {"event": "disconnect", "log_level": "debug", "peer": m.peer, "reason": reason, **fields}


# Admission.


def test_an_admitted_connection_gets_a_bucket_and_one_handshake_timer() -> None:
    r = UnitRoom(handshake_timeout=7)
    m = FakeMember("10.0.0.1", r.host.t, r.host.wall_t)
    r.host.conns.append(m)
    assert r.chat.admit(m) is True
    assert m.bucket is not None and m.closed is None
    assert r.host.calls == [(m.accepted + 7, r.chat._handshake_expired, m)]
    assert (r.chat.stats.connections, r.chat.admission.places, r.chat.stats.rejected) == (1, 1, {})


def test_refused_connections_count_and_say_why(logs: list[dict[str, Any]]) -> None:
    r = UnitRoom(max_clients=2, max_per_address=1)
    bans = r.chat.bans
    bans.add(Ban("address", "10.6.0.0/16", "", WALL0, WALL0 + 60, 0))
    first = r.connect("10.0.0.1")
    again = FakeMember("10.0.0.1", r.host.t, r.host.wall_t, port=1)
    banned = FakeMember("10.6.0.1", r.host.t, r.host.wall_t, port=2)
    assert r.chat.admit(again) is False
    assert r.chat.admit(banned) is False
    r.connect("10.0.0.2")
    full = FakeMember("10.0.0.3", r.host.t, r.host.wall_t, port=3)
    assert r.chat.admit(full) is False
    assert again.pairs() == [notice("too many connections from 10.0.0.1, try again later")]
    assert banned.pairs() == [
        notice("connection refused: your address is banned until 2027-01-15 08:01:00 UTC")
    ]
    assert full.pairs() == [notice("the server is full, try again later")]
    assert events(logs, "rejected") == [
        rejected(again, "too many from address"),
        rejected(banned, "banned", ban="10.6.0.0/16"),
        rejected(full, "server full"),
    ]
    assert r.chat.stats.rejected == {"too many from address": 1, "banned": 1, "server full": 1}
    assert r.chat.stats.connections == 5
    assert r.chat.admission.places == 2 and first.closed is None


# The name.


def test_refused_names_log_the_name(logs: list[dict[str, Any]]) -> None:
    r = UnitRoom()
    r.chat.bans.add(Ban("name", "Eve", "spam", WALL0, WALL0 + 60, 0))
    r.join("alice")
    bad, eve, taken = r.connect(), r.connect(), r.connect()
    r.chat.name_received(bad, "a b")
    r.chat.name_received(eve, "eve")
    r.chat.name_received(taken, "ALICE")
    assert eve.pairs() == [
        notice("name rejected: 'eve' is banned until 2027-01-15 08:01:00 UTC: spam")
    ]
    assert taken.pairs() == [notice("name rejected: 'ALICE' is already taken")]
    assert events(logs, "rejected") == [
        rejected(bad, "bad name", name="a b"),
        rejected(eve, "banned", name="eve"),
        rejected(taken, "name taken", name="ALICE"),
    ]
    assert r.chat.stats.rejected == {"bad name": 1, "banned": 1, "name taken": 1}
    assert r.chat.admission.places == 1


def test_a_name_frame_that_broke_the_framing_is_a_bad_name(logs: list[dict[str, Any]]) -> None:
    r = UnitRoom()
    m = r.connect()
    r.chat.bad_name_frame(m, "the name is too long (at most 32 bytes)")
    assert m.state is GONE
    assert m.pairs() == [notice("name rejected: the name is too long (at most 32 bytes)")]
    assert events(logs, "rejected") == [rejected(m, "bad name")]
    assert r.chat.stats.rejected == {"bad name": 1}


def test_a_join_is_logged_hot(logs: list[dict[str, Any]]) -> None:
    r = UnitRoom()
    alice = r.join("alice")
    assert events(logs, "join") == [
        {"event": "join", "log_level": "info", "peer": alice.peer, "user": "alice"}
    ]


def test_the_welcome_is_cut_to_fit_a_short_frame_header() -> None:
    r = Room(header_length=2, max_message_bytes=99)
    users = [r.join(f"user{i}") for i in range(10)]
    last = users[-1]
    # 99 bytes less 24 for " and N more" less the 24 of "welcome, user9; online: ".
    assert pairs(last, 2) == [
        notice("welcome, user9; online: user0, user1, user2, user3, user4, user5, user6 and 2 more")
    ]


def test_the_handshake_timer_refuses_at_its_very_deadline() -> None:
    r = UnitRoom(handshake_timeout=5)
    m = r.connect()
    [(when, expired, arg)] = r.host.calls
    r.host.t = when  # the timer fires on the dot
    expired(arg)
    assert m.state is GONE
    assert m.pairs() == [notice("timed out: no name within 5 seconds")]
    assert len(r.host.calls) == 1


# Messages.


def test_a_refused_message_tells_its_sender_alone(logs: list[dict[str, Any]]) -> None:
    r = UnitRoom()
    alice, bob = r.join("alice"), r.join("bob")
    r.flush()
    alice.take(), bob.take()
    r.say(alice, "two\nlines")
    r.flush()
    problem = "messages may not contain control characters such as newlines or escapes"
    assert alice.take() == [notice(f"message not sent: {problem}")]
    assert bob.take() == []
    assert events(logs, "message_refused") == [
        {
            "event": "message_refused",
            "log_level": "info",
            "peer": alice.peer,
            "user": "alice",
            "reason": problem,
        }
    ]
    assert r.chat.stats.messages == 0


def test_a_new_flood_is_told_again_though_nothing_was_relayed_since(
    logs: list[dict[str, Any]],
) -> None:
    r = UnitRoom(flood={"rate": 1, "burst": 1, "max_dropped": 0})
    alice = r.join("alice")
    alice.take()
    r.say(alice, "m0")  # relayed: the bucket is empty
    r.say(alice, "m1")  # dropped: told to slow down
    r.host.advance(1.0)
    r.say(alice, "")  # the bucket was full again: that flood is over
    r.say(alice, "m2")  # dropped: a new flood, told again
    r.flush()
    slow = "slow down: your messages are not being sent (the limit is 1 a second, 1 at once)"
    assert alice.take() == [notice(slow), notice(slow)]
    assert alice.messages == 1
    assert [e["dropped"] for e in events(logs, "flood")] == [1, 1]
    assert events(logs, "flood_end") == [
        {
            "event": "flood_end",
            "log_level": "info",
            "peer": alice.peer,
            "user": "alice",
            "dropped": 1,
        }
    ]


# Holding back notices.


def test_the_first_notices_go_at_once_whatever_the_monotonic_clock_says() -> None:
    r = UnitRoom()
    r.host.t = 0.0  # a monotonic clock just after boot
    alice, bob = r.connect(), r.connect()
    r.chat.name_received(alice, "alice")
    r.chat.name_received(bob, "bob")
    r.chat.flush()
    assert alice.take() == [notice("welcome, alice; nobody else is online"), notice("bob joined")]
    assert not r.chat.holding and r.chat.next_flush() is None


def test_after_a_whole_flush_a_newcomers_welcome_is_due_at_once() -> None:
    r = UnitRoom()
    alice = r.connect()
    r.chat.name_received(alice, "alice")
    r.chat.flush()
    bob = r.connect()
    r.chat.name_received(bob, "bob")
    r.chat.flush()
    assert r.chat.holding  # "bob joined" waits
    r.say(alice, "hi")
    r.chat.flush()  # a message: everything went
    assert not r.chat.holding
    carol = r.connect()
    r.chat.name_received(carol, "carol")
    assert r.chat.next_flush() == 0.0  # her welcome goes now, the notice may wait
    r.chat.flush()
    # The welcome, then the replay of "hi" (history), and no "carol joined" yet.
    assert carol.take()[0] == notice("welcome, carol; online: alice, bob")
    assert r.chat.holding and r.chat.next_flush() == r.host.t + NOTICE_INTERVAL


@pytest.mark.parametrize("took", [0.001, 0.02, 0.2])
def test_after_a_long_flush_notices_alone_wait_longer(
    took: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = UnitRoom()
    alice = r.connect()
    r.chat.name_received(alice, "alice")
    r.chat.flush()
    r.host.advance(1.0)
    bob = r.connect()
    r.chat.name_received(bob, "bob")
    flush = CoreRoom.flush

    def slow_flush(room: CoreRoom[Any]) -> None:  # a large room: the fan-out takes ``took``
        flush(room)
        r.host.t += took

    with monkeypatch.context() as m:
        m.setattr(CoreRoom, "flush", slow_flush)
        r.chat.flush()  # "bob joined" goes: the last broadcast was long ago
    carol = r.connect()
    r.chat.name_received(carol, "carol")
    r.chat.flush()
    wait = min(max(NOTICE_INTERVAL, NOTICE_SHARE * took), NOTICE_INTERVAL_MAX)
    assert r.chat.holding
    assert r.chat.next_flush() == pytest.approx(r.host.t + wait)


# The idle sweep's schedule.


@pytest.mark.parametrize(("timeout", "every"), [(10, 1.0), (100, 10.0), (600, 30.0), (0.1, 0.05)])
def test_the_idle_sweep_runs_every_tenth_of_the_timeout_within_bounds(
    timeout: float, every: float
) -> None:
    r = UnitRoom(idle_timeout=timeout)
    r.chat.start_idle_sweep()
    [(when, _, _)] = r.host.calls
    assert when == pytest.approx(T0 + every)
    r.host.advance(every)
    assert [c[0] for c in r.host.calls[1:]] == [pytest.approx(T0 + 2 * every)]


@pytest.mark.parametrize(("timeout", "gone_at"), [(10, 11.0), (600, 630.0)])
def test_an_idle_user_goes_at_the_first_sweep_past_the_timeout(
    timeout: float, gone_at: float
) -> None:
    r = UnitRoom(idle_timeout=timeout)
    r.chat.start_idle_sweep()
    quiet = r.join("quiet")
    r.host.advance(gone_at - 0.5)
    assert quiet.state is JOINED
    r.host.advance(0.5)
    assert quiet.state is GONE


# Going out: the leave events and their levels.


def test_a_slow_consumer_is_dropped_with_a_warning(logs: list[dict[str, Any]]) -> None:
    r = UnitRoom()
    alice, bob = r.join("alice"), r.join("bob")
    r.flush()
    bob.take()
    waiting = r.connect()
    r.chat.slow_consumer(alice, 5000)
    r.chat.slow_consumer(waiting, 100)
    assert alice.state is GONE and alice.closed == b""  # no notice: its queue is full
    assert r.chat.stats.evictions == 2
    r.flush()
    assert bob.take() == [notice("alice left (slow consumer)")]
    assert events(logs, "leave") == [leave(alice, "slow consumer", "warning", queued=5000)]
    assert events(logs, "disconnect") == [disconnect(waiting, "slow consumer", queued=100)]


def test_internal_errors_warn_other_reasons_inform(logs: list[dict[str, Any]]) -> None:
    r = UnitRoom()
    alice, bob = r.join("alice"), r.join("bob")
    r.chat.drop(alice, "internal error", error="boom")
    r.chat.drop(bob, "closed")
    assert events(logs, "leave") == [
        leave(alice, "internal error", "warning", error="boom"),
        leave(bob, "closed"),
    ]


def test_a_protocol_error_is_told_and_logged(logs: list[dict[str, Any]]) -> None:
    r = UnitRoom()
    alice, bob = r.join("alice"), r.join("bob")
    r.flush()
    bob.take()
    waiting = r.connect()
    r.chat.protocol_error(alice, "bad frame header '1x'")
    r.chat.protocol_error(waiting, "frame too large")
    assert alice.notices()[-1] == "protocol error: bad frame header '1x'"
    assert waiting.pairs() == [notice("protocol error: frame too large")]
    r.flush()
    assert bob.take() == [notice("alice left (protocol error)")]
    assert events(logs, "leave") == [leave(alice, "protocol error", error="bad frame header '1x'")]
    assert events(logs, "disconnect") == [
        disconnect(waiting, "protocol error", error="frame too large")
    ]


def test_dropping_one_who_is_gone_does_nothing(logs: list[dict[str, Any]]) -> None:
    r = UnitRoom()
    alice = r.join("alice")
    r.chat.drop(alice, "quit")
    places = r.chat.admission.places
    r.chat.drop(alice, "closed")
    assert r.chat.admission.places == places
    assert [e["reason"] for e in events(logs, "leave")] == ["quit"]


def test_shutdown_logs_every_connection(logs: list[dict[str, Any]]) -> None:
    r = UnitRoom()
    alice = r.join("alice")
    waiting = r.connect()
    r.chat.stop()
    assert events(logs, "leave") == [leave(alice, "shutdown")]
    assert events(logs, "disconnect") == [disconnect(waiting, "shutdown")]
    assert waiting.pairs() == [notice("the server is shutting down")]
    assert r.chat.admission.places == 0


def test_kicks_are_logged_with_the_admin_and_counted(logs: list[dict[str, Any]]) -> None:
    r = UnitRoom()
    eve, mallory = r.join("eve"), r.join("mallory")
    r.chat.kick(eve, "spam", by=1000)
    r.chat.kick(mallory, "", by=0)
    assert events(logs, "leave") == [
        leave(eve, "kicked", by_uid=1000),
        leave(mallory, "kicked", by_uid=0),
    ]
    assert r.chat.stats.kicks == 2


# Bans enforced.


def test_a_timed_ban_disconnects_users_and_refuses_those_waiting(
    logs: list[dict[str, Any]],
) -> None:
    r = UnitRoom()
    lingering = r.connect("10.6.0.1")
    r.chat.drop(lingering, "closed")  # gone, its socket not yet closed: the host lists it
    waiting = r.connect("10.6.0.2")
    eve = r.join("eve", "10.6.0.3")
    bob = r.join("bob", "10.0.0.1")
    r.flush()
    bob.take()
    net = Ban("address", "10.6.0.0/16", "spam", WALL0, WALL0 + 60, 0)
    r.chat.bans.add(net)
    assert r.chat.moderation.enforce(net) == ["eve"]
    until = " until 2027-01-15 08:01:00 UTC: spam"
    assert eve.notices()[-1] == f"you were banned by an admin{until}"
    assert waiting.pairs() == [notice(f"connection refused: your address is banned{until}")]
    r.flush()
    assert bob.take() == [notice("eve was banned (spam)")]
    assert events(logs, "leave") == [leave(eve, "banned")]
    assert events(logs, "rejected") == [rejected(waiting, "banned")]
    assert r.chat.stats.rejected == {"banned": 1}
    assert r.chat.admission.places == 1  # bob's: the lingering one was not counted twice
    name = Ban("name", "BOB", "", WALL0, WALL0 + 60, 0)
    r.chat.bans.add(name)
    assert r.chat.moderation.enforce(name) == ["bob"]


def test_a_timed_ban_is_watched_until_it_expires(logs: list[dict[str, Any]]) -> None:
    r = UnitRoom()
    soon = Ban("name", "eve", "", WALL0, WALL0 + 5, 0)
    later = Ban("name", "bob", "", WALL0, WALL0 + 30 * 86400, 0)
    r.chat.bans.add(soon)
    r.chat.bans.add(later)
    r.chat.moderation.watch_expiry(soon)
    r.chat.moderation.watch_expiry(later)
    r.chat.moderation.watch_expiry(Ban("name", "x", "", WALL0, None, 0))  # until lifted: no timer
    assert [(when, arg) for when, _, arg in r.host.calls] == [
        (pytest.approx(T0 + 5.01), soon),
        (T0 + 86400, later),
    ]
    r.host.advance(5.01)
    assert r.host.saved == [{"version": 1, "bans": [later.to_json()]}]
    assert events(logs, "ban_expired") == [
        {"event": "ban_expired", "log_level": "info", "kind": "name", "target": "eve"}
    ]


# Reloads.


def test_a_reload_passes_over_connections_that_are_gone() -> None:
    r = UnitRoom(flood={"rate": 1, "burst": 2})
    gone = r.join("gone", "10.0.0.9")
    r.chat.drop(gone, "quit")  # still listed by the host; its bucket went with it
    alice = r.join("alice")
    r.chat.reconfigure(settings(flood={"rate": 1, "burst": 9}))
    assert alice.bucket is not None and (alice.bucket.rate, alice.bucket.burst) == (1, 9.0)
    assert gone.bucket is None  # not given a new one


def test_a_reload_resets_the_handshake_timers_of_those_waiting_only_when_shorter() -> None:
    r = UnitRoom(handshake_timeout=5)
    waiting = r.connect()
    r.join("alice")
    r.host.calls.clear()
    r.chat.reconfigure(settings(handshake_timeout=5))
    r.chat.reconfigure(settings(handshake_timeout=9))
    assert r.host.calls == []  # the old timers come first and set themselves again
    r.host.advance(1)
    r.chat.reconfigure(settings(handshake_timeout=2))
    assert r.host.calls == [(waiting.accepted + 2, r.chat._handshake_expired, waiting)]
    r.host.advance(1.01)
    assert waiting.state is GONE
    assert waiting.pairs() == [notice("timed out: no name within 2 seconds")]


# The logger.


def test_the_chat_logs_to_the_chatd_logger() -> None:
    with logger_names() as names:
        r = UnitRoom()
        alice = r.join("alice")  # the hot log
        r.say(alice, "hi")
        r.chat.name_received(r.connect(), "")  # a member's log
        r.chat.drop(alice, "quit")
    assert len(names) >= 4
    assert set(names) == {("chatd",)}


# A restart: connections readmitted as the chatd before had them.


def test_a_restart_readmits_members_and_handshakes_as_they_were() -> None:
    r = UnitRoom(handshake_timeout=7, flood={"rate": 2, "burst": 5})
    chat, admission = r.chat, r.chat.admission

    def handed(name: str, addr: str, joined: bool, bucket: tuple[float, float] | None) -> Any:
        m = FakeMember(addr, r.host.t - 3, r.host.wall_t, port=next(r.host.ports))
        m.name, m.state = name, JOINED if joined else m.state
        r.host.conns.append(m)
        chat.readmit(m, bucket)
        return m

    bob = handed("bob", "10.0.0.1", True, (3.5, r.host.t - 1))
    ann = handed("ann", "10.0.0.1", True, (0.0, r.host.t))  # the address's bucket is bob's
    eve = handed("", "10.0.0.2", False, (99.0, r.host.t))  # more tokens than a burst holds
    old = handed("old", "10.0.0.3", True, None)  # flood-exempt then: no bucket
    assert [m.name for m in chat.room] == ["bob", "ann", "old"]  # in the order handed
    assert (admission.places, admission.handshakes) == (4, 1)
    assert admission._places == {"10.0.0.1": 2, "10.0.0.2": 1, "10.0.0.3": 1}
    assert admission._handshakes == {"10.0.0.2": 1}
    assert bob.bucket is ann.bucket is not None and old.bucket is None
    assert admission._buckets["10.0.0.1"] == (bob.bucket, 2)
    assert (bob.bucket.tokens, bob.bucket.burst, bob.bucket.rate) == (3.5, 5, 2)
    assert bob.bucket.stamp == r.host.t - 1  # refilled from when it was handed over
    assert eve.bucket is not None and eve.bucket.tokens == 5  # cut to the burst
    assert [m.address for m in (bob, ann, eve, old)] == ["10.0.0.1"] * 2 + ["10.0.0.2", "10.0.0.3"]
    # No welcome, no join notice: they were here all along.
    assert all(m.received == b"" for m in (bob, ann, eve, old))
    # The one still to send its name keeps a handshake timer from when it connected.
    assert r.host.calls == [(eve.accepted + 7, chat._handshake_expired, eve)]
    # And they leave as any connection does: the counts go back to nothing.
    for m in (bob, ann, eve, old):
        chat.drop(m, "closed")
    assert (admission.places, admission.handshakes) == (0, 0)
    assert admission._places == admission._handshakes == admission._buckets == {}
