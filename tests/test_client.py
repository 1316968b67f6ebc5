"""The `chat` client: pure helpers, and the real client against the real daemon."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pexpect
import pytest
from helpers import NOTICE, Daemon

from chatd.client import render, session
from chatd.client.render import classify, plain
from chatd.client.session import split_line

CHAT = [sys.executable, "-c", "import sys; from chatd.client.main import main; sys.exit(main())"]
WHEN = datetime(2026, 1, 2, 3, 4, 5)
LINE = re.compile(r"\d\d:\d\d:\d\d ")

# Pure parts.


@pytest.mark.parametrize(
    ("sender", "kind", "name", "line"),
    [
        ("alice", "message", "alice", "03:04:05 alice: hi"),
        ("chatd", "notice", "chatd", "03:04:05 chatd: hi"),
        ("alice (private)", "private", "alice", "03:04:05 alice (private): hi"),
        ("* alice", "action", "alice", "03:04:05 * alice hi"),
        ("(private)", "message", "(private)", "03:04:05 (private): hi"),
        ("*", "message", "*", "03:04:05 *: hi"),
    ],
)
def test_classify_and_plain(sender: str, kind: str, name: str, line: str) -> None:
    event = classify(sender, "hi", WHEN)
    assert (event.kind, event.name) == (kind, name)
    assert plain(event) == line


def test_json_line() -> None:
    doc = json.loads(render.as_json(classify("alice (private)", "ünï", WHEN)))
    assert doc["type"] == "private"
    assert doc["from"] == "alice"
    assert doc["text"] == "ünï"
    assert datetime.fromisoformat(doc["time"]).replace(tzinfo=None) == WHEN


def test_a_replayed_message_has_the_time_it_was_said() -> None:
    from chatd.wire.chat import history_sender

    said = datetime.now().replace(microsecond=0) - timedelta(minutes=5)
    event = classify(history_sender("alice", said.timestamp()), "from before", WHEN)
    assert (event.kind, event.name, event.when) == ("history", "alice", said)
    assert plain(event) == f"{said:%H:%M:%S} alice: from before"
    doc = json.loads(render.as_json(event))
    assert (doc["type"], doc["from"], doc["text"]) == ("history", "alice", "from before")
    assert datetime.fromisoformat(doc["time"]) == said.astimezone()
    older = classify(history_sender("bob", WHEN.timestamp()), "long ago")
    assert plain(older) == "2026-01-02 03:04:05 bob: long ago"  # another day: its date
    fragments = render.styled(older)
    assert all("class:history" in style for style, _ in fragments)
    assert "".join(text for _, text in fragments) == "2026-01-02 03:04:05 bob: long ago"
    forged = classify("alice[2026-01-02 03:04:05 UTC]", "x", WHEN)
    assert forged.kind == "message" and forged.when == WHEN


def test_own_private_lines_wait_for_the_daemon() -> None:
    assert render.own_event("alice", "/msg bob hi there") is None  # its copy shows it
    event = classify("alice -> bob (private)", "hi there", WHEN)
    assert (event.kind, event.name, event.to, event.own) == ("private", "alice", "bob", True)
    assert plain(event) == "03:04:05 alice -> bob (private): hi there"
    assert json.loads(render.as_json(event))["to"] == "bob"


def test_what_arrives_is_printed_with_its_controls_escaped() -> None:
    event = classify("chatd", "hi\x1b]0;owned\x07\x1b[2J\rroot: fake line\u202e", WHEN)
    assert plain(event) == (
        "03:04:05 chatd: hi\\x1b]0;owned\\x07\\x1b[2J\\x0droot: fake line\\u202e"
    )
    assert plain(classify("\x1bevil", "x", WHEN)) == "03:04:05 \\x1bevil: x"
    doc = render.as_json(classify("a", "\x7f\x9b\u2028\t", WHEN))
    assert "\\u007f\\u009b\\u2028" in doc and json.loads(doc)["text"] == "\x7f\x9b\u2028\t"
    assert not any(0x7F <= ord(c) <= 0x9F for c in doc)


@pytest.mark.parametrize(
    ("line", "kind", "text", "to"),
    [
        ("hi", "message", "hi", ""),
        ("//who", "message", "/who", ""),
        ("/me waves", "action", "waves", ""),
        ("/who", "command", "/who", ""),
        ("/msg bob", "command", "/msg bob", ""),
    ],
)
def test_own_lines(line: str, kind: str, text: str, to: str) -> None:
    event = render.own_event("alice", line)
    assert event is not None
    assert (event.kind, event.text, event.to, event.own) == (kind, text, to, True)


def test_short_lines_are_sent_whole() -> None:
    assert split_line("x" * 100, 100) == ["x" * 100]
    assert split_line("/frob " + "x" * 200, 100) == ["/frob " + "x" * 94]  # cut, not split
    assert split_line("/who " + "é" * 100, 100) == ["/who " + "é" * 47]


def test_long_lines_are_split_keeping_their_meaning() -> None:
    pieces = split_line("é" * 150, 100)  # 300 bytes
    assert "".join(pieces) == "é" * 150
    assert all(len(p.encode()) <= 100 for p in pieces)
    assert split_line("a" * 99 + "/who", 100) == ["a" * 99, "//who"]
    msg = split_line("/msg bob " + "x" * 150, 100)
    assert all(p.startswith("/msg bob ") and len(p.encode()) <= 100 for p in msg)
    assert "".join(p.removeprefix("/msg bob ") for p in msg) == "x" * 150
    me = split_line("/me " + "y" * 150, 100)
    assert all(p.startswith("/me ") for p in me)
    slashed = split_line("//" + "z" * 150, 100)
    assert slashed[0] == "//" + "z" * 98
    assert "".join(slashed).replace("//", "/", 1) == "/" + "z" * 150


def test_room_events_are_not_reasons() -> None:
    assert session.ending("bob joined") is None
    assert session.ending("bob left (slow consumer)") is None
    assert session.ending("bob, carol and 148 others joined") is None
    assert session.ending("bob and carol left (quit)") is None
    assert session.ending("welcome, bob; nobody else is online") is None
    assert session.ending("bob was kicked (spam)") is None
    assert session.ending("bob was banned") is None
    assert session.ending("the server is shutting down") is not None
    assert session.ending("you were kicked by an admin: spam") is not None


# Pipe mode.


def run_chat(
    port: int, *args: str, stdin: str = "", timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHAT, "-p", str(port), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn_chat(port: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CHAT, "-p", str(port), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def welcomed(proc: subprocess.Popen[str]) -> None:
    """Wait until the piped client ``proc`` has printed its welcome."""
    assert proc.stdout
    line = proc.stdout.readline()
    assert "chatd: welcome, " in line, line


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_pipe_sends_every_line_and_confirms(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    lines = [f"line {i}" for i in range(40)]  # under the flood burst (50)
    done = run_chat(
        daemon.port, "-u", "ci", "127.0.0.1", stdin="\n".join([*lines, "/me waves", "//x"])
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines()[0][9:] == "chatd: welcome, ci; online: alice"
    assert LINE.match(done.stdout)
    alice.expect(NOTICE, "ci joined")
    for line in lines:
        alice.expect("ci", line)
    alice.expect("* ci", "waves")
    alice.expect("ci", "/x")  # the last line had no newline, and came through
    alice.expect(NOTICE, "ci left (quit)")  # all were taken before it left


def test_pipe_prints_what_arrives(daemon: Daemon, procs: list[subprocess.Popen[str]]) -> None:
    ci = spawn_chat(daemon.port, "-u", "ci", "127.0.0.1")
    procs.append(ci)
    daemon.wait_for("join", user="ci")
    alice = daemon.client("alice")
    alice.send("hello ci")
    alice.send("/me waves")
    alice.send("/msg ci psst")
    daemon.wait_for("message", user="alice", kind="private")
    out, err = ci.communicate("", timeout=20)
    assert ci.returncode == 0, err
    shown = [line[9:] for line in out.splitlines()]
    assert shown == [
        "chatd: welcome, ci; nobody else is online",
        "chatd: alice joined",
        "alice: hello ci",
        "* alice waves",
        "alice (private): psst",
    ]
    assert all(LINE.match(line) for line in out.splitlines())


def test_pipe_json(daemon: Daemon, procs: list[subprocess.Popen[str]]) -> None:
    ci = spawn_chat(daemon.port, "--json", "-u", "ci", "127.0.0.1")
    procs.append(ci)
    daemon.wait_for("join", user="ci")
    alice = daemon.client("alice")
    alice.send("hello ci")
    alice.send("/msg ci psst")
    daemon.wait_for("message", user="alice", kind="private")
    out, err = ci.communicate("/who\n", timeout=20)
    assert ci.returncode == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    assert [(d["type"], d["from"], d["text"]) for d in docs] == [
        ("notice", "chatd", "welcome, ci; nobody else is online"),
        ("notice", "chatd", "alice joined"),
        ("message", "alice", "hello ci"),
        ("private", "alice", "psst"),
        ("notice", "chatd", "online (2): ci, alice"),
    ]
    for d in docs:
        assert datetime.fromisoformat(d["time"]).tzinfo is not None


def test_pipe_commands(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    bob = daemon.client("bob")
    alice.expect(NOTICE, "bob joined")
    done = run_chat(
        daemon.port,
        "-u",
        "ci",
        "127.0.0.1",
        stdin="/who\n/msg bob for bob only\n/frob\n/msg nobody hi\n/help\n",
    )
    assert done.returncode == 0, done.stderr
    shown = [line[9:] for line in done.stdout.splitlines()]
    assert "chatd: online (3): alice, bob, ci" in shown
    assert "chatd: unknown command /frob; /help lists the commands" in shown
    assert "chatd: message not sent: nobody called 'nobody' is online" in shown
    assert "chatd: /msg NAME TEXT - a private message to NAME alone" in shown
    bob.expect(NOTICE, "ci joined")
    bob.expect("ci (private)", "for bob only")
    bob.expect(NOTICE, "ci left (quit)")
    alice.expect(NOTICE, "ci joined")
    alice.expect(NOTICE, "ci left (quit)")  # no command, no private message


def test_pipe_quit_with_words_after_it(daemon: Daemon, procs: list[subprocess.Popen[str]]) -> None:
    # The daemon takes "/quit see you" as /quit: the client leaves as for /quit,
    # not with "connection lost", and sends nothing after it.
    alice = daemon.client("alice")
    ci = spawn_chat(daemon.port, "-u", "ci", "127.0.0.1")
    procs.append(ci)
    welcomed(ci)
    assert ci.stdin
    ci.stdin.write("before\n/QUIT see you\n")
    ci.stdin.flush()
    alice.expect(NOTICE, "ci joined")
    alice.expect("ci", "before")
    alice.expect(NOTICE, "ci left (quit)")
    ci.wait(20)  # stdin is still open: the /quit line alone ends it
    assert ci.stderr and ci.stderr.read() == ""
    assert ci.returncode == 0


def test_pipe_paces_itself_under_the_flood_limit(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    lines = [f"line {i}" for i in range(70)]  # 40 at once, then 10 a second
    started = time.monotonic()
    done = run_chat(daemon.port, "-u", "ci", "127.0.0.1", stdin="\n".join(lines))
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started > 2
    assert "slow down" not in done.stdout
    alice.expect(NOTICE, "ci joined")
    for line in lines:
        alice.expect("ci", line)


def test_pipe_without_pacing_is_told_to_slow_down(daemon: Daemon) -> None:
    done = run_chat(daemon.port, "--rate", "0", "-u", "ci", "127.0.0.1", stdin="x\n" * 70)
    assert done.returncode == 0, done.stderr
    assert "chatd: slow down: your messages are not being sent" in done.stdout


def test_long_lines_arrive_in_pieces(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    done = run_chat(daemon.port, "-u", "ci", "127.0.0.1", stdin="é" * 3000 + "\n")
    assert done.returncode == 0, done.stderr
    alice.expect(NOTICE, "ci joined")
    first = alice.recv_text("ci")
    second = alice.recv_text("ci")
    assert first + second == "é" * 3000
    assert len(first.encode()) <= 4096


@pytest.mark.parametrize("line", ["/" + "x" * 5000, "/who " + "é" * 3000, "/msg " + "n" * 5000])
def test_long_command_lines_are_not_a_protocol_error(daemon: Daemon, line: str) -> None:
    # No command is this long, but the line must still fit a message: the
    # daemon answers it as it would a shorter one, and the client stays.
    alice = daemon.client("alice")
    done = run_chat(daemon.port, "-u", "ci", "127.0.0.1", stdin=line + "\nafter\n")
    assert "protocol error" not in done.stdout
    assert done.returncode == 0, done.stderr
    alice.expect(NOTICE, "ci joined")
    assert alice.recv_text("ci") == "after"


def test_pipe_disconnected_before_confirming(start: Callable[..., Daemon]) -> None:
    # The daemon closes on a message over its limit: it did not take the lines
    # after it, and the client must not exit 0 as if it had.
    daemon = start({"max_message_bytes": 100})
    alice = daemon.client("alice")
    done = run_chat(daemon.port, "-u", "ci", "127.0.0.1", stdin="x" * 200 + "\nafter\n")
    assert done.returncode == session.DISCONNECTED, done.stderr
    assert done.stderr == (
        "chat: disconnected by the server: protocol error: "
        "frame of 200 bytes is over the limit of 100\n"
    )
    alice.expect(NOTICE, "ci joined")
    alice.expect(NOTICE, "ci left (protocol error)")


def test_invalid_utf8_line_is_skipped(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    done = subprocess.run(
        [*CHAT, "-p", str(daemon.port), "-u", "ci", "127.0.0.1"],
        input=b"good\n\xff\xfe bad\nalso good\n",
        capture_output=True,
        timeout=20,
    )
    assert done.returncode == 0
    assert done.stderr.decode() == "chat: line 2 is not valid UTF-8; not sent\n"
    alice.expect(NOTICE, "ci joined")
    alice.expect("ci", "good")
    alice.expect("ci", "also good")


# Errors and exit statuses.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused() -> None:
    port = free_port()
    done = run_chat(port, "-u", "ci", "127.0.0.1")
    assert done.returncode == session.REFUSED == 4
    assert done.stderr == f"chat: cannot connect to 127.0.0.1 port {port}: connection refused\n"
    assert done.stdout == ""


def test_invalid_host_name() -> None:
    done = run_chat(1234, "-u", "ci", "no..such")
    assert done.returncode == session.UNKNOWN_HOST == 3
    assert done.stderr == "chat: unknown host 'no..such': not a valid host name\n"


def can_unshare_net() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    done = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10)
    return done.returncode == 0


@pytest.mark.skipif(not can_unshare_net(), reason="needs root and unshare --net")
def test_unknown_host() -> None:
    # In a network namespace of its own, the name lookup cannot leave the machine.
    done = subprocess.run(
        ["unshare", "--net", *CHAT, "-u", "ci", "nosuch.invalid"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == session.UNKNOWN_HOST
    assert done.stderr.startswith("chat: unknown host 'nosuch.invalid': "), done.stderr
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("chatd", "name rejected: the name 'chatd' is reserved"),
        ("ALICE", "name rejected: 'ALICE' is already taken"),
        ("a" * 40, "name rejected: the name is too long (at most 32 bytes)"),
    ],
)
def test_name_rejected(daemon: Daemon, name: str, reason: str) -> None:
    alice = daemon.client("alice")
    done = run_chat(daemon.port, "-u", name, "127.0.0.1", stdin="never sent\n")
    assert done.returncode == session.NAME_REJECTED == 5
    assert done.stderr == f"chat: {reason}\n"
    alice.expect_nothing()
    assert not daemon.find("message")


def test_server_full(start: Callable[..., Daemon]) -> None:
    daemon = start({"max_clients": 1})
    alice = daemon.client("alice")
    done = run_chat(daemon.port, "-u", "ci", "127.0.0.1")
    alice.expect_nothing()
    assert done.returncode == session.DISCONNECTED == 7
    assert done.stderr == "chat: the server is full, try again later\n"


def test_disconnected_by_the_server(daemon: Daemon, procs: list[subprocess.Popen[str]]) -> None:
    ci = spawn_chat(daemon.port, "-u", "ci", "127.0.0.1")
    procs.append(ci)
    welcomed(ci)
    assert daemon.stop() == 0
    ci.wait(20)  # stdin is still open: the server's close alone ends it
    assert ci.returncode == session.DISCONNECTED
    assert ci.stderr and ci.stderr.read() == "chat: the server is shutting down\n"
    assert ci.stdout and "shutting down" not in ci.stdout.read()  # said once, on stderr


def test_kicked(daemon: Daemon, procs: list[subprocess.Popen[str]]) -> None:
    alice = daemon.client("alice")
    ci = spawn_chat(daemon.port, "--reconnect", "-u", "ci", "127.0.0.1")
    procs.append(ci)
    welcomed(ci)
    alice.expect(NOTICE, "ci joined")
    done = daemon.ctl("kick", "ci", "--reason", "spam")
    assert done.returncode == 0, done.stderr
    ci.wait(20)  # stdin is still open, and --reconnect does not bring it back
    assert ci.returncode == session.KICKED == 6
    assert ci.stderr and ci.stderr.read() == "chat: you were kicked by an admin: spam\n"
    alice.expect(NOTICE, "ci was kicked (spam)")


def test_banned(daemon: Daemon, procs: list[subprocess.Popen[str]]) -> None:
    ci = spawn_chat(daemon.port, "--reconnect", "-u", "ci", "127.0.0.1")
    procs.append(ci)
    welcomed(ci)
    done = daemon.ctl("ban", "ci", "--reason", "spam")
    assert done.returncode == 0, done.stderr
    ci.wait(20)
    assert ci.returncode == session.KICKED
    assert ci.stderr and ci.stderr.read() == "chat: you were banned by an admin: spam\n"
    again = run_chat(daemon.port, "--reconnect", "-u", "ci", "127.0.0.1")
    assert again.returncode == session.BANNED == 6  # final, with --reconnect too
    assert again.stderr == "chat: name rejected: 'ci' is banned: spam\n"
    assert again.stdout == ""  # said once, on stderr


def test_an_address_banned_at_connect_exits_6_once_and_finally(daemon: Daemon) -> None:
    done = daemon.ctl("ban", "127.0.0.1", "--for", "5m")
    assert done.returncode == 0, done.stderr
    refused = run_chat(daemon.port, "--reconnect", "-u", "newbie", "127.0.0.1", stdin="hi\n")
    assert refused.returncode == session.BANNED
    assert refused.stderr.startswith("chat: connection refused: your address is banned until ")
    assert refused.stderr.count("\n") == 1 and "reconnecting" not in refused.stderr
    assert refused.stdout == ""


def test_connection_lost(daemon: Daemon, procs: list[subprocess.Popen[str]]) -> None:
    ci = spawn_chat(daemon.port, "-u", "ci", "127.0.0.1")
    procs.append(ci)
    welcomed(ci)
    daemon.proc.kill()
    ci.wait(20)
    assert ci.returncode == session.LOST == 8
    assert ci.stderr and ci.stderr.read() == (
        f"chat: connection to 127.0.0.1 port {daemon.port} lost\n"
    )


def test_ctrl_c_in_pipe_mode(daemon: Daemon, procs: list[subprocess.Popen[str]]) -> None:
    ci = spawn_chat(daemon.port, "-u", "ci", "127.0.0.1")
    procs.append(ci)
    daemon.wait_for("join", user="ci")
    ci.send_signal(signal.SIGINT)
    ci.wait(20)
    assert ci.returncode == session.INTERRUPTED
    assert ci.stderr and ci.stderr.read() == ""


def test_usage_errors() -> None:
    done = subprocess.run([*CHAT, "-u", "x", "-p", "99999", "h"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "expected a port number 1-65535, got '99999'" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_documents_the_exit_statuses() -> None:
    script = Path(sys.executable).with_name("chat")
    argv = [str(script)] if script.exists() else CHAT
    done = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0
    assert "usage: chat" in done.stdout
    assert "5 name rejected,\n6 kicked or banned" in done.stdout


def test_reconnect(start: Callable[..., Daemon], procs: list[subprocess.Popen[str]]) -> None:
    first = start()
    port = first.port
    ci = spawn_chat(port, "--reconnect", "-u", "ci", "127.0.0.1")
    procs.append(ci)
    welcomed(ci)
    first.stop()
    assert ci.stderr
    line = ci.stderr.readline()
    assert line.startswith("chat: the server is shutting down; reconnecting in "), line
    second = start({"listen": [f"127.0.0.1:{port}"]})
    deadline = time.monotonic() + 60  # backoff grows while the new daemon starts
    while not second.find("join", user="ci"):
        assert time.monotonic() < deadline, "no reconnect"
        time.sleep(0.1)
    # alice comes after ci is back (before, ci might have beaten her to it, and her
    # welcome would name ci instead of a "ci joined" notice).
    alice = second.client("alice")
    out, err = ci.communicate("back again\n", timeout=20)
    assert ci.returncode == 0, err
    assert f"chat: reconnected to 127.0.0.1 port {port}\n" in line + err
    alice.expect("ci", "back again")
    assert out.count("chatd: welcome, ci") == 1  # the second: the first was read already


def test_no_reconnect_after_a_rejected_name(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
    ci = daemon.client("ci")
    done = run_chat(daemon.port, "--reconnect", "-u", "ci", "127.0.0.1")
    ci.expect_nothing()
    assert done.returncode == session.NAME_REJECTED
    assert "reconnecting" not in done.stderr


# Interactive mode, through a pseudo-terminal.


def spawn_tty(port: int, name: str, *args: str, **env: str) -> pexpect.spawn:
    full = {**os.environ, "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1", **env}
    if not env.get("NO_COLOR"):
        full.pop("NO_COLOR", None)
    child = pexpect.spawn(
        CHAT[0],
        [*CHAT[1:], *args, "-u", name, "-p", str(port), "127.0.0.1"],
        env=full,
        encoding="utf-8",
        timeout=10,
        dimensions=(24, 100),
    )
    child.expect(f"welcome, {name}")
    if full["TERM"] != "dumb":  # a dumb terminal gets no redrawn prompt
        child.expect(f"{name}>")
    return child


@pytest.fixture
def ttys() -> Iterator[list[pexpect.spawn]]:
    started: list[pexpect.spawn] = []
    yield started
    for child in started:
        child.close(force=True)


def quit_tty(child: pexpect.spawn) -> int:
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    return int(child.exitstatus)


def test_message_arriving_while_typing(daemon: Daemon, ttys: list[pexpect.spawn]) -> None:
    alice = daemon.client("alice")
    bob = spawn_tty(daemon.port, "bob")
    ttys.append(bob)
    alice.expect(NOTICE, "bob joined")
    bob.send("half_typed")
    bob.expect("half_typed")
    alice.send("hello_bob")
    bob.expect("hello_bob")  # shown at once, before bob presses Enter
    bob.expect("half_typed")  # and the line bob is typing is drawn again below it
    bob.send("_and_finished\r")
    assert alice.recv() == ("bob", "half_typed_and_finished")  # nothing garbled
    bob.expect("half_typed_and_finished")  # bob's own line, shown back
    bob.expect("bob>")
    bob.send("\x1b[A")  # up arrow: the line from the history
    bob.expect("half_typed_and_finished")
    bob.send("\r")
    assert alice.recv() == ("bob", "half_typed_and_finished")
    bob.expect("bob>")
    assert quit_tty(bob) == 0
    alice.expect(NOTICE, "bob left (quit)")


def test_interactive_commands(daemon: Daemon, ttys: list[pexpect.spawn]) -> None:
    alice = daemon.client("alice")
    carol = daemon.client("carol")
    alice.expect(NOTICE, "carol joined")
    bob = spawn_tty(daemon.port, "bob")
    ttys.append(bob)
    alice.expect(NOTICE, "bob joined")
    carol.expect(NOTICE, "bob joined")
    bob.send("/who\r")
    bob.expect(re.escape("-- online (3): alice, carol, bob"))
    bob.send("/msg alice only_for_alice\r")
    bob.expect("only_for_alice")
    assert alice.recv() == ("bob (private)", "only_for_alice")
    bob.send("/me nods\r")
    bob.expect(re.escape("* bob nods"))
    assert alice.recv() == ("* bob", "nods")
    assert carol.recv() == ("* bob", "nods")  # carol never saw the private message
    alice.send("/msg bob psst")
    assert alice.recv() == ("alice -> bob (private)", "psst")  # it went
    bob.expect(re.escape("alice (private):"))
    bob.expect("psst")
    bob.send("//slash\r")
    assert alice.recv() == ("bob", "/slash")
    bob.send("/frob\r")
    bob.expect(re.escape("-- unknown command /frob"))
    bob.expect("bob>")
    bob.send("/quit\r")
    bob.expect(pexpect.EOF)
    bob.close()
    assert bob.exitstatus == 0
    carol.expect("bob", "/slash")
    carol.expect(NOTICE, "bob left (quit)")


def test_pasted_lines_are_sent_one_by_one(daemon: Daemon, ttys: list[pexpect.spawn]) -> None:
    alice = daemon.client("alice")
    bob = spawn_tty(daemon.port, "bob")
    ttys.append(bob)
    alice.expect(NOTICE, "bob joined")
    bob.send("\x1b[200~pasted_one\npasted_two\x1b[201~")  # a bracketed paste
    bob.expect("pasted_two")
    bob.send("\r")
    assert alice.recv() == ("bob", "pasted_one")
    assert alice.recv() == ("bob", "pasted_two")


@pytest.mark.parametrize("typed", ["/quit see you tomorrow", "pasted\n/quit\nnot_sent"])
def test_interactive_quit_with_words_after_it(
    daemon: Daemon, ttys: list[pexpect.spawn], typed: str
) -> None:
    alice = daemon.client("alice")
    bob = spawn_tty(daemon.port, "bob")
    ttys.append(bob)
    alice.expect(NOTICE, "bob joined")
    if "\n" in typed:
        bob.send(f"\x1b[200~{typed}\x1b[201~")  # a bracketed paste
    else:
        bob.send(typed)
    bob.send("\r")
    bob.expect(pexpect.EOF)
    bob.close()
    assert "connection" not in (bob.before or "")
    assert bob.exitstatus == 0
    if "pasted" in typed:
        alice.expect("bob", "pasted")
    alice.expect(NOTICE, "bob left (quit)")
    alice.expect_nothing()


def test_typed_text_stays_on_screen_when_the_daemon_leaves(
    daemon: Daemon, ttys: list[pexpect.spawn]
) -> None:
    bob = spawn_tty(daemon.port, "bob")
    ttys.append(bob)
    bob.send("unsent_words")
    bob.expect("unsent_words")
    daemon.stop()
    bob.expect("chat: the server is shutting down")
    assert "-- the server is shutting down" not in bob.before  # said once
    # Not erased with the prompt: the words are drawn again, to copy them.
    assert "unsent_words" in bob.before
    bob.expect(pexpect.EOF)
    bob.close()
    assert bob.exitstatus == session.DISCONNECTED


def sgr_colors(text: str) -> set[str]:
    """The color parameters of the SGR sequences in ``text``."""
    colors = set()
    for params in re.findall(r"\x1b\[([0-9;]*)m", text):
        for p in params.split(";"):
            if p and (30 <= int(p) <= 38 or 90 <= int(p) <= 97):
                colors.add(p)
    return colors


@pytest.mark.parametrize("no_color", [False, True])
def test_no_color(daemon: Daemon, ttys: list[pexpect.spawn], no_color: bool) -> None:
    alice = daemon.client("alice")
    bob = spawn_tty(daemon.port, "bob", **({"NO_COLOR": "1"} if no_color else {}))
    ttys.append(bob)
    alice.send("/me shows_a_color")
    bob.expect("shows_a_color")
    assert bool(sgr_colors(bob.before + bob.after)) != no_color
    assert quit_tty(bob) == 0


def test_dumb_terminal(daemon: Daemon, ttys: list[pexpect.spawn]) -> None:
    alice = daemon.client("alice")
    bob = spawn_tty(daemon.port, "bob", TERM="dumb")
    ttys.append(bob)
    bob.send("typed_")
    bob.expect("typed_")
    alice.send("to_a_dumb_terminal")
    bob.expect("to_a_dumb_terminal\r\n")
    bob.expect_exact("bob> typed_")  # below the message, what bob was typing, again
    bob.send("from_a_dumb_terminal\r")
    assert alice.recv_text("bob") == "typed_from_a_dumb_terminal"
    bob.expect("typed_from_a_dumb_terminal")
    assert not sgr_colors(bob.before)
    bob.send("/quit\r")
    bob.expect(pexpect.EOF)
    bob.close()
    assert bob.exitstatus == 0


def test_ctrl_c_in_interactive_mode(daemon: Daemon, ttys: list[pexpect.spawn]) -> None:
    bob = spawn_tty(daemon.port, "bob")
    ttys.append(bob)
    bob.send("some_text")
    bob.expect("some_text")
    bob.sendintr()
    bob.expect(pexpect.EOF)
    bob.close()
    assert bob.exitstatus == session.INTERRUPTED
    assert "Traceback" not in (bob.before or "")
    daemon.wait_for("leave", user="bob")


def test_interactive_reconnect(start: Callable[..., Daemon], ttys: list[pexpect.spawn]) -> None:
    first = start()
    port = first.port
    bob = spawn_tty(port, "bob", "--reconnect")
    ttys.append(bob)
    first.stop()
    bob.expect("the server is shutting down; reconnecting in")
    bob.expect(re.escape("(offline)"))
    bob.send("/who\r")
    bob.expect("not connected; message not sent")
    second = start({"listen": [f"127.0.0.1:{port}"]})
    bob.expect(f"reconnected to 127.0.0.1 port {port}", timeout=60)
    alice = second.client("alice")
    alice.send("welcome_back")
    bob.expect("welcome_back")
    assert quit_tty(bob) == 0


def test_interactive_connection_lost(daemon: Daemon, ttys: list[pexpect.spawn]) -> None:
    bob = spawn_tty(daemon.port, "bob")
    ttys.append(bob)
    bob.send("unsent")
    daemon.proc.kill()
    bob.expect(f"chat: connection to 127.0.0.1 port {daemon.port} lost")
    bob.expect(pexpect.EOF)
    bob.close()
    assert bob.exitstatus == session.LOST


@pytest.mark.parametrize("length", ["5", "20"])
def test_a_header_length_the_daemon_does_not_use_is_named(daemon: Daemon, length: str) -> None:
    done = run_chat(daemon.port, "--header-length", length, "-u", "ci", "127.0.0.1", stdin="hi\n")
    assert done.returncode == session.USAGE
    assert done.stderr == (
        f"chat: 127.0.0.1 port {daemon.port} sends frames with another header length (10); "
        f"the daemon's header_length must match --header-length ({length})\n"
    )


def test_a_line_the_daemon_would_refuse_is_not_sent(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    done = run_chat(daemon.port, "-u", "ci", "127.0.0.1", stdin="fine\nabc\u202edcba\nalso fine\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        "chat: line 2 not sent: messages may not contain bidirectional controls such as "
        "U+202E RIGHT-TO-LEFT OVERRIDE, which reorder what the others see\n"
    )
    alice.expect(NOTICE, "ci joined")
    alice.expect("ci", "fine")
    alice.expect("ci", "also fine")


def test_a_terminal_shows_the_replay_dimmed_between_two_lines(
    daemon: Daemon, ttys: list[pexpect.spawn]
) -> None:
    alice = daemon.client("alice")
    alice.send("said_before_bob_came")
    daemon.wait_for("message", user="alice")
    bob = spawn_tty(daemon.port, "bob")  # up to its prompt, after the replay
    ttys.append(bob)
    shown = bob.before
    assert re.search(r"-- 1 earlier message.*said_before_bob_came.*-- now", shown, re.S), shown
    line = shown[shown.index("1 earlier message") : shown.index("-- now")]
    dim = [p for p in re.findall(r"\x1b\[([0-9;]*)m", line) if "2" in p.split(";")]
    assert dim, repr(line)
    assert quit_tty(bob) == 0


def test_chat_in_a_pipe_shows_the_original_times_and_json_says_history(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    alice.send("said first")
    daemon.wait_for("message", user="alice")
    said = time.time()
    time.sleep(1.1)  # a second later, so the time shown is the original's
    plain = subprocess.run(
        [*CHAT, "-p", str(daemon.port), "-u", "pipe", "127.0.0.1"],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert lines[1][9:] == "chatd: 1 earlier message" and lines[3][9:] == "chatd: now"
    shown = datetime.strptime(lines[2][:8], "%H:%M:%S").time()
    assert lines[2][8:] == " alice: said first"
    assert abs(datetime.combine(datetime.now().date(), shown).timestamp() - int(said)) <= 1, lines[
        2
    ]
    js = subprocess.run(
        [*CHAT, "-p", str(daemon.port), "--json", "-u", "json", "127.0.0.1"],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    docs = [json.loads(line) for line in js.stdout.splitlines()]
    assert [(d["type"], d["from"], d["text"]) for d in docs[1:4]] == [
        ("notice", "chatd", "1 earlier message"),
        ("history", "alice", "said first"),
        ("notice", "chatd", "now"),
    ]
    when = datetime.fromisoformat(docs[2]["time"])
    assert when.tzinfo is not None and abs(when.timestamp() - said) < 1.5
    assert abs(datetime.fromisoformat(docs[1]["time"]).timestamp() - time.time()) < 10
