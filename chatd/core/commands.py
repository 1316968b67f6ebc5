"""Carrying out the in-band commands (/who, /msg, /me, /history, //text, /quit, /help).

The grammar is wire's (`chatd.wire.chat.parse`); this is what each command does in the
room.  Nobody but the sender ever sees a command: the answers are notices to it
alone, and an unknown command is never broadcast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chatd.core.names import and_more, list_bytes, names_line
from chatd.wire import chat, notices
from chatd.wire.chat import NOTICE_SENDER

if TYPE_CHECKING:
    from chatd.core.chat import Chat, Member


def who_line(names: list[str], max_bytes: int = chat.WHO_MAX_BYTES) -> str:
    """The /who answer: every name, or as many as fit in about ``max_bytes``."""
    head = notices.WHO(count=len(names), names="")
    text, shown = names_line(names, max_bytes - len(head.encode()))
    return notices.WHO(count=len(names), names=and_more(text, shown, len(names)))


def run(hub: Chat, m: Member, text: str) -> None:
    """Carry out the command in ``text`` (a valid message starting with '/')."""
    room = hub.room
    command = chat.parse(text)
    if isinstance(command, chat.Say):
        hub.relay(m, command.text)
    elif isinstance(command, chat.Act):
        hub.relay(m, command.text, kind="action")
    elif isinstance(command, chat.Private):
        target = room.get(command.to)
        remote = hub.cluster.users.get(command.to.casefold()) if hub.cluster else None
        if target is None and remote is not None and hub.cluster is not None and hub.live:
            hub.cluster.emit_message(m, command.text, "private", remote.name)
        elif target is None:
            cut_off = hub.cluster is not None and not hub.live  # they may be elsewhere
            nobody = notices.NOBODY_CALLED_HERE if cut_off else notices.NOBODY_CALLED
            room.send_to(m, NOTICE_SENDER, nobody(name=command.to))
        elif target is m:
            room.send_to(m, NOTICE_SENDER, notices.TO_YOURSELF(name=command.to))
        else:
            hub.relay(m, command.text, kind="private", to=target)
    elif isinstance(command, chat.Who):
        everyone = hub.cluster.names(room) if hub.cluster is not None else room.names()
        line = who_line(everyone, list_bytes(room.header_length))
        room.send_to(m, NOTICE_SENDER, line)
    elif isinstance(command, chat.History):
        history = hub.history
        replay = history.replay(command.count, hub.host.wall()) if history.keeping else b""
        if replay:
            room.send_frames(m, replay)
        else:
            none = notices.HISTORY_NONE if history.keeping else notices.HISTORY_OFF
            room.send_to(m, NOTICE_SENDER, none())
    elif isinstance(command, chat.Quit):
        hub.drop(m, "quit")
    else:
        for line in command.lines:
            room.send_to(m, NOTICE_SENDER, line)
