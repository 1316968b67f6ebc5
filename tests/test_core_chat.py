"""The chat's rules (chatd.core.chat), in process with a fake clock: no sockets, no sleeps.

Admission, the name, flood control, the handshake timeout, the idle sweep, bans and
their expiry, kicks, shutdown and the holding back of notices, each with the log
events it writes (structlog's capture_logs).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from fakes import WALL0, FakeMember, Room, settings
from structlog.testing import capture_logs

from chatd.core.bans import Ban, Bans
from chatd.core.chat import GONE, HANDSHAKE, JOINED, NOTICE_INTERVAL
from chatd.wire import notices
from chatd.wire.chat import NOTICE_SENDER


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    structlog.reset_defaults()  # another test may have configured a level above info
    with capture_logs() as captured:
        yield captured


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def last_notice(m: FakeMember) -> str:
    return m.notices()[-1]


# Joining.


def test_join_welcomes_the_newcomer_and_tells_the_room(logs: list[dict[str, Any]]) -> None:
    r = Room()
    alice = r.join("alice")
    assert alice.take() == [(NOTICE_SENDER, "welcome, alice; nobody else is online")]
    bob = r.join("bob")
    assert bob.take() == [(NOTICE_SENDER, "welcome, bob; online: alice")]
    assert alice.take() == [(NOTICE_SENDER, "bob joined")]
    assert (alice.state, bob.state) == (JOINED, JOINED)
    assert [e["user"] for e in events(logs, "join")] == ["alice", "bob"]
    assert r.chat.stats.peak_users == 2
    assert r.host.status_changes == 2


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "the name is empty"),
        ("a b", "the name contains a space"),
        ("chatd", "the name 'chatd' is reserved"),
        ("x" * 33, "the name is 33 bytes long, the limit is 32"),
    ],
)
def test_a_bad_name_is_refused_with_the_reason(
    logs: list[dict[str, Any]], name: str, why: str
) -> None:
    r = Room()
    m = r.connect()
    r.chat.name_received(m, name)
    assert m.state is GONE
    assert m.pairs() == [(NOTICE_SENDER, f"name rejected: {why}")]
    assert events(logs, "rejected")[0]["reason"] == "bad name"
    assert r.chat.stats.rejected == {"bad name": 1}


def test_a_taken_name_is_refused_without_regard_to_case() -> None:
    r = Room()
    r.join("Alice")
    m = r.connect()
    r.chat.name_received(m, "aLICE")
    assert m.pairs() == [(NOTICE_SENDER, "name rejected: 'aLICE' is already taken")]


def test_the_server_full_and_per_address_limits_free_up_when_someone_goes() -> None:
    r = Room(max_clients=2, max_per_address=1)
    a = r.connect("10.0.0.1")
    same = r.connect("10.0.0.1")
    assert same.pairs() == [(NOTICE_SENDER, "too many connections from 10.0.0.1, try again later")]
    b = r.connect("10.0.0.2")
    full = r.connect("10.0.0.3")
    assert full.pairs() == [(NOTICE_SENDER, "the server is full, try again later")]
    assert r.chat.admission.places == 2
    r.chat.drop(a, "quit")
    assert r.chat.admission.places == 1
    again = r.connect("10.0.0.1")
    assert again.closed is None and b.closed is None


# Flood control.


def test_flood_control_drops_over_the_burst_and_tells_the_sender_once_per_run(
    logs: list[dict[str, Any]],
) -> None:
    r = Room(flood={"rate": 1, "burst": 3, "max_dropped": 0})
    alice, bob = r.join("alice"), r.join("bob")
    r.flush()
    alice.take(), bob.take()
    for i in range(5):
        r.say(alice, f"m{i}")
    r.flush()
    assert bob.take() == [("alice", "m0"), ("alice", "m1"), ("alice", "m2")]
    slow = "slow down: your messages are not being sent (the limit is 1 a second, 3 at once)"
    assert alice.take() == [(NOTICE_SENDER, slow)]  # once for two dropped
    assert alice.dropped == 2 and r.chat.stats.flood_dropped == 2
    assert events(logs, "flood") == [
        {
            "event": "flood",
            "log_level": "warning",
            "peer": alice.peer,
            "user": "alice",
            "dropped": 1,
            "rate": 1.0,
            "burst": 3,
        }
    ]
    r.host.advance(1.0)  # one token back
    r.say(alice, "m5")
    r.say(alice, "m6")  # dropped: a new run, told again
    r.flush()
    assert bob.take() == [("alice", "m5")]
    assert alice.take() == [(NOTICE_SENDER, slow)]
    r.host.advance(3.0)  # the bucket is full again: the flood is over
    r.say(alice, "m7")
    r.flush()
    assert bob.take() == [("alice", "m7")]
    assert events(logs, "flood_end") == [
        {
            "event": "flood_end",
            "log_level": "info",
            "peer": alice.peer,
            "user": "alice",
            "dropped": 3,
        }
    ]
    assert alice.dropped == 0


def test_a_sender_that_keeps_flooding_is_disconnected(logs: list[dict[str, Any]]) -> None:
    r = Room(flood={"rate": 1, "burst": 2, "max_dropped": 3})
    alice, bob = r.join("alice"), r.join("bob")
    for i in range(5):
        r.say(alice, f"m{i}")
    assert alice.state is GONE
    assert last_notice(alice) == "disconnected for flooding: 3 messages over the limit"
    r.flush()
    assert bob.notices()[-1] == "alice left (flooding)"
    leave = events(logs, "leave")[0]
    assert (leave["reason"], leave["flood_dropped"]) == ("flooding", 3)


def test_exempt_addresses_and_rate_zero_have_no_bucket() -> None:
    r = Room(flood={"exempt": ["10.9.0.0/16"]})
    assert r.connect("10.9.1.2").bucket is None
    assert r.connect("::ffff:10.9.1.2").bucket is None  # an IPv4 peer on an IPv6 socket
    assert r.connect("10.8.1.2").bucket is not None
    assert Room(flood={"rate": 0}).connect().bucket is None


def test_a_reload_changes_the_buckets_of_those_connected() -> None:
    r = Room(flood={"rate": 1, "burst": 2})
    alice = r.join("alice")
    exempt = r.join("bob", "10.5.0.1")
    r.chat.reconfigure(settings(flood={"rate": 5, "burst": 9, "exempt": ["10.5.0.0/16"]}))
    assert alice.bucket is not None and (alice.bucket.rate, alice.bucket.burst) == (5, 9)
    assert exempt.bucket is None
    r.chat.reconfigure(settings(flood={"rate": 0}))
    assert alice.bucket is None
    r.chat.reconfigure(settings())
    assert alice.bucket is not None and alice.bucket.take(r.host.t)


def test_every_frame_counts_commands_and_empty_ones_too() -> None:
    r = Room(flood={"rate": 1, "burst": 2, "max_dropped": 0})
    alice = r.join("alice")
    r.say(alice, "")
    r.say(alice, "/who")
    r.say(alice, "third")
    assert alice.dropped == 1


# The handshake timeout, with a fake clock.


def test_a_connection_that_sends_no_name_is_refused_when_its_time_is_up(
    logs: list[dict[str, Any]],
) -> None:
    r = Room(handshake_timeout=5)
    m = r.connect()
    r.host.advance(4.99)
    assert m.state is HANDSHAKE and m.closed is None
    r.host.advance(0.02)
    assert m.state is GONE
    assert m.pairs() == [(NOTICE_SENDER, "timed out: no name within 5 seconds")]
    assert events(logs, "rejected")[0]["reason"] == "handshake timeout"


def test_the_handshake_timer_does_nothing_to_a_member_who_joined() -> None:
    r = Room(handshake_timeout=5)
    m = r.join("alice")
    r.host.advance(10)
    assert m.state is JOINED and m.closed is None


def test_a_reload_moves_the_handshake_deadline_both_ways() -> None:
    r = Room(handshake_timeout=5)
    longer = r.connect()
    r.chat.reconfigure(settings(handshake_timeout=8))
    r.host.advance(6)
    assert longer.closed is None  # the old timer fired and was set again
    r.host.advance(2.01)
    assert longer.state is GONE
    shorter = r.connect()
    r.chat.reconfigure(settings(handshake_timeout=1))
    r.host.advance(1.01)
    assert shorter.state is GONE


# The idle sweep, with a fake clock.


def test_idle_users_are_disconnected_between_one_and_one_tenth_timeouts(
    logs: list[dict[str, Any]],
) -> None:
    r = Room(idle_timeout=10)
    r.chat.start_idle_sweep()
    quiet, talker = r.join("quiet"), r.join("talker")
    for _ in range(10):
        r.host.advance(1.0)
        r.say(talker, "still here")
    assert quiet.closed is None
    r.host.advance(1.05)
    assert quiet.state is GONE
    assert last_notice(quiet) == "disconnected: nothing sent for 10 seconds"
    assert talker.state is JOINED
    assert events(logs, "leave")[0]["reason"] == "idle"


def test_the_idle_sweep_is_off_by_default_and_follows_reloads() -> None:
    r = Room()
    r.chat.start_idle_sweep()
    m = r.join("alice")
    assert r.host.timers == 1  # the handshake timer alone
    r.host.advance(100_000)
    assert m.closed is None
    r.chat.reconfigure(settings(idle_timeout=5))
    r.host.advance(5.6)
    assert m.state is GONE
    r.chat.reconfigure(settings())  # off again: the sweep stops
    late = r.join("bob")
    r.host.advance(100)
    assert late.closed is None


# Bans and their expiry, with fake clocks.


def ban(kind: str, target: str, *, expires: float | None = None, reason: str = "") -> Ban:
    return Ban(kind, target, reason, WALL0, expires, 0)


def test_banned_names_and_addresses_are_refused_with_the_terms() -> None:
    r = Room()
    bans = Bans()
    bans.add(ban("name", "Eve", reason="spam"))
    bans.add(ban("address", "10.6.0.0/16", expires=WALL0 + 3600))
    r.chat.moderation.load_bans(bans)
    eve = r.connect()
    r.chat.name_received(eve, "eve")
    assert eve.pairs() == [(NOTICE_SENDER, "name rejected: 'eve' is banned: spam")]
    there = r.connect("10.6.1.1")
    assert there.pairs() == [
        (NOTICE_SENDER, "connection refused: your address is banned until 2027-01-15 09:00:00 UTC")
    ]
    assert r.chat.stats.rejected == {"banned": 2}


def test_a_timed_ban_expires_on_its_timer_and_the_file_is_saved(
    logs: list[dict[str, Any]],
) -> None:
    r = Room()
    bans = Bans()
    bans.add(ban("address", "10.6.0.0/16", expires=WALL0 + 5))
    r.chat.moderation.load_bans(bans)
    r.host.advance(4.9)
    assert r.connect("10.6.0.1").closed is not None
    r.host.advance(0.2)
    assert len(r.chat.bans) == 0
    assert r.host.saved == [{"version": 1, "bans": []}]
    assert events(logs, "ban_expired") == [
        {"event": "ban_expired", "log_level": "info", "kind": "address", "target": "10.6.0.0/16"}
    ]
    assert r.connect("10.6.0.1").closed is None


def test_a_long_ban_is_looked_at_daily_and_lifted_at_its_end() -> None:
    r = Room()
    bans = Bans()
    bans.add(ban("name", "eve", expires=WALL0 + 30 * 86400))
    r.chat.moderation.load_bans(bans)
    for _ in range(29):
        r.host.advance(86400)
        assert len(r.chat.bans) == 1 and not r.host.saved
    r.host.advance(86400)
    assert len(r.chat.bans) == 0 and len(r.host.saved) == 1


def test_a_ban_that_cannot_be_saved_on_expiry_is_logged(logs: list[dict[str, Any]]) -> None:
    r = Room()
    bans = Bans()
    bans.add(ban("name", "eve", expires=WALL0 + 1))
    r.chat.moderation.load_bans(bans)
    r.host.save_error = "cannot write /x: no space left on device"
    r.host.advance(2)
    assert events(logs, "state_not_saved")[0]["error"] == r.host.save_error


def test_a_new_ban_disconnects_whoever_it_covers(logs: list[dict[str, Any]]) -> None:
    r = Room()
    eve, bob = r.join("eve"), r.join("bob")
    r.join("mallory", "10.6.0.9")
    waiting = r.connect("10.6.0.10")
    r.flush()
    bob.take()
    name_ban = ban("name", "EVE", reason="spam")
    r.chat.bans.add(name_ban)
    assert r.chat.moderation.enforce(name_ban) == ["eve"]
    assert last_notice(eve) == "you were banned by an admin: spam"
    net = ban("address", "10.6.0.0/16")
    r.chat.bans.add(net)
    assert r.chat.moderation.enforce(net) == ["mallory"]
    assert last_notice(waiting) == "connection refused: your address is banned"
    r.flush()
    assert bob.notices() == ["eve was banned (spam)", "mallory was banned"]


# Kicks, shutdown.


def test_a_kick_tells_the_user_and_the_room() -> None:
    r = Room()
    eve, bob = r.join("eve"), r.join("bob")
    r.flush()
    bob.take()
    r.chat.kick(eve, "spam", by=1000)
    assert last_notice(eve) == "you were kicked by an admin: spam"
    r.flush()
    assert bob.notices() == ["eve was kicked (spam)"]
    assert r.chat.stats.kicks == 1
    r.chat.kick(bob, "", by=0)
    assert last_notice(bob) == "you were kicked by an admin"


def test_joins_and_leaves_are_counted_by_reason_and_refusals_are_not_leaves() -> None:
    r = Room()
    alice, bob, eve = r.join("alice"), r.join("bob"), r.join("eve")
    waiting = r.connect()
    r.chat.name_received(r.connect(), "alice")  # refused: rejected, never joined
    r.chat.kick(eve, "spam", by=0)
    r.chat.drop(bob, "quit")
    r.chat.drop(bob, "closed")  # gone already: counted once
    r.chat.drop(waiting, "closed")  # never joined: a disconnect, not a leave
    stats = r.chat.stats
    assert (stats.joins, stats.left, stats.rejected) == (
        3,
        {"kicked": 1, "quit": 1},
        {"name taken": 1},
    )
    r.chat.stop()
    assert stats.left == {"kicked": 1, "quit": 1, "shutdown": 1}
    assert alice.state is GONE


def test_shutdown_delivers_what_was_accepted_then_tells_everyone() -> None:
    r = Room()
    alice, bob = r.join("alice"), r.join("bob")
    waiting = r.connect()
    r.flush()
    alice.take(), bob.take()
    r.say(alice, "last words")
    r.chat.stop()
    assert bob.pairs() == [("alice", "last words"), (NOTICE_SENDER, "the server is shutting down")]
    assert alice.pairs() == [(NOTICE_SENDER, "the server is shutting down")]  # no "bob left"
    assert waiting.pairs() == [(NOTICE_SENDER, "the server is shutting down")]
    assert not r.chat.room.pending


# Notices held back in a storm, with a fake clock.


def test_notices_alone_are_broadcast_at_most_every_interval_messages_never_wait() -> None:
    r = Room()
    alice = r.connect()
    r.chat.name_received(alice, "alice")
    r.chat.flush()  # the first broadcast ("alice joined", to nobody) goes at once
    alice.take()
    bob = r.connect()
    r.chat.name_received(bob, "bob")
    r.chat.flush()
    assert bob.take() == [(NOTICE_SENDER, "welcome, bob; online: alice")]  # at once
    assert alice.take() == []  # "bob joined" is held
    assert r.chat.holding and r.chat.next_flush() == r.host.t + NOTICE_INTERVAL
    r.host.advance(NOTICE_INTERVAL / 2)
    r.say(alice, "hi")  # a message: everything goes now
    assert r.chat.next_flush() == 0.0
    r.chat.flush()
    assert bob.take() == [("alice", "hi")]
    assert alice.take() == [(NOTICE_SENDER, "bob joined")]
    carol = r.connect()
    r.chat.name_received(carol, "carol")
    r.chat.flush()
    assert alice.take() == []
    r.host.advance(NOTICE_INTERVAL)
    r.chat.flush()
    assert alice.take() == [(NOTICE_SENDER, "carol joined")]
    assert r.chat.next_flush() is None


# What the chat sends is always a notice template.


def test_every_notice_the_chat_sent_in_these_scenarios_is_a_template() -> None:
    """The notices of a busy scenario, read back: each is recognized, and the ones
    that end a connection came last."""
    r = Room(max_per_address=3, flood={"rate": 1, "burst": 1, "max_dropped": 2}, idle_timeout=60)
    r.chat.start_idle_sweep()
    alice, bob = r.join("alice"), r.join("bob")
    for text in ["/who", "/help", "/me waves", "/msg nobody x", "/msg bob hi", "/nope", "/"]:
        alice.bucket = None
        r.say(alice, text)
    for text in ["a\nb", "1", "2"]:  # refused, then flooding, then over the limit
        r.say(bob, text)
        r.flush()
    for _ in range(3):
        r.connect("10.7.0.1")
    r.connect("10.7.0.1")
    r.chat.bad_name_frame(r.connect(), "the name is too long (at most 32 bytes)")
    r.chat.protocol_error(r.join("carol"), "bad frame header")
    r.host.advance(100)
    r.flush()
    seen = set()
    for m in r.host.conns:
        texts = m.notices()
        for i, text in enumerate(texts):
            notice = notices.recognize(text)
            assert notice is not None, text
            seen.add(notice.kind)
            if notice.ends:
                assert i == len(texts) - 1, (text, texts)
    assert {
        "welcome",
        "joined",
        "left",
        "who",
        "help",
        "nobody_called",
        "not_sent",
        "unknown_command",
        "not_a_command",
        "slow_down",
        "flooding",
        "too_many_from_address",
        "name_invalid",
        "protocol_error",
        "handshake_timeout",
        "idle",
    } <= seen


# Names that pass for someone or something else (UTS #39, PRECIS).

CYRILLIC_A = "\u0430"


def test_a_look_alike_of_someone_online_is_refused(logs: list[dict[str, Any]]) -> None:
    r = Room()
    r.join("alice")
    impostor = r.connect()
    r.chat.name_received(impostor, CYRILLIC_A + "lice")
    assert impostor.pairs() == [
        (NOTICE_SENDER, f"name rejected: '{CYRILLIC_A}lice' looks like 'alice', who is online")
    ]
    (event,) = events(logs, "rejected")
    assert (event["reason"], event["like"]) == ("name taken", "alice")
    for name in ["ALlCE", "aIice", "a1ice"]:  # l, I and 1 look alike too
        m = r.connect()
        r.chat.name_received(m, name)
        assert last_notice(m) == f"name rejected: {name!r} looks like 'alice', who is online"


def test_once_the_original_left_a_mixed_script_look_alike_is_still_refused() -> None:
    r = Room()
    m = r.connect()
    r.chat.name_received(m, CYRILLIC_A + "lice")
    assert (
        last_notice(m)
        == "name rejected: the name mixes Cyrillic and Latin letters, as look-alike names do"
    )
    whole = r.join("\u0430\u0432")  # all Cyrillic: a name of its own
    assert whole.state is JOINED


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (
            "chatd\u034f",
            "the name contains U+034F COMBINING GRAPHEME JOINER, an invisible character",
        ),
        ("bob\u3164(private)", "the name contains U+3164 HANGUL FILLER, an invisible character"),
        (
            "ch" + CYRILLIC_A + "td",
            f"the name 'ch{CYRILLIC_A}td' looks like 'chatd', which is reserved",
        ),
        ("bob(private)", "the name may not end like the sender of a private message, '(private)'"),
        ("bob(prlvate)", "the name may not end like the sender of a private message, '(private)'"),
        ("*bob", "the name may not start like the sender of an action, '*'"),
        (
            "\uff22ob",
            "the name is not in its plain form (Unicode NFC, no fullwidth or other "
            "variant forms): write 'Bob'",
        ),
        ("bob\u2217", "the name contains U+2217 ASTERISK OPERATOR, a symbol (beyond ASCII)"),
        ("a\u00a0b", "the name contains a no-break space"),
    ],
)
def test_names_that_pass_for_something_else_are_refused(name: str, problem: str) -> None:
    r = Room()
    m = r.connect()
    r.chat.name_received(m, name)
    assert m.pairs() == [(NOTICE_SENDER, f"name rejected: {problem}")]


@pytest.mark.parametrize(
    "name", ["Zoë", "日本語かな", "Latin日本", "שלום", "ΔΕΛΤΑ", "(o_o)", "x-y.z"]
)
def test_names_of_one_script_or_a_safe_mix_join(name: str) -> None:
    assert Room().join(name).state is JOINED


def test_a_name_ban_covers_its_look_alikes() -> None:
    r = Room()
    bans = Bans()
    bans.add(ban("name", "eve"))
    r.chat.moderation.load_bans(bans)
    m = r.connect()
    r.chat.name_received(m, "EVE")
    n = r.connect()
    r.chat.name_received(n, "\u0435ve")  # Cyrillic e: banned, not merely mixed
    assert [last_notice(x) for x in (m, n)] == [
        "name rejected: 'EVE' is banned",
        "name rejected: '\u0435ve' is banned",
    ]


def test_bidi_controls_and_separators_in_messages_are_refused_to_the_sender() -> None:
    r = Room()
    alice, bob = r.join("alice"), r.join("bob")
    r.flush()
    alice.take(), bob.take()
    r.say(alice, "abc\u202edcba")
    r.say(alice, "one\u2028two")
    r.say(alice, "שלום")
    r.flush()
    assert bob.take() == [("alice", "שלום")]
    assert alice.notices() == [
        "message not sent: messages may not contain bidirectional controls such as "
        "U+202E RIGHT-TO-LEFT OVERRIDE, which reorder what the others see",
        "message not sent: messages may not contain line or paragraph separators (U+2028, U+2029)",
    ]


# One address cannot take every slot, nor escape flood control.


def test_an_ipv6_host_counts_as_its_64() -> None:
    r = Room(max_per_address=2)
    r.connect("2001:db8::1")
    r.connect("2001:db8::ffff:2")
    third = r.connect("2001:db8:0:0:1::3")
    assert third.pairs() == [
        (NOTICE_SENDER, "too many connections from 2001:db8::/64, try again later")
    ]
    assert r.connect("2001:db8:0:1::1").closed is None  # another /64
    assert r.connect("::ffff:10.0.0.1").address == "10.0.0.1"


def test_connections_without_a_name_are_limited_per_address_and_in_total() -> None:
    r = Room(max_handshakes_per_address=2, max_handshakes=100)
    a, b = r.connect("10.0.0.1"), r.connect("10.0.0.1")
    assert last_notice(r.connect("10.0.0.1")) == (
        "too many connections from 10.0.0.1, try again later"
    )
    r.chat.name_received(a, "alice")  # a joined user holds no handshake
    assert r.connect("10.0.0.1").closed is None
    r.chat.drop(b, "quit")
    assert r.connect("10.0.0.1").closed is None
    assert r.chat.admission.handshakes == 2


def test_past_half_the_handshakes_newcomers_are_dropped_at_random_then_all() -> None:
    r = Room(max_handshakes=10, max_per_address=0, max_handshakes_per_address=100)
    rolls = iter([0.99, 0.0])  # lucky, then not
    r.chat.admission.rng = lambda: next(rolls)
    waiting = [r.connect() for _ in range(5)]  # half: no roll
    assert all(m.closed is None for m in waiting)
    assert r.connect().closed is None  # the 6th rolled 0.99 against 1/6
    dropped = r.connect()  # the 7th rolled 0.0
    assert dropped.pairs() == [
        (NOTICE_SENDER, "too many connections are joining, try again in a moment")
    ]
    assert r.chat.stats.rejected == {"too many joining": 1}
    r.chat.admission.rng = lambda: 1.0  # never unlucky, but past the full count
    for _ in range(4):
        r.connect()
    assert last_notice(r.connect()) == ("too many connections are joining, try again in a moment")
    for m in waiting:  # they join: room again
        r.chat.name_received(m, f"u{id(m)}")
    assert r.connect().closed is None


def test_address_exempt_lifts_the_per_address_limits_not_the_totals() -> None:
    r = Room(max_per_address=1, max_clients=3, address_exempt=["10.9.0.0/16"])
    assert [r.connect("10.9.0.1").closed for _ in range(3)] == [None, None, None]
    assert last_notice(r.connect("10.9.0.1")) == "the server is full, try again later"


def test_the_connections_of_one_address_share_one_flood_bucket() -> None:
    r = Room(flood={"rate": 1, "burst": 2, "max_dropped": 0})
    a1, a2 = r.join("a1", "10.0.0.1"), r.join("a2", "10.0.0.1")
    other = r.join("b", "10.0.0.2")
    assert a1.bucket is a2.bucket and a1.bucket is not other.bucket
    r.say(a1, "one")
    r.say(a2, "two")
    r.say(a2, "three")  # the address's burst is spent
    assert (a1.dropped, a2.dropped) == (0, 1)
    r.say(other, "its own")
    assert other.dropped == 0
    r.chat.drop(a1, "quit")
    r.chat.drop(a2, "quit")
    fresh = r.join("a3", "10.0.0.1")  # the last one gone, the bucket went with it
    assert fresh.bucket is not None and fresh.bucket.tokens == 2
