"""ban, unban and bans against the real daemon: the handshake, expiry, restarts."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import NOTICE, Client, Daemon, run_chatd_with


def refused(d: Daemon, name: str) -> list[tuple[str, str]]:
    """What a client joining as ``name`` gets before the daemon closes it."""
    c = Client(d.port)
    c.send(name)
    return c.expect_closed()


def joins(d: Daemon, name: str, timeout: float = 5.0) -> bool:
    """Whether ``name`` can join within ``timeout``, retrying while it is refused."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = Client(d.port)
        c.send(name)
        sender, text = c.recv()
        c.close()
        if (sender, text[:15]) != (NOTICE, "name rejected: "):
            return sender == NOTICE and text.startswith(f"welcome, {name}")
        time.sleep(0.1)
    return False


def test_a_banned_name_is_refused_at_the_handshake(daemon: Daemon) -> None:
    r = daemon.ctl("ban", "carol", "--reason", "spamming")
    assert (r.returncode, r.stdout) == (0, "banned name carol until lifted: spamming\n"), r.stderr
    assert refused(daemon, "carol") == [(NOTICE, "name rejected: 'carol' is banned: spamming")]
    assert refused(daemon, "CAROL") == [(NOTICE, "name rejected: 'CAROL' is banned: spamming")]
    daemon.wait_for("rejected", reason="banned", name="carol")
    daemon.wait_for("ban", kind="name", target="carol", reason="spamming")
    assert daemon.result("stats")["rejected"] == {"banned": 2}
    daemon.client("caroline")  # only that name

    r = daemon.ctl("unban", "Carol")
    assert (r.returncode, r.stdout) == (0, "lifted the ban on name carol\n"), r.stderr
    daemon.client("carol")


