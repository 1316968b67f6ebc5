"""Every notice the daemon sends, as a named template with a stable kind.

A notice is an ordinary frame pair from the reserved sender ``chatd``, so any client
shows it; its text is written for people.  Programs (the `chat` client above all) must
not guess what a notice means from its words: they ask `recognize()`, which answers
with the template the text was made from, so a change of wording is made here, once,
and both ends follow.

Fields are filled with `str.format`.  ``{name}`` is a user name, which never contains
whitespace; ``{name!r}`` is one in quotes; every other field may be any text.  A
template with ``ends=True`` is the last thing the daemon sends before it closes the
connection: its kind is the reason the connection ended.
"""

from __future__ import annotations

import re
import string
import time
from typing import Any


class Notice:
    """One template: ``NOTICE(**fields)`` is the text; ``match(text)`` reads one back."""

    __slots__ = ("_pattern", "ends", "kind", "template")

    def __init__(self, kind: str, template: str, *, ends: bool = False) -> None:
        self.kind = kind
        self.template = template
        self.ends = ends
        self._pattern = _compile(template)

    def __call__(self, **fields: Any) -> str:
        return self.template.format(**fields)

    def match(self, text: str) -> dict[str, str] | None:
        """The fields ``text`` was made with, or None if it was not made from this template."""
        m = self._pattern.fullmatch(text)
        return None if m is None else m.groupdict()

    def __repr__(self) -> str:
        return f"<Notice {self.kind}>"


def _compile(template: str) -> re.Pattern[str]:
    parts = []
    for literal, field, _, conversion in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is None:
            continue
        if field == "name" and not conversion:
            parts.append(r"(?P<name>\S+)")
        else:
            parts.append(f"(?P<{field}>.*)")
    return re.compile("".join(parts), re.DOTALL)


ALL: list[Notice] = []  # in the order recognize() tries them: the more specific first


def _notice(kind: str, template: str, *, ends: bool = False) -> Notice:
    notice = Notice(kind, template, ends=ends)
    ALL.append(notice)
    return notice


# Joining.  ``terms`` of a ban: " until 2026-11-25 19:00:00 UTC" and/or ": REASON", or "".
WELCOME = _notice("welcome", "welcome, {name}; {online}")
NAME_BANNED = _notice("name_banned", "name rejected: {name!r} is banned{terms}", ends=True)
NAME_TAKEN = _notice("name_taken", "name rejected: {name!r} is already taken", ends=True)
NAME_LOOKALIKE = _notice(
    "name_lookalike", "name rejected: {name!r} looks like {other!r}, who is online", ends=True
)
NAME_INVALID = _notice("name_invalid", "name rejected: {problem}", ends=True)
ADDRESS_BANNED = _notice(
    "address_banned", "connection refused: your address is banned{terms}", ends=True
)
SERVER_FULL = _notice("server_full", "the server is full, try again later", ends=True)
SERVER_BUSY = _notice(
    "server_busy", "too many connections are joining, try again in a moment", ends=True
)
TOO_MANY_FROM_ADDRESS = _notice(
    "too_many_from_address", "too many connections from {host}, try again later", ends=True
)
HANDSHAKE_TIMEOUT = _notice(
    "handshake_timeout", "timed out: no name within {seconds} seconds", ends=True
)

# The room.  ``reason`` of a kick or ban: " (REASON)" or "".
JOINED = _notice("joined", "{name} joined")
LEFT = _notice("left", "{name} left ({reason})")
# Several of those in a row, as one notice (a join storm): ``names`` is a list in
# join order, "alice, bob and carol" or "alice, bob and 148 others" (`names_and_others`).
JOINED_MANY = _notice("joined_many", "{names} joined")
LEFT_MANY = _notice("left_many", "{names} left ({reason})")
USER_KICKED = _notice("user_kicked", "{name} was kicked{reason}")
USER_BANNED = _notice("user_banned", "{name} was banned{reason}")
WHO = _notice("who", "online ({count}): {names}")

