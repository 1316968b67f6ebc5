"""In-band commands: a message that starts with '/' is meant for the daemon.

They work from any client, the classic tutorial's included, because the
answers are ordinary frame pairs.  `parse()` is pure: it turns the text of a
message into an action; `run()` carries the action out on the server.

How the answers look on the wire (user names never contain whitespace, so a
sender with a space in it can only come from the daemon and cannot be forged):

- a private message from alice reaches its one recipient as the pair
  ``("alice (private)", text)``;
- an action (``/me waves``) reaches everyone else as ``("* alice", "waves")``;
- everything else (``/who``, ``/help``, usage errors, unknown commands) is a
  notice from ``chatd`` to the sender alone; an unknown command is never
  broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatd.protocol import max_length
from chatd.room import NOTICE_SENDER

if TYPE_CHECKING:
    from chatd.connection import Connection
    from chatd.server import Server

PRIVATE_SUFFIX = " (private)"
ACTION_PREFIX = "* "
WHO_MAX_BYTES = 4000  # a /who answer lists names up to about this size, then "and N more"

HELP = (
    "commands:",
    "/who - who is online",
    "/msg NAME TEXT - a private message to NAME alone",
    "/me ACTION - an action, shown to the others as * NAME ACTION",
    "/quit - leave the chat",
    "//TEXT - send the message /TEXT",
)


@dataclass(frozen=True)
class Say:
    """Broadcast ``text`` as an ordinary message (``//text``)."""

    text: str


@dataclass(frozen=True)
class Act:
    """Broadcast an action."""

    text: str


@dataclass(frozen=True)
class Private:
    """Send ``text`` to the user called ``to`` alone."""

    to: str
    text: str


@dataclass(frozen=True)
class Who:
    pass


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class Reply:
    """Answer the sender with notices, one per line (help, usage, unknown command)."""

    lines: tuple[str, ...]


Action = Say | Act | Private | Who | Quit | Reply


def private_sender(name: str) -> str:
    return name + PRIVATE_SUFFIX


def action_sender(name: str) -> str:
    return ACTION_PREFIX + name


def parse(text: str) -> Action:
    """The action a message starting with '/' asks for."""
    body = text[1:]
    if body.startswith("/"):
        return Say(body)
    parts = body.split(maxsplit=1) if body and not body[0].isspace() else []
    if not parts:
        return Reply(("a / alone is not a command; /help lists the commands",))
    command = parts[0].lower()
    rest = parts[1] if len(parts) > 1 else ""
    if command == "who":
        return Who()
    if command == "help":
        return Reply(HELP)
    if command == "quit":
        return Quit()
    if command == "me":
        action = rest.strip()
        return Act(action) if action else Reply(("usage: /me ACTION",))
    if command == "msg":
        words = rest.split(maxsplit=1)
        if len(words) < 2 or not words[1].strip():
            return Reply(("usage: /msg NAME TEXT",))
        target, message = words
        return Private(target, message)
    shown = parts[0] if len(parts[0]) <= 32 else parts[0][:32] + "..."
    return Reply((f"unknown command /{shown}; /help lists the commands",))


def list_bytes(header_length: int, before: int = 0) -> int:
    """How long a list of names may be in a notice: WHO_MAX_BYTES, or less when
    the frame header allows less (``before``: bytes of the notice before the list,
    room is left for " and N more" after it)."""
    return min(WHO_MAX_BYTES, max_length(header_length) - before - 24)


def who_line(names: list[str], max_bytes: int = WHO_MAX_BYTES) -> str:
    """The /who answer: every name, or as many as fit in about ``max_bytes``."""
    head = f"online ({len(names)}): "
    size = len(head.encode())
    shown: list[str] = []
    for i, name in enumerate(names):
        size += len(name.encode()) + 2
        if size > max_bytes:
            return head + ", ".join(shown) + f" and {len(names) - i} more"
        shown.append(name)
    return head + ", ".join(shown)


def run(server: Server, conn: Connection, text: str) -> None:
    """Carry out the command in ``text`` (a valid message starting with '/')."""
    room = server.room
    action = parse(text)
    if isinstance(action, Say):
        room.post(conn, action.text)
        server.message_accepted(conn, action.text)
    elif isinstance(action, Act):
        room.post(conn, action.text, as_name=action_sender(conn.name))
        server.message_accepted(conn, action.text, kind="action")
    elif isinstance(action, Private):
        target = room.get(action.to)
        if target is None:
            room.send_to(
                conn, NOTICE_SENDER, f"message not sent: nobody called {action.to!r} is online"
            )
            return
        room.send_to(target, private_sender(conn.name), action.text)
        server.message_accepted(conn, action.text, kind="private", to=target.name)
    elif isinstance(action, Who):
        room.send_to(conn, NOTICE_SENDER, who_line(room.names(), list_bytes(room.header_length)))
    elif isinstance(action, Quit):
        server.drop(conn, "quit")
    else:
        for line in action.lines:
            room.send_to(conn, NOTICE_SENDER, line)
