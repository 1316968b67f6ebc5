"""chatd.wire without I/O: notice templates, the client's outcomes, the token bucket,
senders, durations."""

from __future__ import annotations

import math
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd.client import session
from chatd.wire import chat, control, notices
from chatd.wire.tokenbucket import TokenBucket

# Sample fields for every template: a name has no whitespace, anything else may.
SAMPLE = {
    "name": "alice",
    "other": "Alice",
    "online": "online: bob and 3 more",
    "terms": " until 2026-11-25 19:00:00 UTC: spam",
    "problem": "the name is empty",
    "host": "10.0.0.7",
    "seconds": "10",
    "reason": " (spam)",
    "count": "3",
    "names": "alice, bob",
    "rate": "10",
    "burst": "50",
    "command": "nick",
    "usage": "/me ACTION",
    "error": "bad frame header '1x'",
    "why": ": spam",
    "version": "0.1.0",
    "s": "s",
}


def fields_of(notice: notices.Notice) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(notice.template) if f]


@pytest.mark.parametrize("notice", notices.ALL, ids=lambda n: n.kind)
def test_every_template_is_recognized_as_itself(notice: notices.Notice) -> None:
    text = notice(**{f: SAMPLE[f] for f in fields_of(notice)})
    assert notices.recognize(text) is notice or (
        notice.kind == "help" and notices.recognize(text).kind == "help"  # type: ignore[union-attr]
    )
    got = notice.match(text)
    assert got is not None
    for f in fields_of(notice):
        want = repr(SAMPLE[f]) if "{" + f + "!r}" in notice.template else SAMPLE[f]
        assert got[f] == want


@given(
    name=st.text(
        st.characters(blacklist_categories=("Zs", "Zl", "Zp", "Cc", "Cs")), min_size=1, max_size=8
    ).filter(lambda n: not any(c.isspace() for c in n)),
    free=st.text(max_size=20),
)
def test_templates_are_recognized_whatever_their_fields(name: str, free: str) -> None:
    for notice in notices.ALL:
        values = {f: (name if f == "name" else free) for f in fields_of(notice)}
        got = notices.recognize(notice(**values))
        assert got is not None
        # A text can read as an earlier, more specific template only if it is one.
        assert got.kind == notice.kind or notices.ALL.index(got) < notices.ALL.index(notice)


def test_the_specific_rejections_are_told_from_the_generic_one() -> None:
    assert notices.recognize("name rejected: 'eve' is banned: spam") is notices.NAME_BANNED
    assert notices.recognize("name rejected: 'eve' is already taken") is notices.NAME_TAKEN
    assert notices.recognize("name rejected: the name is empty") is notices.NAME_INVALID
    assert notices.recognize("message not sent: nobody called 'x' is online") is (
        notices.NOBODY_CALLED
    )
    assert notices.recognize("an admin's own words") is None
    assert notices.recognize("bob left (kicked) and more") is None  # a name has no space


def test_every_ending_notice_maps_to_exactly_one_client_outcome() -> None:
    ending = {n.kind for n in notices.ALL if n.ends}
    assert set(session.OUTCOMES) == ending
    for notice in notices.ALL:
        text = notice(**{f: SAMPLE[f] for f in fields_of(notice)})
        got = session.ending(text)
        assert (got is notice) if notice.ends else (got is None), notice.kind


def test_kinds_are_unique_but_help() -> None:
    kinds = [n.kind for n in notices.ALL if n.kind != "help"]
    assert len(kinds) == len(set(kinds))


def test_parenthesized_reason() -> None:
    assert notices.parenthesized("spam") == " (spam)"
    assert notices.parenthesized("") == ""


def test_utc_times() -> None:
    assert notices.utc(0) == "1970-01-01 00:00:00 UTC"
    assert control.iso(0) == "1970-01-01T00:00:00Z"
    assert control.iso(None) is None


# Senders.


