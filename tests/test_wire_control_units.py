"""The control protocol (chatd.wire.control) on its own: every error message and code
of a request line, the reply lines, durations and times."""

from __future__ import annotations

import json

import pytest

from chatd.wire import control
from chatd.wire.control import RequestError

# Sorted, as the error lists them (COMMANDS itself is in another order).
ALL_COMMANDS = ", ".join(sorted(control.COMMANDS))


def refused(line: bytes) -> tuple[str, str]:
    """(code, message) of the RequestError that ``line`` raises."""
    with pytest.raises(RequestError) as e:
        control.parse(line)
    return e.value.code, str(e.value)


def request(cmd: object, args: object = None, **more: object) -> bytes:
    doc: dict[str, object] = {"cmd": cmd, **more}
    if args is not None:
        doc["args"] = args
    return json.dumps(doc).encode()


# Request lines that do not check out, one test per message.


@pytest.mark.parametrize("line", [b"{", b"", b"cmd=list", b'{"cmd": "list"} x'])
def test_a_line_that_is_not_json_is_malformed(line: bytes) -> None:
    assert refused(line) == (
        "bad_request",
        'malformed request: expected one JSON object per line, {"cmd": ...}',
    )


@pytest.mark.parametrize("line", [b"[]", b'"list"', b"7", b"null"])
def test_json_that_is_not_an_object_is_malformed(line: bytes) -> None:
    assert refused(line) == (
        "bad_request",
        'malformed request: expected a JSON object {"cmd": ...}',
    )


def test_an_unknown_field_is_named_the_first_in_order() -> None:
    line = b'{"cmd": "list", "zeta": 1, "alpha": 2}'
    assert refused(line) == (
        "bad_request",
        "unknown request field 'alpha' (fields: cmd, args, id)",
    )
    assert refused(b'{"cmd": "list", "CMD": 1}') == (
        "bad_request",
        "unknown request field 'CMD' (fields: cmd, args, id)",
    )


@pytest.mark.parametrize("line", [b"{}", b'{"cmd": 5}', b'{"cmd": null}', b'{"cmd": ["list"]}'])
def test_cmd_must_be_a_name(line: bytes) -> None:
    assert refused(line) == ("bad_request", 'malformed request: "cmd" must be a command name')


def test_an_unknown_command_lists_the_commands() -> None:
    assert refused(request("nope")) == (
        "unknown_command",
        f"unknown command 'nope' (commands: {ALL_COMMANDS})",
    )
    assert refused(request("LIST"))[0] == "unknown_command"  # names are case-sensitive


@pytest.mark.parametrize("args", [[], "x", 1, True])
def test_args_must_be_an_object(args: object) -> None:
    assert refused(request("kick", args)) == ("bad_request", 'kick: "args" must be a JSON object')


def test_an_unknown_argument_lists_the_known_ones() -> None:
    assert refused(request("kick", {"nme": "a"})) == (
        "bad_request",
        "kick: unknown argument 'nme' (arguments: name, reason)",
    )
    known = ", ".join(control.COMMANDS["ban"])  # target, duration, reason, kind, ...
    assert known.startswith("target, duration, reason, kind")
    assert refused(request("ban", {"target": "a", "until": "x"})) == (
        "bad_request",
        f"ban: unknown argument 'until' (arguments: {known})",
    )
    assert refused(request("list", {"all": True})) == (
        "bad_request",
        "list: unknown argument 'all' (arguments: none)",
    )


@pytest.mark.parametrize("value", [5, 1.5, None, ["a"], {"a": 1}, True, False])
def test_a_string_argument_of_another_type_is_refused(value: object) -> None:
    assert refused(request("kick", {"name": value})) == (
        "bad_request",
        "kick: argument 'name' must be a string",
    )


def test_the_types_checked_are_each_arguments_own() -> None:
    assert refused(request("ban", {"target": "a", "reason": 3})) == (
        "bad_request",
        "ban: argument 'reason' must be a string",
    )


def test_numbers_and_booleans_are_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    # No command takes a number or a boolean yet; a new one must get these right.
    spec = {"count": (int, False), "all": (bool, False), "ratio": (float, False)}
    monkeypatch.setitem(control.COMMANDS, "probe", spec)
    ok = control.parse(request("probe", {"count": 3, "all": False, "ratio": 0.5}))
    assert ok == control.Request("probe", {"count": 3, "all": False, "ratio": 0.5})
    assert refused(request("probe", {"count": True})) == (
        "bad_request",
        "probe: argument 'count' must be a whole number",  # booleans are ints: not here
    )
    assert (
        refused(request("probe", {"count": "3"}))[1]
        == "probe: argument 'count' must be a whole number"
    )
    assert (  # 100.0 is a number, not the whole number asked for
        refused(request("probe", {"count": 100.0}))[1]
        == "probe: argument 'count' must be a whole number"
    )
    assert refused(request("probe", {"all": 1})) == (
        "bad_request",
        "probe: argument 'all' must be a boolean",
    )
    assert (
        refused(request("probe", {"ratio": "x"}))[1] == "probe: argument 'ratio' must be a number"
    )


