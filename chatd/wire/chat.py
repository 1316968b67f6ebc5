"""The chat's conventions on top of framing: senders, markers and the in-band commands.

The daemon sends every message as the frame pair (sender, text).  User names never
contain whitespace, so a sender with a space in it can only come from the daemon and
cannot be forged:

- ``chatd`` (`NOTICE_SENDER`) sends the server's notices (see notices.py);
- a private message from alice reaches its one recipient from ``alice (private)``,
  and alice is told it went with the same text from ``alice -> bob (private)``;
- an action (``/me waves``) reaches everyone else from ``* alice``;
- a message replayed from the history (on joining, or asked for with /history) comes
  from ``alice [2026-11-25 14:03:07 UTC]``: the name, a space, and the time it was
  said in brackets, as ban notices write times.  No user name ends in ']' (names.py),
  so not even a look-alike without the space can pass for one.

A message that starts with '/' is a command for the daemon.  `parse()` turns its text
into what it asks for, without doing any of it; the daemon carries it out, and the
client uses the same grammar to know which of its lines are commands.
"""

from __future__ import annotations

import calendar
import re
import time
import unicodedata
from dataclasses import dataclass

from chatd.wire import notices

DEFAULT_PORT = 1234
NOTICE_SENDER = "chatd"
PRIVATE_SUFFIX = " (private)"
ACTION_PREFIX = "* "
WHO_MAX_BYTES = 4000  # a list of names (/who, the welcome) is cut after about this size
HISTORY_FORMAT = "%Y-%m-%d %H:%M:%S UTC"  # the time in a replayed message's sender
HISTORY_END = "]"  # how a replayed message's sender ends (and no user name may)
HISTORY_DEFAULT = 20  # messages /history sends without a count
HISTORY_MAX = 100  # and at most (replay_on_join too)


def private_sender(name: str) -> str:
    return name + PRIVATE_SUFFIX


def sent_sender(name: str, to: str) -> str:
    """The sender of the copy a private message's sender gets: it went to ``to``."""
    return f"{name}{SENT_ARROW}{to}{PRIVATE_SUFFIX}"


def action_sender(name: str) -> str:
    return ACTION_PREFIX + name


SENT_ARROW = " -> "


def history_sender(name: str, t: float) -> str:
    """The sender of a message replayed from the history: ``alice [2026-11-25 14:03:07 UTC]``
    (``t``, seconds since the epoch, is when it was said)."""
    return f"{name} [{time.strftime(HISTORY_FORMAT, time.gmtime(t))}]"


_HISTORY = re.compile(r"(\S+) \[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC)\]")


def read_history(sender: str) -> tuple[str, float] | None:
    """(name, time said) of a replayed message's sender, or None if it is not one."""
    m = _HISTORY.fullmatch(sender) if sender.endswith(" UTC]") else None
    if m is None:
        return None
    try:
        return m.group(1), float(calendar.timegm(time.strptime(m.group(2), HISTORY_FORMAT)))
    except ValueError:  # 2026-13-45
        return None


def read_sender(sender: str) -> tuple[str, str, str]:
    """(kind, name, to) of a sender: kind notice, private, sent (a private message
    of one's own, gone to ``to``), action, history (a message replayed from the
    history; `read_history` has its time) or message."""
    if sender == NOTICE_SENDER:
        return "notice", sender, ""
    if sender.endswith(HISTORY_END):
        said = read_history(sender)
        if said is not None:
            return "history", said[0], ""
    if sender.endswith(PRIVATE_SUFFIX):
        name = sender[: -len(PRIVATE_SUFFIX)]
        if _is_name(name):
            return "private", name, ""
        name, arrow, to = name.partition(SENT_ARROW)
        if arrow and _is_name(name) and _is_name(to):
            return "sent", name, to
    if sender.startswith(ACTION_PREFIX):
        name = sender[len(ACTION_PREFIX) :]
        if _is_name(name):
            return "action", name, ""
    return "message", sender, ""


def _is_name(text: str) -> bool:
    return bool(text) and not any(c.isspace() for c in text)


# What a message may contain.

# Unicode category Cc is exactly these 65 code points (C0, DEL and C1); tab is allowed.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_SEPARATOR = re.compile("[\u2028\u2029]")
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")
# What a terminal would act on: the above together (a tab is fine).
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape(text: str) -> str:
    """``text`` with what a terminal would act on written as escapes (``\\x1b``,
    ``\\u202e``): for anything shown that someone else wrote."""
    return _UNSAFE.sub(_escaped, text) if _UNSAFE.search(text) else text


def _escaped(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def text_problem(text: str) -> str | None:
    """What ``text`` may not contain, as "messages may not contain ..." ends, or None.

    Both ends check it: the daemon refuses such a message, and the client says so
    without sending it.

    Control characters are refused: a newline would let a sender forge a line that
    looks like another user's in a simple client, and escape sequences would drive
    the readers' terminals; line and paragraph separators break lines too, and the
    bidirectional controls reorder what the readers see.  A tab is fine.
    """
    if _CONTROL.search(text):
        return "control characters such as newlines or escapes"
    if _SEPARATOR.search(text):
        return "line or paragraph separators (U+2028, U+2029)"
    bidi = _BIDI.search(text)
    if bidi:
        ch = bidi.group()
        return (
            f"bidirectional controls such as U+{ord(ch):04X} {unicodedata.name(ch)}, "
            "which reorder what the others see"
        )
    return None


# The in-band commands.


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
class History:
    """Send the sender the last ``count`` messages said in the room."""

    count: int


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class Reply:
    """Answer the sender with notices, one per line (help, usage, unknown command)."""

    lines: tuple[str, ...]


Command = Say | Act | Private | Who | History | Quit | Reply


def parse(text: str) -> Command:
    """What a message starting with '/' asks for."""
    body = text[1:]
    if body.startswith("/"):
        return Say(body)
    parts = body.split(maxsplit=1) if body and not body[0].isspace() else []
    if not parts:
        return Reply((notices.NOT_A_COMMAND(),))
    command = parts[0].lower()
    rest = parts[1] if len(parts) > 1 else ""
    if command == "who":
        return Who()
    if command == "history":
        return _history(rest.strip())
    if command == "help":
        return Reply(tuple(line() for line in notices.HELP))
    if command == "quit":
        return Quit()
    if command == "me":
        action = rest.strip()
        return Act(action) if action else Reply((notices.USAGE(usage="/me ACTION"),))
    if command == "msg":
        words = rest.split(maxsplit=1)
        if len(words) < 2 or not words[1].strip():
            return Reply((notices.USAGE(usage="/msg NAME TEXT"),))
        target, message = words
        return Private(target, message)
    shown = parts[0] if len(parts[0]) <= 32 else parts[0][:32] + "..."
    return Reply((notices.UNKNOWN_COMMAND(command=shown),))


def _history(count: str) -> Command:
    """/history [N]: N from 1 on, more than HISTORY_MAX meaning HISTORY_MAX."""
    if not count:
        return History(HISTORY_DEFAULT)
    if count.isascii() and count.isdigit():
        n = int(count.lstrip("0")[:9] or "0")  # nine digits are past any maximum
        if n > 0:
            return History(min(n, HISTORY_MAX))
    return Reply((notices.USAGE(usage=f"/history [N], N from 1 to {HISTORY_MAX}"),))


def is_quit(line: str) -> bool:
    """A line the daemon takes as /quit (words after it included)."""
    text = line.strip()
    return text.startswith("/") and isinstance(parse(text), Quit)
