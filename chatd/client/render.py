"""How what arrives is shown: a line for a pipe, a JSON object, styled text for a terminal.

`classify()` reads a frame pair by the chat's conventions (chatd.wire.chat): a notice, a
private message, an action, a message replayed from the history (shown with the time
it was said, dimmed on a terminal) or an ordinary message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from chatd.wire.chat import escape, read_history, read_sender


@dataclass(frozen=True)
class Event:
    """One line for the screen.

    ``kind`` is message, private, action, history (a message said before, ``when``
    it was said) or notice (from the daemon), or command (one the user typed, shown
    back).  ``own`` lines are the user's.
    """

    kind: str
    name: str
    text: str
    when: datetime
    own: bool = False
    to: str = ""


def classify(sender: str, text: str, when: datetime | None = None) -> Event:
    """Read a frame pair: a private message or an action has a space in its sender."""
    kind, name, to = read_sender(sender)
    when = when or datetime.now()
    if kind == "sent":
        return Event("private", name, text, when, own=True, to=to)
    if kind == "history":
        said = read_history(sender)
        if said is not None:
            return Event(kind, name, text, datetime.fromtimestamp(said[1]))
    return Event(kind, name, text, when)


def clock(event: Event) -> str:
    """The time column: the time, with the date before it for a message said on an
    earlier day."""
    if event.kind == "history" and event.when.date() != datetime.now().date():
        return event.when.strftime("%Y-%m-%d %H:%M:%S")
    return event.when.strftime("%H:%M:%S")


def own_event(me: str, line: str) -> Event | None:
    """How a line the user sends is shown back to them (None for a private message:
    the daemon's copy shows it once it went)."""
    now = datetime.now()
    if line.startswith("//"):
        return Event("message", me, line[1:], now, own=True)
    if line.startswith("/"):
        words = line.split(maxsplit=2)
        command = words[0].lower()
        if command == "/me" and len(words) > 1:
            return Event("action", me, line[3:].strip(), now, own=True)
        if command == "/msg" and len(words) == 3 and words[2].strip():
            return None
        return Event("command", me, line, now, own=True)
    return Event("message", me, line, now, own=True)


def shown(event: Event) -> Event:
    """``event`` with what a terminal would act on escaped, whoever sent it: until TLS,
    anyone on the LAN can pose as the server."""
    name, text, to = safe(event.name), safe(event.text), safe(event.to)
    if (name, text, to) == (event.name, event.text, event.to):
        return event
    return Event(event.kind, name, text, event.when, event.own, to)


def plain(event: Event) -> str:
    """The line printed in pipe mode: "HH:MM:SS name: text"."""
    event = shown(event)
    t = clock(event)
    if event.kind == "action":
        return f"{t} * {event.name} {event.text}"
    if event.kind == "private":
        if event.own:
            return f"{t} {event.name} -> {event.to} (private): {event.text}"
        return f"{t} {event.name} (private): {event.text}"
    if event.kind == "command":
        return f"{t} {event.text}"
    return f"{t} {event.name}: {event.text}"


def as_json(event: Event) -> str:
    doc: dict[str, Any] = {
        "time": event.when.astimezone().isoformat(timespec="seconds"),
        "type": event.kind,
        "from": event.name,
        "text": event.text,
    }
    if event.to:
        doc["to"] = event.to
    # json escapes C0 controls; DEL, C1 and the line and bidi controls too.
    return _UNSAFE.sub(_json_escape, json.dumps(doc, ensure_ascii=False))


# What chat never prints as it is, whoever sent it (anyone on the LAN can pose as the
# server): controls would drive the terminal, separators and bidi controls forge or
# reorder lines.  A tab is fine.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
safe = escape


def _json_escape(m: re.Match[str]) -> str:
    return f"\\u{ord(m.group()):04x}"


def styled(event: Event) -> list[tuple[str, str]]:
    """Fragments for prompt_toolkit: the text carries the distinction, color adds to it."""
    event = shown(event)
    t = ("class:time", clock(event) + " ")
    me = " class:own" if event.own else ""
    if event.kind == "history":  # said before: dimmed, at the time it was said
        return [
            ("class:history class:time", t[1]),
            ("class:history class:name", f"{event.name}:"),
            ("class:history", f" {event.text}"),
        ]
    if event.kind == "notice":
        return [t, ("class:notice", f"-- {event.text}")]
    if event.kind == "action":
        return [t, ("class:action" + me, f"* {event.name} {event.text}")]
    if event.kind == "private":
        who = f"{event.name} -> {event.to}" if event.own else event.name
        return [
            t,
            ("class:private class:name" + me, f"{who} (private):"),
            ("class:private" + me, f" {event.text}"),
        ]
    if event.kind == "command":
        return [t, ("class:command", event.text)]
    return [t, ("class:name" + me, f"{event.name}:"), ("class:text" + me, f" {event.text}")]
