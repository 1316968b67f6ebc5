"""In-band commands: parsing (pure) and their effect on a real daemon."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import NOTICE, Client, Daemon, expect_joins

from chatd.core import commands
from chatd.wire import chat, notices
from chatd.wire.chat import Act, Private, Quit, Reply, Say, Who

# Parsing.


@pytest.mark.parametrize(
    ("text", "action"),
    [
        ("/who", Who()),
        ("/WHO", Who()),
        ("/who is there", Who()),
        ("/quit", Quit()),
        ("//who", Say("/who")),
        ("//", Say("/")),
        ("///x", Say("//x")),
        ("/me waves", Act("waves")),
        ("/me   waves  twice ", Act("waves  twice")),
        ("/me\twaves", Act("waves")),
        ("/me", Reply(("usage: /me ACTION",))),
        ("/me   ", Reply(("usage: /me ACTION",))),
        ("/msg bob hi there", Private("bob", "hi there")),
        ("/msg  bob   hi  there", Private("bob", "hi  there")),
        ("/MSG Bob hi", Private("Bob", "hi")),
        ("/msg bob", Reply(("usage: /msg NAME TEXT",))),
        ("/msg bob   ", Reply(("usage: /msg NAME TEXT",))),
        ("/msg", Reply(("usage: /msg NAME TEXT",))),
        ("/help", Reply(tuple(line() for line in notices.HELP))),
        ("/", Reply(("a / alone is not a command; /help lists the commands",))),
        ("/ who", Reply(("a / alone is not a command; /help lists the commands",))),
        ("/frob x", Reply(("unknown command /frob; /help lists the commands",))),
        ("/" + "x" * 40, Reply((f"unknown command /{'x' * 32}...; /help lists the commands",))),
    ],
)
def test_parse(text: str, action: chat.Command) -> None:
    assert chat.parse(text) == action


def test_who_line_lists_everyone_when_it_fits() -> None:
    assert commands.who_line(["alice"]) == "online (1): alice"
    assert commands.who_line(["alice", "bob", "carol"]) == "online (3): alice, bob, carol"


def test_who_line_is_bounded() -> None:
    names = [f"user{i:04d}" for i in range(2000)]
    line = commands.who_line(names, max_bytes=200)
    assert line.startswith("online (2000): user0000, user0001, ")
    assert line.endswith(" more")
    shown = line.split(": ", 1)[1].rsplit(" and ", 1)
    count = len(shown[0].split(", "))
    assert shown[1] == f"{2000 - count} more"
    assert len(line.encode()) <= 200 + len(" and 2000 more")


def test_special_senders_cannot_be_user_names() -> None:
    from chatd.core.names import name_problem

    assert name_problem(chat.private_sender("alice"), 32)
    assert name_problem(chat.action_sender("alice"), 32)


# On the daemon.


def three(daemon: Daemon) -> tuple[Client, Client, Client]:
    alice = daemon.client("alice")
    bob = daemon.client("bob")
    carol = daemon.client("carol")
    expect_joins(alice, "bob", "carol")  # one notice or two, as they came
    bob.expect(NOTICE, "carol joined")
    return alice, bob, carol


def test_who_answers_the_sender_alone(daemon: Daemon) -> None:
    alice, bob, carol = three(daemon)
    bob.send("/who")
    bob.expect(NOTICE, "online (3): alice, bob, carol")
    alice.expect_nothing()
    carol.expect_nothing()


def test_private_message_reaches_its_target_only(daemon: Daemon) -> None:
    alice, bob, carol = three(daemon)
    alice.send("/msg BOB psst, bob")
    bob.expect("alice (private)", "psst, bob")
    alice.expect("alice -> bob (private)", "psst, bob")  # it went, to bob as he is named
    alice.send("after")  # ordered with the broadcasts
    bob.expect("alice", "after")
    carol.expect("alice", "after")
    alice.expect_nothing()
    carol.expect_nothing()
    daemon.wait_for("message", user="alice", kind="private", to="bob", text="psst, bob")


def test_a_private_message_to_oneself_is_refused(daemon: Daemon) -> None:
    alice, bob, _ = three(daemon)
    alice.send("/msg ALICE note to self")
    alice.expect(NOTICE, "message not sent: 'ALICE' is you")
    bob.expect_nothing()
    assert not daemon.find("message", user="alice")


def test_private_message_to_nobody_is_refused(daemon: Daemon) -> None:
    alice, bob, _ = three(daemon)
    alice.send("/msg dave hello?")
    alice.expect(NOTICE, "message not sent: nobody called 'dave' is online")
    bob.expect_nothing()
    assert not daemon.find("message", user="alice")


def test_me_is_an_action_for_the_others(daemon: Daemon) -> None:
    alice, bob, carol = three(daemon)
    alice.send("/me waves")
    bob.expect("* alice", "waves")
    carol.expect("* alice", "waves")
    alice.expect_nothing()
    daemon.wait_for("message", user="alice", kind="action", text="waves")


def test_double_slash_sends_the_literal_line(daemon: Daemon) -> None:
    alice, bob, carol = three(daemon)
    alice.send("//who")
    bob.expect("alice", "/who")
    carol.expect("alice", "/who")
    alice.expect_nothing()


def test_unknown_command_is_never_broadcast(daemon: Daemon) -> None:
    alice, bob, carol = three(daemon)
    alice.send("/frobnicate now")
    alice.expect(NOTICE, "unknown command /frobnicate; /help lists the commands")
    bob.expect_nothing()
    carol.expect_nothing()
    assert not daemon.find("message", user="alice")


def test_usage_errors_answer_the_sender(daemon: Daemon) -> None:
    alice, bob, _ = three(daemon)
    alice.send("/msg bob")
    alice.expect(NOTICE, "usage: /msg NAME TEXT")
    alice.send("/me")
    alice.expect(NOTICE, "usage: /me ACTION")
    bob.expect_nothing()


def test_help_lists_the_commands(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    alice.send("/help")
    for line in notices.HELP:
        alice.expect(NOTICE, line())


def test_quit_leaves(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    bob = daemon.client("bob")
    bob.send("/quit")
    assert bob.expect_closed() == []
    alice.expect(NOTICE, "bob joined")
    alice.expect(NOTICE, "bob left (quit)")


def test_commands_with_control_characters_are_refused(daemon: Daemon) -> None:
    alice, bob, _ = three(daemon)
    alice.send("/msg bob hi\nchatd: fake")
    alice.expect(
        NOTICE,
        "message not sent: messages may not contain control characters such as newlines or escapes",
    )
    bob.expect_nothing()


def test_the_tutorial_client_shows_private_messages_and_actions(daemon: Daemon) -> None:
    script = Path(__file__).with_name("tutorial_client.py")
    tutorial = subprocess.Popen(
        [sys.executable, str(script), str(daemon.port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert tutorial.stdin
        tutorial.stdin.write("bob\n")
        tutorial.stdin.flush()
        daemon.wait_for("join", user="bob")
        alice = daemon.client("alice")
        alice.send("/msg bob just for you")
        alice.send("/me waves")
        daemon.wait_for("message", user="alice", kind="action")
        time.sleep(0.2)
        out, _ = tutorial.communicate("\n", timeout=10)  # Enter shows what arrived
    finally:
        if tutorial.poll() is None:
            tutorial.kill()
            tutorial.wait()
    assert "alice (private) > just for you" in out
    assert "* alice > waves" in out
