"""Bans and the control protocol's request checks, without sockets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from chatd.core.addresses import parse_network
from chatd.core.bans import Ban, Bans, StateError
from chatd.server import state
from chatd.wire import control
from chatd.wire.control import format_duration, parse_duration

T0 = 1_800_000_000.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1),
        ("90s", 90),
        ("10m", 600),
        ("2h", 7200),
        ("7d", 604800),
        ("1w", 604800),
        ("1h30m", 5400),
        ("1d12h", 129600),
    ],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "m", "1.5h", "-1m", "1 h", "2y", "0s", "0m0s", "1H"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.6, "1m00s"), (61, "1m01s"), (3600, "1h00m"), (90061, "1d01h")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def ban(kind: str, target: str, expires: float | None = None) -> Ban:
    return Ban(kind, target, "why", T0, expires, 0)


def test_name_bans_match_without_regard_to_case() -> None:
    bans = Bans()
    bans.add(ban("name", "Alice"))
    assert bans.match_name("alice", T0) is not None
    assert bans.match_name("ALICE", T0) is not None
    assert bans.match_name("alicia", T0) is None
    assert bans.remove("name", "aLiCe") is not None
    assert bans.match_name("alice", T0) is None


def test_address_bans_match_addresses_and_networks() -> None:
    bans = Bans()
    bans.add(ban("address", str(parse_network("10.1.2.3/24"))))
    bans.add(ban("address", str(parse_network("2001:db8::1"))))
    assert bans.has_address_bans
    assert bans.match_address("10.1.2.200", T0) is not None
    assert bans.match_address("::ffff:10.1.2.7", T0) is not None  # IPv4-mapped
    assert bans.match_address("10.1.3.1", T0) is None
    assert bans.match_address("2001:db8::1", T0) is not None
    assert bans.match_address("2001:db8::2", T0) is None
    assert bans.match_address("not an address", T0) is None
    assert str(parse_network("::ffff:192.168.0.1")) == "192.168.0.1/32"
    assert parse_network("bob") is None


def test_expired_bans_no_longer_match_and_are_pruned() -> None:
    bans = Bans()
    bans.add(ban("name", "eve", expires=T0 + 60))
    bans.add(ban("address", "10.0.0.0/8", expires=T0 + 60))
    assert bans.match_name("eve", T0 + 59) is not None
    assert bans.match_name("eve", T0 + 60) is None
    assert bans.match_address("10.0.0.1", T0 + 60) is None
    assert len(bans.active(T0 + 60)) == 0
    assert {b.target for b in bans.prune(T0 + 60)} == {"eve", "10.0.0.0/8"}
    assert len(bans) == 0 and not bans.has_address_bans


def test_state_file_round_trip_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "lib" / "chatd" / "state.json"
    bans = Bans()
    bans.add(ban("name", "eve", expires=T0 + 3600))
    bans.add(ban("address", "10.0.0.0/8"))
    state.save(str(path), bans)  # creates the directory
    assert sorted(os.listdir(path.parent)) == ["state.json"]  # no temporary file left
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and len(doc["bans"]) == 2
    again = state.load(str(path), now=T0)
    assert again.active(T0) == bans.active(T0)
    assert len(state.load(str(path), now=T0 + 3600)) == 1  # expired while down: gone


def test_a_missing_state_file_is_no_bans(tmp_path: Path) -> None:
    assert len(state.load(str(tmp_path / "none.json"))) == 0


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("{", "not a chatd state file"),
        ("[]", "expected a version 1 state document"),
        ('{"version": 1, "bans": {}}', "expected a list of bans"),
        ('{"version": 1, "bans": [{"kind": "name"}]}', "ban 0:"),
        (
            '{"version": 1, "bans": [{"kind": "address", "target": "x", "reason": "",'
            ' "created": 0, "expires": null, "by": 0}]}',
            "ban 0: bad network 'x'",
        ),
    ],
)
def test_a_corrupt_state_file_is_an_error(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(content)
    with pytest.raises(StateError, match=f"cannot read {path}: .*{error[:20]}"):
        state.load(str(path))


def test_save_failure_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match=r"cannot write .*/file/state\.json: .*/file is not a dir"):
        state.save(str(tmp_path / "file" / "state.json"), Bans())


@pytest.mark.parametrize(
    ("line", "cmd", "args"),
    [
        (b'{"cmd": "list"}', "list", {}),
        (b'{"cmd": "list", "args": null}', "list", {}),
        (b'{"cmd": "kick", "args": {"name": "a"}, "id": 3}', "kick", {"name": "a"}),
        (b'{"cmd": "ban", "args": {"target": "a", "duration": "1m"}}', "ban", None),
    ],
)
def test_parse_accepts_good_requests(line: bytes, cmd: str, args: dict[str, str] | None) -> None:
    request = control.parse(line)
    got_cmd, got_args = request.cmd, request.args
    assert got_cmd == cmd
    assert got_args == (args if args is not None else json.loads(line)["args"])


def test_parse_rejects_booleans_as_strings() -> None:
    with pytest.raises(control.RequestError) as e:
        control.parse(b'{"cmd": "unban", "args": {"target": false}}')
    assert str(e.value) == "unban: argument 'target' must be a string"
    assert e.value.code == "bad_request"
