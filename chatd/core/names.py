"""What a user name may contain, when two names look alike, and lists of names that fit
a notice.

A name is what others see as the sender of a message, so it may not pass for someone
or something else:

- it follows PRECIS' IdentifierClass (RFC 8264, the UsernameCasePreserved profile of
  RFC 8265, as ergo's IRC server does; precis-i18n implements it): no spaces, no
  control, invisible (default-ignorable) or format characters, no symbols or
  punctuation beyond ASCII, no compatibility forms, and it must already be in the
  form the profile maps it to (a fullwidth A, U+FF21, is refused, with A suggested);
- it is not written in a mix of scripts that UTS #39 does not call safe (Latin with
  Cyrillic or Greek, say); Latin with Han and the Japanese or Korean scripts is safe;
- it does not look like the daemon's own sender ``chatd`` or like the marker forms
  of private messages, actions and replayed messages (``x (private)``, ``* x``,
  ``x [2026-11-25 14:03:07 UTC]``): it may not end in ``(private)`` or ``]``, nor
  start with ``*``, so that even a simple client, which prints the sender as it
  comes, shows no live message that looks like one of those;
- it is unique in the room by its confusable skeleton (UTS #39), not only without
  regard to case: ``\u0430lice``, with a Cyrillic a, is refused while ``alice`` is
  online.

The skeleton comes from the Unicode confusables data that confusable-homoglyphs
ships (confusables.txt, as JSON): each character is replaced by a representative of
the characters it may be confused with.

What a message may contain is chatd.wire.chat's (`text_problem`), since the client
checks it too.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from importlib.resources import files

import precis_i18n
from confusable_homoglyphs import categories  # type: ignore[import-untyped]

from chatd.wire import chat
from chatd.wire.framing import max_length

MORE_BYTES = 24  # room kept after a list of names for " and N more"

_PRINTABLE_ASCII = re.compile("[\x21-\x7e]+")

_PROFILE = precis_i18n.get_profile("UsernameCasePreserved")

# Script sets UTS #39 calls "highly restrictive": one script, or Latin with these.
_SAFE_MIXES = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),
    frozenset({"LATIN", "HAN", "HANGUL"}),
)
_NEUTRAL_SCRIPTS = frozenset({"COMMON", "INHERITED"})

# Why PRECIS refused a character, as a name_problem() says it.
_REFUSED = {
    "precis_ignorable_properties": "an invisible character",
    "zero_width_joiner": "an invisible character",
    "zero_width_nonjoiner": "an invisible character",
    "controls": "a control character",
    "symbols": "a symbol (beyond ASCII)",
    "punctuation": "punctuation (beyond ASCII)",
    "has_compat": "a compatibility form of another character",
    "unassigned": "an unassigned code point",
    "old_hangul_jamo": "an archaic Hangul letter",
}


def _describe(ch: str) -> str:
    return f"U+{ord(ch):04X} {unicodedata.name(ch, 'UNNAMED')}"


def name_problem(name: str, max_bytes: int, *, since_history: bool = True) -> str | None:
    """Why ``name`` can't be a user name, or None if it can (uniqueness and the mix
    of scripts aside: a name that looks like one online is told so first).

    ``since_history=False`` lets pass a name that only ends in ']', refused since
    replayed messages came (their sender ends so): a name ban on one, saved
    before, still loads and can be lifted."""
    if not name:
        return "the name is empty"
    size = len(name.encode())
    if size > max_bytes:
        return f"the name is {size} bytes long, the limit is {max_bytes}"
    if not (name.isascii() and _PRINTABLE_ASCII.fullmatch(name)):
        # Printable ASCII is all valid and unchanged in the profile: only the rest
        # needs it.
        try:
            plain = _PROFILE.enforce(name)
        except UnicodeEncodeError as e:
            return _refusal(name, e)
        if plain != name:
            return (
                "the name is not in its plain form (Unicode NFC, no fullwidth or other "
                f"variant forms): write {plain!r}"
            )
    keys = name_keys(name)
    if name.casefold() == chat.NOTICE_SENDER:
        return f"the name {name!r} is reserved"
    if keys & _RESERVED:
        return f"the name {name!r} looks like {chat.NOTICE_SENDER!r}, which is reserved"
    if any(k.endswith(mark) for k in keys for mark in _PRIVATE_MARKS):
        return "the name may not end like the sender of a private message, '(private)'"
    if any(k.startswith(mark) for k in keys for mark in _ACTION_MARKS):
        return "the name may not start like the sender of an action, '*'"
    if since_history and any(k.endswith(mark) for k in keys for mark in _HISTORY_MARKS):
        return "the name may not end like the sender of a replayed message, ']'"
    return None


def script_problem(name: str) -> str | None:
    """Why ``name``, a valid name, mixes scripts unsafely (UTS #39), or None."""
    if name.isascii():
        return None  # Latin and common characters alone
    scripts = {_script(c) for c in name} - _NEUTRAL_SCRIPTS
    if len(scripts) > 1 and not any(scripts <= safe for safe in _SAFE_MIXES):
        mixed = " and ".join(s.title() for s in sorted(scripts))
        return f"the name mixes {mixed} letters, as look-alike names do"
    return None


@lru_cache(maxsize=4096)
def _script(ch: str) -> str:
    return str(categories.alias(ch))


def _refusal(name: str, error: UnicodeEncodeError) -> str:
    ch = name[error.start]
    why = error.reason.rpartition("/")[2]
    if why == "spaces" or unicodedata.category(ch) == "Zs":
        article = "an" if unicodedata.name(ch, "x")[0] in "AEIOU" else "a"
        return f"the name contains {article} {unicodedata.name(ch, 'space').lower()}"
    if why == "controls":
        return f"the name contains a control character (U+{ord(ch):04X})"
    if why == "bidi_rule":
        return "the name mixes right-to-left and left-to-right text in a way that reads ambiguously"
    what = _REFUSED.get(why, "a character names may not contain")
    return f"the name contains {_describe(ch)}, {what}"


# Confusable skeletons (UTS #39).


@lru_cache(maxsize=1)
def _prototypes() -> dict[str, str]:
    """Each confusable character -> the representative of its class, from the data."""
    data = json.loads((files("confusable_homoglyphs") / "confusables.json").read_text("utf-8"))
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for key, homoglyphs in data.items():
        # The data wraps right-to-left characters in U+200E marks, for display.
        a = key.replace("\u200e", "")
        for entry in homoglyphs:
            root_a, root_b = find(a), find(entry["c"].replace("\u200e", ""))
            if root_a != root_b:
                parent[root_a] = root_b
    classes: dict[str, list[str]] = {}
    for x in list(parent):
        classes.setdefault(find(x), []).append(x)
    single: dict[str, str] = {}
    multi: dict[str, str] = {}
    for members in classes.values():
        # The prototype of a class is its sequence when it has one ("rn" for "m"),
        # else an ASCII member, else the lowest code point.
        seqs = sorted(s for s in members if len(s) > 1)
        ascii_ = sorted(s for s in members if len(s) == 1 and s.isascii())
        rep = seqs[0] if seqs else (ascii_ or sorted(members))[0]
        for s in members:
            if len(s) == 1 and s != rep:
                (multi if len(rep) > 1 else single)[s] = rep
        if len(rep) == 1:
            single.setdefault(rep, rep)
    # A sequence's own characters have representatives too.
    for s, rep in multi.items():
        single[s] = "".join(single.get(c, c) for c in unicodedata.normalize("NFD", rep))
    return {c: r for c, r in single.items() if c != r}


@lru_cache(maxsize=1)
def _table() -> dict[int, str]:
    return {ord(c): rep for c, rep in _prototypes().items()}


def skeleton(text: str) -> str:
    """The confusable skeleton of ``text`` (UTS #39): equal for look-alike strings."""
    if text.isascii():  # NFD changes nothing, and ASCII maps to ASCII
        return text.translate(_table())
    mapped = unicodedata.normalize("NFD", text).translate(_table())
    return unicodedata.normalize("NFD", mapped)


def name_keys(name: str) -> frozenset[str]:
    """Two names look alike when these share a key: the skeletons of the name as it is,
    in lower and in upper case, each without regard to case (so ``ALlCE`` looks like
    ``alice``: its ``l`` passes for the ``I`` of ``ALICE``)."""
    return frozenset(
        skeleton(variant).casefold() for variant in (name, name.casefold(), name.upper())
    )


_RESERVED = name_keys(chat.NOTICE_SENDER)
_PRIVATE_MARKS = name_keys(chat.PRIVATE_SUFFIX.strip())
_ACTION_MARKS = name_keys(chat.ACTION_PREFIX.strip())
_HISTORY_MARKS = name_keys(chat.HISTORY_END)


# Lists of names.


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
    if not shown and total:
        return f"{total} not shown"  # not one name fits (a very short frame header)
    return f"{text} and {total - shown} more" if shown < total else text