def test_banning_an_online_user_disconnects_them(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    bob = daemon.client("bob")
    alice.expect(NOTICE, "bob joined")
    r = daemon.ctl("--json", "ban", "bob", "--for", "1h", "--reason", "trolling")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["disconnected"] == ["bob"] and result["replaced"] is False
    ban = result["ban"]
    assert (ban["kind"], ban["target"], ban["reason"], ban["by"]) == ("name", "bob", "trolling", 0)
    assert 3590 < ban["remaining"] <= 3600 and ban["expires"].endswith("Z")
    (notice,) = bob.expect_closed()
    assert notice[0] == NOTICE
    assert notice[1].startswith("you were banned by an admin until ")
    assert notice[1].endswith(" UTC: trolling")
    alice.expect(NOTICE, "bob was banned (trolling)")
    daemon.wait_for("leave", user="bob", reason="banned")


def test_an_address_ban_refuses_the_connection_before_the_name(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    r = daemon.ctl("ban", "127.0.0.2", "--reason", "lab machine")
    assert r.stdout == "banned address 127.0.0.2/32 until lifted: lab machine\n", r.stderr
    c = Client(daemon.port, source="127.0.0.2")
    assert c.expect_closed() == [
        (NOTICE, "connection refused: your address is banned: lab machine")
    ]
    daemon.wait_for("rejected", reason="banned", ban="127.0.0.2/32")
    daemon.client("bob")  # from 127.0.0.1: welcome
    alice.expect(NOTICE, "bob joined")


def test_a_network_ban_disconnects_whoever_it_covers(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    r = daemon.ctl("--json", "ban", "127.0.0.0/8")
    assert json.loads(r.stdout)["disconnected"] == ["alice"]
    assert alice.expect_closed() == [(NOTICE, "you were banned by an admin")]
    c = Client(daemon.port)
    assert c.expect_closed() == [(NOTICE, "connection refused: your address is banned")]
    assert daemon.ctl("unban", "127.0.0.1/8").returncode == 0  # the same network
    daemon.client("alice")


def test_a_timed_ban_expires(daemon: Daemon) -> None:
    assert daemon.ctl("ban", "dave", "--for", "2s").returncode == 0
    assert refused(daemon, "dave")[0][1].startswith("name rejected: 'dave' is banned until ")
    assert joins(daemon, "dave", timeout=10)
    assert daemon.result("bans") == {"bans": []}
    daemon.wait_for("ban_expired", kind="name", target="dave")
    assert json.loads(Path(daemon.config["state_file"]).read_text())["bans"] == []
    r = daemon.ctl("unban", "dave")
    assert (r.returncode, r.stderr) == (1, "chatctl: unban: 'dave' is not banned\n")


def test_bans_table_and_json(daemon: Daemon) -> None:
    r = daemon.ctl("bans")
    assert (r.returncode, r.stdout) == (0, "no bans\n")
    daemon.ctl("ban", "eve", "--reason", "spam")
    daemon.ctl("ban", "10.0.0.0/8", "--for", "2h")
    daemon.ctl("ban", "--name", "1.2.3.4")  # a name that looks like an address
    lines = daemon.ctl("bans").stdout.splitlines()
    assert lines[0].split() == ["TARGET", "KIND", "EXPIRES", "LEFT", "SINCE", "BY", "UID", "REASON"]
    assert lines[1].split()[:3] == ["eve", "name", "never"] and lines[1].endswith("spam")
    assert lines[2].split()[:2] == ["10.0.0.0/8", "address"] and lines[2].split()[5] in (
        "1h59m",
        "2h00m",
    )
    assert lines[3].split()[:2] == ["1.2.3.4", "name"]
    bans = json.loads(daemon.ctl("bans", "--json").stdout)["bans"]
    assert [(b["kind"], b["target"]) for b in bans] == [
        ("name", "eve"),
        ("address", "10.0.0.0/8"),
        ("name", "1.2.3.4"),
    ]
    assert bans[0]["expires"] is None and bans[0]["remaining"] is None
    assert daemon.ctl("unban", "1.2.3.4").returncode == 0  # found as a name
    assert len(daemon.result("bans")["bans"]) == 2
    r = daemon.ctl("ban", "eve", "--reason", "again")
    assert r.stdout == "updated ban: name eve until lifted: again\n"


def test_bad_ban_targets(daemon: Daemon) -> None:
    r = daemon.ctl("ban", "two words")
    assert (r.returncode, r.stderr) == (
        1,
        "chatctl: ban: not a user name: the name contains a space\n",  # said once, not twice
    )
    r = daemon.ctl("ban", "eve", "--reason", "tab\x01")
    assert (r.returncode, r.stderr) == (
        1,
        "chatctl: ban: reason may not contain control characters such as newlines or escapes\n",
    )
    reply = daemon.request("ban", target="10.0.0.300", kind="address")
    assert reply["error"] == "ban: not an IP address or network (CIDR): '10.0.0.300'"
    reply = daemon.request("ban", target="x", duration="forever")
    assert reply["error"].startswith("ban: expected a duration")
    reply = daemon.request("ban", target="x", kind="user")
    assert reply["error"] == "ban: kind must be name or address, got 'user'"
    assert daemon.result("bans") == {"bans": []}


@pytest.mark.parametrize("target", ["10.0.0.0/33", "300.1.1.1", "10.0.0.1/abc", "fe80::1::2"])
def test_a_mistyped_address_is_refused_not_banned_as_a_name(daemon: Daemon, target: str) -> None:
    r = daemon.ctl("ban", target)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (
        f"chatctl: ban: not an IP address or network (CIDR): {target!r} "
        "(to ban a name that looks like one, use --name)\n"
    )
    assert daemon.result("bans") == {"bans": []}
    r = daemon.ctl("ban", "--name", target)  # meant as a name, it is one
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"banned name {target} until lifted\n"
    assert daemon.ctl("unban", target).returncode == 0
    # Names are not mistaken for addresses.
    r = daemon.ctl("ban", "cafe.42")
    assert (r.returncode, r.stdout) == (0, "banned name cafe.42 until lifted\n"), r.stderr


def test_bans_survive_a_restart(start: Callable[..., Daemon], tmp_path: Path) -> None:
    state = tmp_path / "lib" / "state.json"
    first = start({"state_file": str(state)})
    assert first.ctl("ban", "eve", "--reason", "spam").returncode == 0
    assert first.ctl("ban", "10.9.0.0/16", "--for", "1h").returncode == 0
    before = first.result("bans")["bans"]
    assert first.stop() == 0
    assert json.loads(state.read_text())["version"] == 1

    second = start({"state_file": str(state)})
    assert second.wait_for("startup")["bans"] == 2
    after = second.result("bans")["bans"]
    assert [{**b, "remaining": None} for b in after] == [{**b, "remaining": None} for b in before]
    assert refused(second, "eve") == [(NOTICE, "name rejected: 'eve' is banned: spam")]


def test_a_ban_for_months_survives_a_restart_and_the_daemon_too(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    # A ban's expiry timer used to be the loop's only timer: select() was asked
    # to wait 90 days, more than epoll can (about 24.8 days), and chatd died of
    # "OverflowError: timeout is too large" just after its start.
    state = tmp_path / "lib" / "state.json"
    first = start({"state_file": str(state)})
    assert first.ctl("ban", "eve", "--for", "90d").returncode == 0
    assert first.stop() == 0

    second = start({"state_file": str(state)})
    assert second.wait_for("startup")["bans"] == 1
    time.sleep(0.5)  # the loop's first select()
    assert second.proc.poll() is None, second.stderr
    assert [b["target"] for b in second.result("bans")["bans"]] == ["eve"]
    assert refused(second, "eve")[0][1].startswith("name rejected: 'eve' is banned until ")
    assert not second.find("internal_error")


def test_a_ban_that_cannot_be_saved_is_not_applied(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    d = start({"state_file": str(lib / "state.json")})
    lib.rmdir()
    lib.write_text("")  # the directory is gone, a file is in its way
    r = d.ctl("ban", "eve")
    assert r.returncode == 1
    assert r.stderr == (
        f"chatctl: ban: ban not applied: cannot write {lib / 'state.json'}: "
        f"{lib} is not a directory\n"
    )
    assert d.result("bans") == {"bans": []}
    d.client("eve")


def test_a_corrupt_state_file_stops_the_start(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{ not json")
    r = run_chatd_with(
        tmp_path, {"control": {"socket": str(tmp_path / "admin.sock")}, "state_file": str(state)}
    )
    assert r.returncode == 1
    assert r.stderr.startswith(f"chatd: error: cannot read {state}: not a chatd state file")
    assert not (tmp_path / "admin.sock").exists()


@pytest.mark.parametrize(
    "ban",
    [
        '{"kind": "name", "target": "eve"}',  # fields missing
        "1",  # not an object
        '{"kind": "name", "target": "eve", "reason": "", "created": 0, "expires": null,'
        ' "by": 0, "until": 5}',  # a field too many
    ],
)
def test_a_hand_edited_ban_is_named_in_plain_words(tmp_path: Path, ban: str) -> None:
    state = tmp_path / "state.json"
    state.write_text(f'{{"version": 1, "bans": [{ban}]}}')
    r = run_chatd_with(
        tmp_path, {"control": {"socket": str(tmp_path / "admin.sock")}, "state_file": str(state)}
    )
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (
        f"chatd: error: cannot read {state}: ban 0: expected an object with the fields "
        "kind, target, reason, created, expires, by\n"
    )


def test_a_ban_time_past_any_calendar_is_refused(tmp_path: Path) -> None:
    # 1e300 seconds has no date: listing the bans would fail on it.
    state = tmp_path / "state.json"
    state.write_text(
        '{"version": 1, "bans": [{"kind": "name", "target": "eve", "reason": "",'
        ' "created": 0, "expires": 1e300, "by": 0}]}'
    )
    r = run_chatd_with(
        tmp_path, {"control": {"socket": str(tmp_path / "admin.sock")}, "state_file": str(state)}
    )
    assert (r.returncode, r.stderr) == (1, f"chatd: error: cannot read {state}: ban 0: bad time\n")


def _start_on(tmp_path: Path, bans: str) -> subprocess.CompletedProcess[str]:
    state = tmp_path / "state.json"
    state.write_text(f'{{"version": 1, "bans": [{bans}]}}' if bans.startswith("{") else bans)
    return run_chatd_with(
        tmp_path, {"control": {"socket": str(tmp_path / "admin.sock")}, "state_file": str(state)}
    )


@pytest.mark.parametrize(
    ("ban", "error"),
    [
        (
            '{"kind": "name", "target": "eve", "reason": "spam\\u001b[2J\\nmore", "created": 0,'
            ' "expires": null, "by": 0}',
            "ban 0: bad reason 'spam\\x1b[2J\\nmore': control characters such as newlines or "
            "escapes",
        ),
        (
            '{"kind": "name", "target": "ev\\ne", "reason": "", "created": 0, "expires": null,'
            ' "by": 0}',
            "ban 0: bad name 'ev\\ne': the name contains a control character (U+000A)",
        ),
        ("[" * 100000, "not a chatd state file (nested too deeply)"),
    ],
    ids=["escape-in-reason", "newline-in-name", "deep"],
)
def test_a_hand_edited_state_file_is_checked_as_the_commands_check(
    tmp_path: Path, ban: str, error: str
) -> None:
    r = _start_on(tmp_path, ban)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"chatd: error: cannot read {tmp_path / 'state.json'}: {error}\n"


def test_an_address_written_another_way_is_lifted_either_way(start: Any, tmp_path: Path) -> None:
    state = tmp_path / "kept.json"
    for spelling in ("::ffff:127.0.0.2", "127.0.0.2"):
        state.write_text(
            '{"version": 1, "bans": [{"kind": "address", "target": "::ffff:127.0.0.2", '
            '"reason": "", "created": 0, "expires": null, "by": 0}]}'
        )
        d = start({"state_file": str(state)})
        assert d.result("bans")["bans"][0]["target"] == "127.0.0.2/32"
        assert d.result("unban", target=spelling)["unbanned"]["target"] == "127.0.0.2/32"
        d.stop()
