"""The admin commands (chatd.core.admin) against a fake daemon: no socket, a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from fakes import ROOT, WALL0, FakeDaemon

from chatd.core.admin import handle
from chatd.wire import control


def test_every_command_of_the_protocol_has_a_handler() -> None:
    from chatd.core.admin import HANDLERS

    assert set(HANDLERS) == set(control.COMMANDS)


def test_list_in_order_of_connection() -> None:
    d = FakeDaemon()
    d.room.join("bob")
    d.room.host.advance(5)
    d.room.join("alice")
    d.room.host.advance(2)
    users = d.result("list")["users"]
    assert [u["name"] for u in users] == ["bob", "alice"]
    assert users[0]["idle"] == 7 and users[1]["idle"] == 2
    assert users[0]["since"] == control.iso(WALL0)


def test_kick_and_its_errors() -> None:
    d = FakeDaemon()
    eve = d.room.join("Eve")
    assert d.result("kick", name="eve", reason=" spam ") == {"kicked": "Eve", "reason": "spam"}
    assert eve.notices()[-1] == "you were kicked by an admin: spam"
    assert d.error("kick", name="eve") == ("not_found", "no user named 'eve' is online")
    assert d.error("kick", name="x", reason="a\nb") == (
        "bad_request",
        "kick: reason may not contain control characters such as newlines or escapes",
    )
    assert d.error("kick", name="x", reason="r" * 1025)[1] == (
        "kick: reason is longer than 1024 characters"
    )


def test_say_counts_its_recipients() -> None:
    d = FakeDaemon()
    d.room.join("a"), d.room.join("b")
    assert d.result("say", text="maintenance at noon") == {"recipients": 2}
    assert d.error("say", text="  ") == ("bad_request", "say: text is empty")


def test_a_reason_must_fit_a_short_header() -> None:
    d = FakeDaemon(header_length=3, max_message_bytes=999, max_name_bytes=32)
    assert d.error("say", text="x" * 800)[1] == "say: text is too long for the 3-byte frame header"


def test_stats_add_the_daemon_counters() -> None:
    d = FakeDaemon()
    d.room.join("a")
    d.room.host.advance(3)
    st = d.result("stats")
    assert (st["users"], st["connections"], st["connections_total"]) == (1, 7, 1)
    assert (st["bytes_in"], st["bytes_out"], st["uptime"] >= 0) == (100, 200, True)


def test_metrics_is_the_daemons_text() -> None:
    daemon = FakeDaemon()
    assert daemon.result("metrics") == {"text": daemon.metrics_text()}
    assert daemon.error("metrics", full=True) == (
        "bad_request",
        "metrics: unknown argument 'full' (arguments: none)",
    )


def test_reload_and_a_failed_one() -> None:
    d = FakeDaemon()
    assert d.result("reload") == {"applied": ["flood.rate"], "needs_restart": ["listen"]}
    d.reload_error = "chatd.yaml: flood.rate: expected a number"
    assert d.error("reload") == (
        "failed",
        "reload failed, the old config stays: chatd.yaml: flood.rate: expected a number",
    )


def test_ban_saves_enforces_and_expires() -> None:
    d = FakeDaemon()
    d.room.join("eve")
    got = d.result("ban", target="EVE", duration="10m", reason="spam")
    assert got["ban"]["kind"] == "name" and got["ban"]["remaining"] == 600
    assert got["disconnected"] == ["eve"] and got["replaced"] is False
    assert len(d.room.host.saved) == 1
    assert d.result("ban", target="eve")["replaced"] is True
    assert [b["target"] for b in d.result("bans")["bans"]] == ["eve"]
    assert d.result("unban", target="EVE")["unbanned"]["target"] == "eve"
    assert d.error("unban", target="eve") == ("not_found", "'eve' is not banned")


def test_address_bans_are_normalised_and_lifted_by_either_spelling() -> None:
    d = FakeDaemon()
    assert d.result("ban", target="::ffff:10.0.0.7")["ban"]["target"] == "10.0.0.7/32"
    assert d.result("unban", target="10.0.0.7")["unbanned"]["kind"] == "address"
    d.result("ban", target="::ffff:10.1.2.0/120")
    assert d.result("bans")["bans"][0]["target"] == "10.1.2.0/24"


def test_a_name_that_looks_like_an_address_needs_kind_name() -> None:
    d = FakeDaemon()
    code, error = d.error("ban", target="10.0.0.0/33")
    assert code == "bad_request" and "not an IP address or network" in error
    assert d.result("ban", target="10.0.0.0/33", kind="name")["ban"]["kind"] == "name"
    assert d.result("unban", target="10.0.0.0/33")["unbanned"]["kind"] == "name"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"target": "a b"}, "ban: not a user name: the name contains a space"),
        ({"target": "x", "kind": "user"}, "ban: kind must be name or address, got 'user'"),
        (
            {"target": "x", "duration": "soon"},
            "ban: expected a duration such as 30s, 10m, 2h, 7d or 1h30m, got 'soon'",
        ),
        ({"target": "x", "kind": "address"}, "ban: not an IP address or network (CIDR): 'x'"),
    ],
)
def test_bad_bans(args: dict[str, Any], error: str) -> None:
    assert FakeDaemon().error("ban", **args) == ("bad_request", error)


def test_a_ban_that_cannot_be_saved_is_not_applied() -> None:
    d = FakeDaemon()
    eve = d.room.join("eve")
    d.result("ban", target="eve", reason="first")
    d.room.host.save_error = "cannot write /x: read-only file system"
    assert d.error("ban", target="eve", reason="second") == (
        "failed",
        "ban not applied: cannot write /x: read-only file system",
    )
    assert d.chat.bans.match_name("eve", WALL0).reason == "first"  # type: ignore[union-attr]
    assert d.error("unban", target="eve")[0] == "failed"
    assert len(d.chat.bans) == 1
    assert eve.state == "gone"


def test_ids_come_back_and_a_bug_is_an_internal_error() -> None:
    d = FakeDaemon()
    reply = handle(d, ROOT, b'{"cmd": "bans", "id": [1, "x"]}')
    assert reply == {"ok": True, "result": {"bans": []}, "id": [1, "x"]}
    reply = handle(d, ROOT, b'{"cmd": "nope", "id": 3}')
    assert (reply["code"], reply["id"]) == ("unknown_command", 3)
    d.counters = None  # type: ignore[assignment,method-assign]
    reply = handle(d, ROOT, b'{"cmd": "stats"}')
    assert reply == {"ok": False, "error": "internal error (see the chatd log)", "code": "internal"}


def test_kick_takes_the_exact_name_and_points_at_a_look_alike() -> None:
    d = FakeDaemon()
    d.room.join("\u0441\u043e\u0440\u0435")  # Cyrillic, looks like "cope"
    assert d.error("kick", name="cope") == (
        "not_found",
        "no user named 'cope' is online ('\\u0441\\u043e\\u0440\\u0435' only looks like it)",
    )
    assert d.result("kick", name="\u0421\u041e\u0420\u0415")["kicked"] == "\u0441\u043e\u0440\u0435"


WIDE = "ban: {} is wider than /{}, much of the Internet or everyone: to mean it, use --all"


@pytest.mark.parametrize(
    ("target", "error"),
    [
        (
            "10.0.0.7/0",
            "ban: 10.0.0.7/0 has host bits set: the network is 0.0.0.0/0; give that if you mean it",
        ),
        (
            "10.1.2.3/24",
            "ban: 10.1.2.3/24 has host bits set: the network is 10.1.2.0/24; "
            "give that if you mean it",
        ),
        ("0.0.0.0/0", WIDE.format("0.0.0.0/0", 8)),
        ("::ffff:0.0.0.0/96", WIDE.format("0.0.0.0/0", 8)),
        ("2000::/15", WIDE.format("2000::/15", 16)),
    ],
)
def test_a_network_is_banned_as_written_and_a_wide_one_only_when_meant(
    target: str, error: str
) -> None:
    d = FakeDaemon()
    d.room.join("bob")
    assert d.error("ban", target=target) == ("bad_request", error)
    assert len(d.chat.bans) == 0 and not d.room.host.saved


def test_a_wide_ban_with_all_disconnects_everyone() -> None:
    d = FakeDaemon()
    d.room.join("bob", "10.1.1.1")
    assert d.result("ban", target="0.0.0.0/0", all=True)["disconnected"] == ["bob"]
    assert d.result("ban", target="10.0.0.0/8")["ban"]["target"] == "10.0.0.0/8"  # /8: fine