# The history: what a newcomer is replayed, and /history's answer, come between these
# (``s`` is "s" but for one message); the messages come from senders that say when.
HISTORY_NONE = _notice("history_none", "no earlier messages")
HISTORY_BEGIN = _notice("history_begin", "{count} earlier message{s}")
HISTORY_END = _notice("history_end", "now")
HISTORY_OFF = _notice("history_off", "no history is kept on this server")

# Answers to what a user sent.
NOBODY_CALLED = _notice("nobody_called", "message not sent: nobody called {name!r} is online")
NOBODY_CALLED_HERE = _notice(
    "nobody_called_here",
    "message not sent: nobody called {name!r} is on this server, and the link to the "
    "other servers is down",
)
TO_YOURSELF = _notice("to_yourself", "message not sent: {name!r} is you")
NOT_SENT = _notice("not_sent", "message not sent: {problem}")
SLOW_DOWN = _notice(
    "slow_down",
    "slow down: your messages are not being sent (the limit is {rate} a second, {burst} at once)",
)
NOT_A_COMMAND = _notice("not_a_command", "a / alone is not a command; /help lists the commands")
UNKNOWN_COMMAND = _notice("unknown_command", "unknown command /{command}; /help lists the commands")
USAGE = _notice("usage", "usage: {usage}")
HELP = tuple(
    _notice("help", line)
    for line in (
        "commands:",
        "/who - who is online",
        "/msg NAME TEXT - a private message to NAME alone",
        "/me ACTION - an action, shown to the others as * NAME ACTION",
        "/history [N] - the last N messages said here (20, at most 100)",
        "/quit - leave the chat",
        "//TEXT - send the message /TEXT",
        "/help - this list",
    )
)

# The end of a connection that had joined.  ``why`` of a kick: ": REASON" or "".
PROTOCOL_ERROR = _notice("protocol_error", "protocol error: {error}", ends=True)
FLOODING = _notice(
    "flooding", "disconnected for flooding: {count} messages over the limit", ends=True
)
IDLE = _notice("idle", "disconnected: nothing sent for {seconds} seconds", ends=True)
SHUTDOWN = _notice("shutdown", "the server is shutting down", ends=True)
RESTARTED = _notice("restarted", "chatd restarted (version {version})")
RESTART_LOST = _notice(
    "restart_lost",
    "the server restarted without what it knew of your connection; reconnect",
    ends=True,
)
RESTART_FAILED = _notice(
    "restart_failed", "the server could not restart ({error}); reconnect later", ends=True
)
# Several nodes, one room (cluster.redis).
CLUSTER_DOWN = _notice(
    "cluster_down", "the link to the other servers is down; messages reach this server only"
)
CLUSTER_UP = _notice("cluster_up", "the link to the other servers is back")
CLUSTER_MISSED = _notice(
    "cluster_missed",
    "you may have missed {count} messages from the other servers (past the shared history)",
)
CLUSTER_HISTORY_LOST = _notice(
    "cluster_history_lost",
    "the shared history was lost (Redis restarted): you may have missed messages from the "
    "other servers",
)
NODE_LOST = "server {node} lost"  # the reason of a LEFT notice for the users of a lost node
NAME_TAKEN_CLUSTER = _notice(
    "name_taken_cluster",
    "disconnected: while this server was cut off, another server gave {name!r} to someone else",
    ends=True,
)
KICKED = _notice("kicked", "you were kicked by an admin{why}", ends=True)
BANNED = _notice("banned", "you were banned by an admin{terms}", ends=True)


def recognize(text: str) -> Notice | None:
    """The template ``text`` was made from; None for anything else (an admin's `say`)."""
    for notice in ALL:
        if notice._pattern.fullmatch(text):
            return notice
    return None


def names_and_others(names: list[str], shown: int) -> str:
    """ "alice, bob and carol", or with more than ``shown`` names "alice, bob and 148
    others" (never "and 1 others": then the last name is shown too)."""
    if len(names) <= shown + 1:
        return f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else "".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown} others"


def parenthesized(reason: str) -> str:
    """ " (REASON)", or "" for no reason: the ``reason`` field of a kick or ban in the room."""
    return f" ({reason})" if reason else ""


def utc(t: float) -> str:
    """A time as notices show it: "2026-11-25 19:00:00 UTC"."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