def test_a_missing_required_argument_is_named() -> None:
    assert refused(request("kick")) == ("bad_request", "kick: missing argument 'name'")
    assert refused(request("kick", {"reason": "spam"})) == (
        "bad_request",
        "kick: missing argument 'name'",
    )
    assert refused(request("ban", {"duration": "1m"})) == (
        "bad_request",
        "ban: missing argument 'target'",
    )
    assert refused(request("say", {})) == ("bad_request", "say: missing argument 'text'")


def test_the_first_problem_is_the_one_told() -> None:
    # A bad type is told before a missing argument, in the order of the args given.
    assert refused(request("kick", {"reason": 1})) == (
        "bad_request",
        "kick: argument 'reason' must be a string",
    )
    assert refused(request("kick", {"x": 1, "name": 2}))[1] == (
        "kick: unknown argument 'x' (arguments: name, reason)"
    )


# Good requests.


@pytest.mark.parametrize(
    ("line", "want"),
    [
        (b'{"cmd": "stats"}', control.Request("stats", {})),
        (b'{"cmd": "stats", "args": {}}', control.Request("stats", {})),
        (b'{"cmd": "stats", "args": null, "id": 9}', control.Request("stats", {})),
        (b'{"cmd": "kick", "args": {"name": "eve"}}', control.Request("kick", {"name": "eve"})),
        (
            b'{"cmd": "kick", "args": {"name": "eve", "reason": "spam"}}',
            control.Request("kick", {"name": "eve", "reason": "spam"}),
        ),
        (
            b'{"args": {"target": "10.0.0.0/8", "kind": "address"}, "cmd": "unban"}',
            control.Request("unban", {"target": "10.0.0.0/8", "kind": "address"}),
        ),
    ],
)
def test_good_requests(line: bytes, want: control.Request) -> None:
    assert control.parse(line) == want


def test_every_command_parses_with_its_required_arguments() -> None:
    for cmd, spec in control.COMMANDS.items():
        args = {key: "x" for key, (_, required) in spec.items() if required}
        assert control.parse(request(cmd, args)) == control.Request(cmd, args)


# The id of a request, for its reply.


@pytest.mark.parametrize(
    ("line", "rid"),
    [
        (b'{"cmd": "list", "id": 7}', 7),
        (b'{"cmd": "list", "id": "a"}', "a"),
        (b'{"id": [1, 2]}', [1, 2]),
        (b'{"cmd": "list"}', None),
        (b"[1, 2]", None),
        (b'"id"', None),
        (b"{", None),
    ],
)
def test_request_id(line: bytes, rid: object) -> None:
    assert control.request_id(line) == rid


def test_an_error_carries_its_code() -> None:
    e = RequestError("not_found", "no user named 'bob' is online")
    assert (e.code, str(e)) == ("not_found", "no user named 'bob' is online")


# Replies.


def test_encode_is_one_json_line() -> None:
    assert control.encode({"ok": True, "result": {"n": 1}, "id": 3}) == (
        b'{"ok": true, "result": {"n": 1}, "id": 3}\n'
    )


def test_error_reply() -> None:
    assert control.error_reply("busy", "try again") == {
        "ok": False,
        "error": "try again",
        "code": "busy",
    }


# Durations and times.


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1),
        ("2m", 120),
        ("3h", 10800),
        ("2d", 172800),
        ("2w", 1209600),
        ("1w1d1h1m1s", 694861),
        ("36500d", control.MAX_DURATION),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    got = control.parse_duration(text)
    assert got == seconds and isinstance(got, int)


@pytest.mark.parametrize("text", [5, None, "", "5", "s", "1m 1s", "1x"])
def test_what_is_not_a_duration(text: object) -> None:
    with pytest.raises(ValueError) as e:
        control.parse_duration(text)  # type: ignore[arg-type]
    assert str(e.value) == (f"expected a duration such as 30s, 10m, 2h, 7d or 1h30m, got {text!r}")


@pytest.mark.parametrize("text", ["0s", "0w0d", "36500d1s", "5300w"])
def test_durations_out_of_range(text: str) -> None:
    with pytest.raises(ValueError) as e:
        control.parse_duration(text)
    assert str(e.value) == f"expected a duration from 1s to 100 years, got {text!r}"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "0s"),
        (0.6, "1s"),
        (59, "59s"),
        (60, "1m00s"),
        (125, "2m05s"),
        (3599.4, "59m59s"),
        (3661, "1h01m"),
        (7140, "1h59m"),
        (86399, "23h59m"),
        (2 * 86400 + 3 * 3600 + 59, "2d03h"),
        (-0.4, "0s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert control.format_duration(seconds) == text


def test_iso_is_utc() -> None:
    assert control.iso(1_800_000_000.5) == "2027-01-15T08:00:00Z"
    assert control.iso(None) is None
