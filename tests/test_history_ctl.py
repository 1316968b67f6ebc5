"""chatctl history, forget and the history in stats: against the real daemon, and the
pure parts (--since, the text formats)."""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import NOTICE, Client, Daemon, wait_until

from chatd.ctl import main as ctl

FAST = {"flood": {"rate": 0}}


def replay_of(c: Client) -> list[tuple[str, str]]:
    assert c.replayed is not None
    return c.replayed


def test_chatctl_history_forget_and_stats(start: Callable[..., Daemon]) -> None:
    d = start(FAST)
    alice = d.client("alice")
    eve = d.client("Eve", source="127.0.0.2")
    alice.expect(NOTICE, "Eve joined")
    alice.send("hello")
    d.wait_for("message", text="hello")
    eve.send("spam one")
    eve.send("spam two")
    d.wait_for("message", text="spam two")
    alice.send("bye")
    d.wait_for("message", text="bye")
    out = d.ctl("history")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(" ", 3)[3] for line in lines] == [
        "alice: hello",
        "Eve: spam one",
        "Eve: spam two",
        "alice: bye",
    ]
    assert d.ctl("history", "--limit", "1").stdout.endswith(" alice: bye\n")
    js = json.loads(d.ctl("history", "--json", "--user", "eve").stdout)
    assert [m["text"] for m in js["messages"]] == ["spam one", "spam two"]
    assert set(js["messages"][0]) == {"id", "time", "name", "text"}
    assert d.ctl("history", "--since", "1h").stdout.count("\n") == 4
    assert d.ctl("history", "--since", "2099-01-01").stdout == "no messages\n"
    bad = d.ctl("history", "--since", "whenever")
    assert bad.returncode == 2 and "expected a time such as" in bad.stderr
    forgot = d.ctl("forget", "EVE")
    assert (forgot.returncode, forgot.stdout) == (0, "forgot 2 messages of EVE\n")
    event = d.wait_for("forget", user="EVE")
    assert event["messages"] == 2 and event["admin_uid"] == os.geteuid()
    assert [m["name"] for m in d.result("history")["messages"]] == ["alice", "alice"]
    newcomer = d.client("newcomer", source="127.0.0.3")
    assert [t for _, t in replay_of(newcomer)] == ["hello", "bye"]
    wait_until("the forget on disk", lambda: d.result("stats")["history"]["messages"] == 2)
    stats = d.ctl("stats").stdout
    assert "history:" in stats and "2 messages since" in stats
    assert re.search(
        rf"^history file: +{re.escape(str(Path(d.config['history']['file'])))}$", stats, re.M
    )
    assert re.search(r"^history state: +complete$", stats, re.M)


def test_memory_only_stats(start: Callable[..., Daemon]) -> None:
    d = start({"history": {"file": ""}})
    stats = d.ctl("stats").stdout
    assert re.search(r"^history file: +memory only$", stats, re.M)
    assert re.search(r"^history: +0 messages$", stats, re.M)
    assert "write lag" not in stats


def test_stats_say_when_the_history_is_incomplete() -> None:
    history = {
        "kept": True,
        "file": "/var/lib/chatd/history.sqlite3",
        "messages": 1,
        "oldest": "2026-11-25T14:03:07Z",
        "complete": False,
        "lost": 3,
        "pending": 12,
        "write_lag": 4.5,
        "write_lag_p99": 0.08,
        "write_lag_max": 0.12,
    }
    result = {
        "started": "2026-11-25T14:00:00Z",
        "uptime": 60,
        "users": 1,
        "peak_users": 1,
        "connections": 1,
        "connections_total": 1,
        "messages": 1,
        "deliveries": 0,
        "bytes_in": 0,
        "bytes_out": 0,
        "rejected": {},
        "evictions": 0,
        "flood_dropped": 0,
        "kicks": 0,
        "bans": 0,
        "history": history,
    }
    text = ctl.show_stats(result)
    assert re.search(r"^history: +1 message since 2026-11-25 ", text, re.M)
    lag = r"^history write lag: +4.5 s now, p99 0.08 s, max 0.12 s; 12 waiting$"
    assert re.search(lag, text, re.M)
    assert re.search(r"^history state: +INCOMPLETE: .*; 3 messages could not be kept$", text, re.M)
    off = ctl.show_stats({**result, "history": {**history, "kept": False}})
    assert re.search(r"^history: +off \(history.keep_messages is 0\)$", off, re.M)


NOW = 1_795_615_200.0  # 2026-11-25 14:00:00 UTC


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("90m", "2026-11-25T12:30:00Z"),
        ("2026-11-24T08:00Z", "2026-11-24T08:00:00Z"),
        ("2026-11-24 08:00:05Z", "2026-11-24T08:00:05Z"),
        ("10:15Z", "2026-11-25T10:15:00Z"),
        ("2026-11-20Z", "2026-11-20T00:00:00Z"),
    ],
)
def test_since_times(text: str, want: str) -> None:
    assert ctl.since(text, NOW) == want


def test_since_in_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "EST5")
    time.tzset()
    try:
        assert ctl.since("2026-11-25 09:00", NOW) == "2026-11-25T14:00:00Z"
        assert ctl.since("09:30", NOW) == "2026-11-25T14:30:00Z"
        with pytest.raises(argparse.ArgumentTypeError, match="expected a time such as"):
            ctl.since("soon")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_history_and_forget_text() -> None:
    lookalike = "\u0430lice"  # with a Cyrillic a
    result = {
        "messages": [
            {"id": 1, "time": "2026-11-25T14:03:07Z", "name": lookalike, "text": "hi\x1b[2J"},
        ]
    }
    line = ctl.show_history(result)
    assert line.endswith(f" {lookalike} (\\u0430lice): hi\\x1b[2J")  # escaped, as chat does
    assert ctl.show_history({"messages": []}) == "no messages"
    assert ctl.show_forget({"forgotten": "eve", "messages": 1}) == "forgot 1 message of eve"
    args = ctl.parser().parse_args(["history", "-n", "5", "--user", "bob"])
    assert ctl.arguments(args) == {"limit": 5, "user": "bob"}
    assert ctl.arguments(ctl.parser().parse_args(["forget", "bob"])) == {"name": "bob"}
    with pytest.raises(SystemExit):
        ctl.parser().parse_args(["history", "--limit", "0"])
