"""The admin commands (chatd.core.admin) in detail: a ban's reply document, the limits
of a notice's text, the hint for a name that looks like an address, how handle()
logs a bug, and how commands are registered."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from fakes import WALL0, Room
from structlog.testing import capture_logs
from unit_host import logger_names

from chatd.core import admin
from chatd.core.admin import Admin, ban_json, handle
from chatd.core.bans import Ban

ROOT = Admin(pid=1, uid=0, gid=0)


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    structlog.reset_defaults()
    with capture_logs() as captured:
        yield captured


class Daemon:
    """The server as the admin commands see it."""

    def __init__(self, **settings: Any) -> None:
        self.room = Room(**settings)
        self.chat = self.room.chat
        self.broken = False

    def reload(self) -> tuple[list[str], list[str]]:
        return [], []

    def counters(self) -> dict[str, int]:
        if self.broken:
            raise RuntimeError("a bug in counters()")
        return {"connections": 0, "bytes_in": 0, "bytes_out": 0}

    def ask(self, cmd: str, **args: Any) -> dict[str, Any]:
        return handle(self, ROOT, json.dumps({"cmd": cmd, "args": args}).encode())


def error(reply: dict[str, Any]) -> tuple[str, str]:
    assert reply["ok"] is False, reply
    return reply["code"], reply["error"]


# The reply document of a ban.


def test_ban_json_of_a_timed_ban() -> None:
    ban = Ban("name", "eve", "spam", WALL0, WALL0 + 600.12345, 1000)
    assert ban_json(ban, WALL0) == {
        "kind": "name",
        "target": "eve",
        "reason": "spam",
        "created": "2027-01-15T08:00:00Z",
        "expires": "2027-01-15T08:10:00Z",
        "remaining": 600.123,
        "by": 1000,
    }
    assert ban_json(ban, WALL0 + 600)["remaining"] == 0.123
    assert ban_json(ban, WALL0 + 700)["remaining"] == 0.0  # expired: nothing remains


def test_ban_json_of_a_ban_until_lifted() -> None:
    ban = Ban("address", "10.0.0.0/8", "", WALL0 + 1, None, 0)
    assert ban_json(ban, WALL0 + 5) == {
        "kind": "address",
        "target": "10.0.0.0/8",
        "reason": "",
        "created": "2027-01-15T08:00:01Z",
        "expires": None,
        "remaining": None,
        "by": 0,
    }


def test_a_ban_reply_is_its_document() -> None:
    d = Daemon()
    reply = d.ask("ban", target="eve", duration="1h", reason="spam")
    assert reply == {
        "ok": True,
        "result": {
            "ban": ban_json(Ban("name", "eve", "spam", WALL0, WALL0 + 3600, 0), WALL0),
            "replaced": False,
            "disconnected": [],
        },
    }


# The text of a notice or a reason.


def test_a_text_of_1024_characters_is_the_longest() -> None:
    d = Daemon()
    assert d.ask("say", text="x" * 1024) == {"ok": True, "result": {"recipients": 0}}
    assert error(d.ask("say", text="x" * 1025)) == (
        "bad_request",
        "say: text is longer than 1024 characters",
    )
    assert error(d.ask("kick", name="eve", reason="r" * 1025)) == (
        "bad_request",
        "kick: reason is longer than 1024 characters",
    )


def test_a_text_must_leave_room_for_its_notice_in_a_short_header() -> None:
    d = Daemon(header_length=3, max_message_bytes=999)
    assert d.ask("say", text="x" * 799)["ok"] is True  # 799 + 200 bytes fit in 999
    assert error(d.ask("say", text="x" * 800)) == (
        "bad_request",
        "say: text is too long for the 3-byte frame header",
    )
    assert error(d.ask("ban", target="eve", reason="é" * 400)) == (
        "bad_request",
        "ban: reason is too long for the 3-byte frame header",
    )


# What a ban names.


def test_a_name_that_looks_like_an_address_is_told_how_to_ban_it() -> None:
    assert error(Daemon().ask("ban", target=" 10.0.0.0/33 ")) == (
        "bad_request",
        "ban: not an IP address or network (CIDR): '10.0.0.0/33' "
        "(to ban a name that looks like one, use --name)",
    )


def test_a_banned_name_may_be_up_to_1024_bytes() -> None:
    d = Daemon()
    assert d.ask("ban", target="x" * 1024)["ok"] is True
    assert error(d.ask("ban", target="x" * 1025)) == (
        "bad_request",
        "ban: not a user name: the name is 1025 bytes long, the limit is 1024",
    )


# A bug in a command.


def test_a_bug_is_logged_with_the_start_of_the_request(logs: list[dict[str, Any]]) -> None:
    d = Daemon()
    d.broken = True
    head = b'{"cmd": "stats", "id": "'
    line = head + b"x" * (199 - len(head)) + "é".encode() + b'"}'  # é across byte 200
    reply = handle(d, ROOT, line)
    assert reply == {
        "ok": False,
        "error": "internal error (see the chatd log)",
        "code": "internal",
        "id": "x" * 175 + "é",
    }
    assert [e for e in logs if e["event"] == "control_internal_error"] == [
        {
            "event": "control_internal_error",
            "log_level": "error",
            "exc_info": True,
            "request": line[:199].decode() + "\ufffd",
        }
    ]


def test_the_admin_commands_log_to_the_chatd_logger() -> None:
    d = Daemon()
    d.room.join("eve")
    with logger_names() as names:
        assert d.ask("kick", name="eve")["ok"] is True
        assert d.ask("say", text="hello")["ok"] is True
        d.broken = True
        assert d.ask("stats")["code"] == "internal"
    assert len(names) >= 3
    assert set(names) == {("chatd",)}


# Registration.


def test_a_command_registers_its_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    handlers: dict[str, Any] = {}
    monkeypatch.setattr(admin, "HANDLERS", handlers)

    def stats(daemon: Any, who: Admin, args: dict[str, Any]) -> Any:
        return {}

    assert admin.command("stats")(stats) is stats
    assert handlers == {"stats": stats}
    with pytest.raises(AssertionError):
        admin.command("nope")(stats)  # a command the protocol does not have
    assert handlers == {"stats": stats}