@pytest.mark.parametrize(
    ("sender", "kind", "name"),
    [
        ("chatd", "notice", "chatd"),
        ("alice", "message", "alice"),
        ("alice (private)", "private", "alice"),
        ("* alice", "action", "alice"),
        (" (private)", "message", " (private)"),
        ("a b (private)", "message", "a b (private)"),
        ("* a b", "message", "* a b"),
        ("* ", "message", "* "),
    ],
)
def test_read_sender(sender: str, kind: str, name: str) -> None:
    assert chat.read_sender(sender) == (kind, name, "")


def test_marker_forms_round_trip() -> None:
    assert chat.read_sender(chat.private_sender("bob")) == ("private", "bob", "")
    assert chat.read_sender(chat.action_sender("bob")) == ("action", "bob", "")
    assert chat.read_sender(chat.sent_sender("bob", "al")) == ("sent", "bob", "al")
    assert chat.read_sender("bob ->  al (private)")[0] == "message"
    assert chat.read_sender("b b -> al (private)")[0] == "message"


@pytest.mark.parametrize(
    ("line", "quit"),
    [
        ("/quit", True),
        ("  /QUIT bye", True),
        ("/quitter", False),
        ("quit", False),
        ("//quit", False),
    ],
)
def test_is_quit(line: str, quit: bool) -> None:
    assert chat.is_quit(line) is quit


def test_long_unknown_commands_are_shown_cut() -> None:
    reply = chat.parse("/" + "x" * 40)
    assert reply == chat.Reply((f"unknown command /{'x' * 32}...; /help lists the commands",))
    assert chat.parse("/" + "y" * 32) == chat.Reply(
        (f"unknown command /{'y' * 32}; /help lists the commands",)
    )


# The token bucket.


def test_a_bucket_starts_full_and_refills_at_its_rate() -> None:
    b = TokenBucket(rate=2, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.full(0.0) is False
    assert b.delay(0.0) == pytest.approx(0.5)
    assert b.take(0.49) is False
    assert b.take(0.5) is True
    assert b.full(2.0) is True  # 1.5 s at 2 a second: full again
    assert b.full(1.99) is False


def test_a_bucket_never_holds_more_than_its_burst() -> None:
    b = TokenBucket(rate=100, burst=2, now=0.0)
    assert b.take(1000.0) and b.take(1000.0) and not b.take(1000.0)
    assert b.delay(1000.0) == pytest.approx(0.01)


def test_a_failed_take_keeps_what_accrued() -> None:
    b = TokenBucket(rate=1, burst=1, now=0.0)
    assert b.take(0.0)
    assert not b.take(0.6)
    assert b.take(1.0)  # 0.6 + 0.4, not 0.4 alone
    assert b.tokens == pytest.approx(0.0)


def test_a_bucket_without_a_rate_never_refills() -> None:
    b = TokenBucket(rate=0, burst=1, now=0.0)
    assert b.take(0.0) and not b.take(1e9)
    assert b.delay(1e9) == math.inf
    assert b.delay(0.0) == math.inf
    assert TokenBucket(rate=0, burst=1, now=0.0).delay(5.0) == 0.0


def test_delay_is_zero_with_a_token_there() -> None:
    assert TokenBucket(rate=1, burst=1, now=0.0).delay(0.0) == 0.0


# Durations.


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"),
     (86399, "23h59m"), (86400, "1d00h"), (90000, "1d01h"), (-5, "0s")],
)  # fmt: skip
def test_format_duration(seconds: float, text: str) -> None:
    assert control.format_duration(seconds) == text


def test_duration_limits() -> None:
    assert control.parse_duration("5200w") == 5200 * 7 * 86400
    with pytest.raises(ValueError, match="from 1s to 100 years"):
        control.parse_duration("5300w")
    with pytest.raises(ValueError, match="from 1s to 100 years"):
        control.parse_duration("0s")
