"""chatd.wire's small pieces in detail: how a notice template reads a text back, the
registry recognize() walks, the in-band command grammar's edges, the token bucket's
arithmetic and the one-line OS error."""

from __future__ import annotations

import errno

import pytest

from chatd.wire import chat, notices
from chatd.wire.errors import os_reason
from chatd.wire.notices import Notice
from chatd.wire.tokenbucket import TokenBucket

# A template made now, not at import: what it keeps and how it reads texts back.


def test_a_notice_keeps_its_kind_template_and_ending() -> None:
    n = Notice("probe", "{name} waved")
    assert (n.kind, n.template, n.ends) == ("probe", "{name} waved", False)
    assert n(name="bob") == "bob waved"
    assert repr(n) == "<Notice probe>"
    assert Notice("last", "bye", ends=True).ends is True


def test_a_name_field_is_one_word() -> None:
    n = Notice("probe", "{name} waved")
    assert n.match("bob waved") == {"name": "bob"}
    assert n.match("bob and eve waved") is None
    assert n.match(" waved") is None
    assert n.match("bob waved back") is None  # the whole text, not a prefix


def test_a_quoted_name_and_the_other_fields_take_any_text() -> None:
    n = Notice("probe", "{name!r} said: {text}")
    assert n.match("'bob the builder' said: a b") == {"name": "'bob the builder'", "text": "a b"}
    assert n.match("'x' said: two\nlines") == {"name": "'x'", "text": "two\nlines"}
    assert n.match("'x' said: ") == {"name": "'x'", "text": ""}
    assert Notice("probe", "why: {problem}").match("why: it has spaces") == {
        "problem": "it has spaces"
    }


def test_literal_text_is_matched_literally_braces_included() -> None:
    n = Notice("probe", "{{{name}}} (said) {text}.")
    assert n(name="bob", text="hi") == "{bob} (said) hi."
    assert n.match("{bob} (said) hi.") == {"name": "bob", "text": "hi"}
    assert n.match("{bob} xsaidx hi.") is None  # the parentheses are not a group
    assert n.match("{bob} (said) hi!") is None  # nor is the dot any character
    assert Notice("probe", "all literal").match("all literal") == {}
    assert Notice("probe", "all literal").match("all literals") is None


def test_a_notice_registered_now_is_recognized(monkeypatch: pytest.MonkeyPatch) -> None:
    registry: list[Notice] = []
    monkeypatch.setattr(notices, "ALL", registry)
    first = notices._notice("first", "{name} left")
    last = notices._notice("last", "gone: {why}", ends=True)
    assert registry == [first, last]
    assert (first.kind, first.template, first.ends) == ("first", "{name} left", False)
    assert (last.kind, last.template, last.ends) == ("last", "gone: {why}", True)
    assert notices.recognize("bob left") is first
    assert notices.recognize("gone: for good") is last
    assert notices.recognize("bob joined") is None


def test_match_of_another_text_is_none() -> None:
    assert notices.JOINED.match("bob left (quit)") is None
    assert notices.LEFT.match("bob left (quit)") == {"name": "bob", "reason": "quit"}


# The in-band commands' grammar at its edges.


def test_an_unknown_command_is_shown_whole_up_to_32_characters() -> None:
    assert chat.parse("/" + "z" * 33) == chat.Reply(
        (f"unknown command /{'z' * 32}...; /help lists the commands",)
    )
    assert chat.parse("/FROB now") == chat.Reply(
        ("unknown command /FROB; /help lists the commands",)
    )


def test_only_a_line_starting_with_a_slash_is_a_quit() -> None:
    assert chat.is_quit("/quit") is True
    assert chat.is_quit("xquit") is False  # parse() skips the first character
    assert chat.is_quit("  /Quit now  ") is True
    assert chat.is_quit("/who") is False


def test_msg_takes_the_first_word_as_the_name_and_keeps_the_rest() -> None:
    assert chat.parse("/msg bob  hi  there ") == chat.Private("bob", "hi  there ")
    assert chat.parse("/me  waves ") == chat.Act("waves")


# The token bucket's arithmetic.


def test_delay_counts_the_fraction_of_a_token_already_there() -> None:
    b = TokenBucket(rate=2, burst=1, now=0.0)
    assert b.take(0.0)
    assert b.delay(0.25) == pytest.approx(0.25)  # half a token there, half to come
    assert b.delay(0.5) == 0.0


@pytest.mark.parametrize(("rate", "wait"), [(1, 1.0), (0.5, 2.0), (4, 0.25)])
def test_delay_at_rates_at_and_below_one(rate: float, wait: float) -> None:
    b = TokenBucket(rate=rate, burst=1, now=0.0)
    assert b.take(0.0)
    assert b.delay(0.0) == pytest.approx(wait)


def test_a_full_bucket_stays_full_at_its_burst() -> None:
    b = TokenBucket(rate=1, burst=2, now=0.0)
    assert b.take(0.0)
    assert b._refill(1.0) == 2.0
    assert b._refill(5.0) == 2.0
    assert b.tokens == 2.0 and b.stamp == 5.0
    assert repr(b) == "<TokenBucket 2.00/2 +1/s>"


# OS errors in one line.


def test_os_reason_is_the_error_in_lower_case() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert os_reason(refused) == "connection refused"
    assert os_reason(OSError("Socket Path Too Long")) == "socket path too long"
    assert os_reason(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")) == (
        "no such file or directory"
    )


def test_a_list_of_names_shows_the_first_and_counts_the_others() -> None:
    assert notices.names_and_others(["a"], 2) == "a"
    assert notices.names_and_others(["a", "b"], 2) == "a and b"
    assert notices.names_and_others(["a", "b", "c"], 2) == "a, b and c"  # never "1 others"
    assert notices.names_and_others(["a", "b", "c", "d"], 2) == "a, b and 2 others"
    text = notices.JOINED_MANY(names=notices.names_and_others(["a", "b", "c", "d"], 2))
    assert text == "a, b and 2 others joined"
    assert notices.recognize(text) is notices.JOINED_MANY
    assert notices.recognize("a joined") is notices.JOINED  # one join: its own notice
