"""The daemon over real sockets: chat, bad input, timeouts, eviction, shutdown."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from helpers import CROWD, NOTICE, Client, Daemon, frame


def test_broadcast_reaches_everyone_but_the_sender(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    bob = daemon.client("bob")
    alice.expect(NOTICE, "bob joined")
    carol = daemon.client("carol")
    alice.expect(NOTICE, "carol joined")
    bob.expect(NOTICE, "carol joined")

    alice.send("hello, room")
    bob.expect("alice", "hello, room")
    carol.expect("alice", "hello, room")
    carol.send("hi alice")
    alice.expect("carol", "hi alice")
    bob.expect("carol", "hi alice")
    alice.expect_nothing()  # her own message never came back
    carol.expect_nothing()
    daemon.wait_for("message", user="alice", bytes=11, text="hello, room")


def test_newcomer_is_told_who_is_online(daemon: Daemon) -> None:
    others = [daemon.client("alice"), daemon.client("bob")]
    carol = Client(daemon.port)
    carol.send("carol")
    assert carol.recv() == (NOTICE, "welcome, carol; online: alice, bob")
    assert len(others) == 2


def test_leave_is_announced_with_its_reason(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    bob = daemon.client("bob")
    alice.expect(NOTICE, "bob joined")
    bob.close()
    alice.expect(NOTICE, "bob left (quit)")
    daemon.wait_for("leave", user="bob", reason="quit")


def test_frames_split_into_single_bytes(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    bob = Client(daemon.port)
    for byte in frame("bob") + frame("split ünicode"):
        bob.send_raw(bytes([byte]))
        time.sleep(0.001)
    assert bob.recv()[1].startswith("welcome, bob")
    alice.expect(NOTICE, "bob joined")
    alice.expect("bob", "split ünicode")


def test_fifty_frames_in_one_send_with_the_name(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    bob = Client(daemon.port)
    bob.send_raw(frame("bob") + b"".join(frame(f"message {i}") for i in range(50)))
    alice.expect(NOTICE, "bob joined")
    for i in range(50):
        alice.expect("bob", f"message {i}")


@pytest.mark.parametrize(
    ("data", "notice"),
    [
        (b"abc       hello", "protocol error: bad frame header 'abc       '"),
        (b"-5        hello", "protocol error: bad frame header '-5        '"),
        (b"          hello", "protocol error: bad frame header '          '"),
        (
            b"5000      " + b"x" * 10,
            "protocol error: frame of 5000 bytes is over the limit of 4096",
        ),
        (b"9999999999", "protocol error: frame of 9999999999 bytes is over the limit of 4096"),
        (b"2         \xc3\x28", "protocol error: the payload is not valid UTF-8"),
    ],
)
def test_bad_input_gets_a_notice_and_a_disconnect_and_nobody_else_sees_it(
    daemon: Daemon, data: bytes, notice: str
) -> None:
    alice = daemon.client("alice")
    mallory = daemon.client("mallory")
    alice.expect(NOTICE, "mallory joined")
    mallory.send_raw(data)
    got = mallory.expect_closed()
    assert len(got) == 1 and got[0][0] == NOTICE and got[0][1].startswith(notice), got
    alice.expect(NOTICE, "mallory left (protocol error)")
    alice.expect_nothing()
    # The room still works.
    bob = daemon.client("bob")
    alice.expect(NOTICE, "bob joined")
    bob.send("still here")
    alice.expect("bob", "still here")
    daemon.wait_for("leave", user="mallory", reason="protocol error")


@pytest.mark.parametrize(
    ("name", "notice"),
    [
        (b"", "name rejected: the name is empty"),
        (b"a" * 33, "name rejected: the name is too long (at most 32 bytes)"),
        (b"two words", "name rejected: the name contains a space"),
        (b"bell\x07", "name rejected: the name contains a control character (U+0007)"),
        (b"\xff\xfe", "name rejected: the payload is not valid UTF-8"),
        (b"chatd", "name rejected: the name 'chatd' is reserved"),
        (b"ALICE", "name rejected: 'ALICE' is already taken"),
    ],
)
def test_bad_names_are_refused_with_the_reason(daemon: Daemon, name: bytes, notice: str) -> None:
    alice = daemon.client("alice")
    impostor = Client(daemon.port)
    impostor.send_raw(frame(name) + frame("I am alice"))
    assert impostor.expect_closed() == [(NOTICE, notice)]
    alice.expect_nothing()
    assert daemon.find("rejected")


def test_control_characters_in_a_message_are_refused_but_not_fatal(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    bob = daemon.client("bob")
    alice.expect(NOTICE, "bob joined")
    bob.send("hi\nalice > I owe bob money")
    assert bob.recv()[1].startswith("message not sent: messages may not contain control")
    bob.send("ok")
    alice.expect("bob", "ok")


def test_empty_messages_are_ignored(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    bob = daemon.client("bob")
    alice.expect(NOTICE, "bob joined")
    bob.send("")
    bob.send("after")
    alice.expect("bob", "after")


def test_handshake_timeout(start: Callable[..., Daemon]) -> None:
    daemon = start({"handshake_timeout": 0.3})
    silent = Client(daemon.port)
    t0 = time.monotonic()
    assert silent.expect_closed() == [(NOTICE, "timed out: no name within 0.3 seconds")]
    assert 0.25 < time.monotonic() - t0 < 3
    daemon.wait_for("rejected", reason="handshake timeout")
    # A half-sent name is no better.
    slow = Client(daemon.port)
    slow.send_raw(b"5         al")
    assert slow.expect_closed()[0][1].startswith("timed out")


# A client that never reads: see test_abuse.py (8 MB here, 50 MB in the slow run).


def test_sigterm_sends_a_notice_and_exits_0(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    bob = daemon.client("bob")
    alice.expect(NOTICE, "bob joined")
    pending = Client(daemon.port)  # connected but never named
    daemon.signal(signal.SIGTERM)
    assert alice.expect_closed() == [(NOTICE, "the server is shutting down")]
    assert bob.expect_closed() == [(NOTICE, "the server is shutting down")]
    assert pending.expect_closed() == [(NOTICE, "the server is shutting down")]
    assert daemon.stop() == 0
    daemon.wait_for("shutdown", unflushed=0)


def test_messages_accepted_in_the_pass_of_sigterm_are_delivered_before_the_notice(
    daemon: Daemon,
) -> None:
    alice = daemon.client("alice")
    bob = daemon.client("bob")
    alice.expect(NOTICE, "bob joined")
    # Stopped, chatd finds alice's message and SIGTERM in the same pass when it
    # goes on (the message first: it was ready first).
    daemon.signal(signal.SIGSTOP)
    try:
        alice.send("last words")
        time.sleep(0.2)
        daemon.signal(signal.SIGTERM)
    finally:
        daemon.signal(signal.SIGCONT)
    assert daemon.stop() == 0
    daemon.wait_for("message", user="alice")  # accepted, so it must reach bob
    assert bob.expect_closed() == [("alice", "last words"), (NOTICE, "the server is shutting down")]
    assert alice.expect_closed() == [(NOTICE, "the server is shutting down")]


def test_sigint_also_shuts_down(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    daemon.signal(signal.SIGINT)
    assert alice.expect_closed() == [(NOTICE, "the server is shutting down")]
    assert daemon.stop() == 0
    assert daemon.wait_for("shutdown_begin")["signal"] == "SIGINT"


def test_shutdown_does_not_wait_past_the_grace_time_for_a_stuck_client(
    start: Callable[..., Daemon],
) -> None:
    daemon = start({"shutdown_grace": 0.5})
    stuck = daemon.client("stuck")  # reads nothing, never closes
    t0 = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - t0 < 5
    stuck.close()
    # Measured by the daemon's clock: the grace time, not a later timer (2 s).
    begin = datetime.fromisoformat(daemon.wait_for("shutdown_begin")["timestamp"])
    end = datetime.fromisoformat(daemon.wait_for("shutdown")["timestamp"])
    assert 0.4 < (end - begin).total_seconds() < 1.5


def test_port_in_use_is_a_one_line_error(daemon: Daemon, tmp_path: Path) -> None:
    cfg = tmp_path / "second.yaml"
    cfg.write_text(f'listen: ["127.0.0.1:{daemon.port}"]\ncontrol: {{socket: ""}}\n')
    r = subprocess.run(
        [sys.executable, "-m", "chatd", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert (
        r.stderr
        == f"chatd: error: cannot listen on 127.0.0.1:{daemon.port}: address already in use\n"
    )


def test_max_clients(start: Callable[..., Daemon]) -> None:
    daemon = start({"max_clients": 2})
    alice = daemon.client("alice")
    bob = daemon.client("bob")
    third = Client(daemon.port)
    assert third.expect_closed() == [(NOTICE, "the server is full, try again later")]
    daemon.wait_for("rejected", reason="server full")
    alice.expect(NOTICE, "bob joined")
    bob.close()
    alice.expect(NOTICE, "bob left (quit)")
    daemon.client("carol")  # a place is free again


def test_ipv6_listener(start: Callable[..., Daemon]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 on this machine")
    daemon = start({"listen": ["[::1]:0", "127.0.0.1:0"]})
    assert daemon.listen[0].startswith("[::1]:")
    v6 = Client(int(daemon.listen[0].rsplit(":", 1)[1]), host="::1")
    v6.join("six")
    v4 = Client(int(daemon.listen[1].rsplit(":", 1)[1]))
    v4.join("four")
    v4.send("hello over v4")
    assert v6.recv_text("four") == "hello over v4"


def test_other_header_length(start: Callable[..., Daemon]) -> None:
    daemon = start({"header_length": 4, "max_message_bytes": 500})
    alice = daemon.client("alice", header_length=4)
    bob = daemon.client("bob", header_length=4)
    alice.expect(NOTICE, "bob joined")
    bob.send("short headers")
    alice.expect("bob", "short headers")


def test_notices_are_cut_to_fit_a_short_header(start: Callable[..., Daemon]) -> None:
    # With 3-byte headers a frame holds 999 bytes: the welcome and /who in a
    # room of 40 long names, or a notice quoting a long message, must fit.
    daemon = start({"header_length": 3, "max_message_bytes": 999, **CROWD})
    members = [Client(daemon.port, header_length=3) for _ in range(40)]
    for i, m in enumerate(members):
        welcome = m.join(f"member-with-a-long-name-{i:02}")[0][1]
        assert len(welcome.encode()) <= 999
    assert welcome.endswith(" more")
    last = members[-1]
    last.send("/who")
    who = last.recv_text(NOTICE)
    assert who.startswith("online (40): member-with-a-long-name-00, ")
    assert who.endswith(" more") and len(who.encode()) <= 999
    last.send("/msg " + "x" * 990 + " hi")
    refused = last.recv_text(NOTICE)
    assert refused.startswith("message not sent: nobody called 'xxx")
    assert len(refused.encode()) <= 999
    last.send("still here")
    assert members[0].recv_text(last.name) == "still here"
    assert not daemon.find("internal_error")


def test_the_tutorial_client_chats_through_chatd(daemon: Daemon) -> None:
    script = Path(__file__).with_name("tutorial_client.py")

    def tutorial() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(script), str(daemon.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    a, b = tutorial(), tutorial()
    assert a.stdin and b.stdin
    a.stdin.write("alice\n")
    a.stdin.flush()
    daemon.wait_for("join", user="alice")
    b.stdin.write("bob\n")
    b.stdin.flush()
    daemon.wait_for("join", user="bob")
    a.stdin.write("hello from the tutorial\n")
    a.stdin.flush()
    daemon.wait_for("message", user="alice")
    time.sleep(0.2)
    b_out, _ = b.communicate("\n", timeout=10)  # Enter shows what arrived
    a_out, _ = a.communicate("", timeout=10)
    assert "alice > hello from the tutorial" in b_out
    assert "chatd > welcome, bob; online: alice" in b_out
    assert "chatd > bob joined" in a_out or "chatd > welcome, alice" in a_out


def test_a_look_alike_of_a_user_online_is_refused(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    impostor = Client(daemon.port)
    impostor.send_raw(frame("\u0430lice") + frame("I am the real alice"))
    assert impostor.expect_closed() == [
        (NOTICE, "name rejected: '\u0430lice' looks like 'alice', who is online")
    ]
    alice.expect_nothing()
    assert daemon.find("rejected", reason="name taken", like="alice")
