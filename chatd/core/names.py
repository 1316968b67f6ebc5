"""What a user name and a message may contain, and lists of names that fit a notice.

A name is what others see as the sender of a message: it may not contain anything
that would let it pass for someone or something else (whitespace, which the daemon's
own senders have; control and format characters), and ``chatd`` is the daemon's.  A
message may not contain control characters, which would let its sender forge lines
or drive the readers' terminals.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from chatd.wire import chat
from chatd.wire.framing import max_length

# Unicode categories a name may not contain: whitespace and separators, and
# every "other" (control, format such as bidi overrides, unassigned...).
_BANNED_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co", "Cn"})

# Unicode category Cc is exactly these 65 code points (C0, DEL and C1); tab is allowed.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")

MORE_BYTES = 24  # room kept after a list of names for " and N more"


def name_problem(name: str, max_bytes: int) -> str | None:
    """Why ``name`` can't be a user name, or None if it can (uniqueness aside)."""
    if not name:
        return "the name is empty"
    size = len(name.encode())
    if size > max_bytes:
        return f"the name is {size} bytes long, the limit is {max_bytes}"
    for ch in name:
        if ch.isspace() or unicodedata.category(ch) in _BANNED_CATEGORIES:
            return f"the name contains {unicodedata.name(ch, 'a control character').lower()}"
    if name.casefold() == chat.NOTICE_SENDER:
        return f"the name {name!r} is reserved"
    return None


def text_problem(text: str) -> str | None:
    """Why ``text`` can't be relayed as a message, or None if it can.

    Control characters are refused: a newline would let a sender forge a line
    that looks like another user's in a simple client, and escape sequences
    would drive the readers' terminals.  A tab is fine.
    """
    if _CONTROL.search(text):
        return "messages may not contain control characters such as newlines or escapes"
    return None


def list_bytes(header_length: int, before: int = 0) -> int:
    """How long a list of names may be in a notice: WHO_MAX_BYTES, or less when the
    frame header allows less (``before``: bytes of the notice before the list)."""
    return min(chat.WHO_MAX_BYTES, max_length(header_length) - before - MORE_BYTES)


def names_line(names: Iterable[str], max_bytes: int) -> tuple[str, int]:
    """("a, b, c", 3): the first names, comma-separated, while each name plus 2 bytes
    keeps the running total within ``max_bytes``; and how many that is.

    Only the names shown are visited, so a list of 10,000 costs what one of 100 does.
    """
    shown: list[str] = []
    size = 0
    for name in names:
        size += len(name.encode()) + 2
        if size > max_bytes:
            break
        shown.append(name)
    return ", ".join(shown), len(shown)


def and_more(text: str, shown: int, total: int) -> str:
    """A list of ``shown`` names of ``total``, with " and N more" when it was cut."""
    return f"{text} and {total - shown} more" if shown < total else text
