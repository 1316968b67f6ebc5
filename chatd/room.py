"""Membership and fan-out, without I/O.

The room knows its members by name and queues what each must receive.
Everything posted during one pass of the event loop is collected, and
`flush()` hands each member all of it in one piece, in the order it was
posted: members who sent none of it share one bytes object; only a sender
gets its own copy, without its messages.
"""

from __future__ import annotations

import bisect
import itertools
import re
import unicodedata
from collections.abc import Iterator
from typing import Protocol

from chatd import protocol

NAME_FRAMES_KEPT = 20000  # encoded sender names cached, at most (cleared when full)

NOTICE_SENDER = "chatd"
"""Sender name of server notices.  No user can take it."""

# Unicode categories a name may not contain: whitespace and separators, and
# every "other" (control, format such as bidi overrides, unassigned...).
_BANNED_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co", "Cn"})


class Member(Protocol):
    """What the room needs of a connection."""

    name: str

    def deliver(self, data: bytes) -> None: ...


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
    if name.casefold() == NOTICE_SENDER:
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


# Unicode category Cc is exactly these 65 code points (C0, DEL and C1); tab is allowed.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


class Room:
    __slots__ = (
        "_batch",
        "_broadcasts",
        "_direct_from",
        "_first",
        "_fresh",
        "_members",
        "_name_frames",
        "_posts",
        "deliveries",
        "header_length",
    )

    def __init__(self, header_length: int = protocol.DEFAULT_HEADER_LENGTH) -> None:
        self.header_length = header_length
        self._members: dict[str, Member] = {}  # casefolded name -> member, in join order
        # Frames posted this pass: (data, excluded sender or None, sole recipient or None).
        self._batch: list[tuple[bytes, Member | None, Member | None]] = []
        # Members who joined this pass -> the batch index they joined at: what
        # was posted before that is not for them.  flush_direct() also records
        # here how far it served a member.
        self._fresh: dict[int, int] = {}
        self._first: tuple[int, str, set[int], int, int | None] | None = None  # first_names()
        self._broadcasts = 0  # items of the batch for everyone (but a sender)
        self._direct_from = 0  # where flush_direct() looks for private frames next
        self._posts = 0  # members' messages in the batch (post()), as opposed to notices
        self._name_frames: dict[str, bytes] = {}  # sender name -> its encoded frame
        self.deliveries = 0  # frame pairs handed to members, for the stats

    @property
    def pending(self) -> bool:
        """True when something posted waits for flush()."""
        return bool(self._batch)

    @property
    def notices_only(self) -> bool:
        """True when no member's message waits: only notices and private frames."""
        return not self._posts

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[Member]:
        return iter(self._members.values())

    def __contains__(self, member: object) -> bool:
        name = getattr(member, "name", None)
        return isinstance(name, str) and self._members.get(name.casefold()) is member

    def get(self, name: str) -> Member | None:
        return self._members.get(name.casefold())

    def names(self) -> list[str]:
        return [m.name for m in self._members.values()]

    def first_names(self, max_bytes: int) -> tuple[str, set[int], int, int | None]:
        """The first members' names in join order, comma-separated, while each
        name plus 2 bytes keeps the running total within ``max_bytes``.

        Returns (text, ids of the members named, how many, id of the first
        member that did not fit or None).  Kept between calls: a join only
        appends to the room, so once the list is full it stays right until
        someone leaves.
        """
        cached = self._first
        if cached is not None and cached[0] == max_bytes:
            return cached[1:]
        shown: list[str] = []
        ids: set[int] = set()
        size = 0
        stop: int | None = None
        for m in self._members.values():
            size += len(m.name.encode()) + 2
            if size > max_bytes:
                stop = id(m)
                break
            shown.append(m.name)
            ids.add(id(m))
        self._first = (max_bytes, ", ".join(shown), ids, len(shown), stop)
        return self._first[1:]

    def name_taken(self, name: str) -> bool:
        return name.casefold() in self._members

    def join(self, member: Member) -> None:
        key = member.name.casefold()
        if key in self._members:
            raise ValueError(f"the name {member.name!r} is taken")
        self._members[key] = member
        if self._first is not None and self._first[4] is None:
            self._first = None  # it named everyone: the newcomer may fit too
        if self._batch:
            # What was posted before the join is not for the newcomer; flushing
            # here instead would cost a send per member per join.
            self._fresh[id(member)] = len(self._batch)

    def leave(self, member: Member) -> bool:
        """Remove ``member``; True if it was here.  Queued frames for it are dropped."""
        key = member.name.casefold()
        if self._members.get(key) is not member:
            return False
        del self._members[key]
        self._fresh.pop(id(member), None)
        self._first = None
        return True

    def frame(self, sender: str, text: str) -> bytes:
        """The frame pair (sender, text); a notice too long for the header is cut to fit."""
        hl = self.header_length
        name = self._name_frames.get(sender)
        if name is None:
            if len(self._name_frames) >= NAME_FRAMES_KEPT:
                self._name_frames.clear()
            fitted = protocol.cut(sender, protocol.max_length(hl))
            name = self._name_frames[sender] = protocol.encode(fitted, hl)
        try:
            return name + protocol.encode(text, hl)
        except ValueError:  # only a notice can be this long (messages are checked)
            return name + protocol.encode(protocol.cut(text, protocol.max_length(hl)), hl)

    def post(self, sender: Member, text: str, *, as_name: str | None = None) -> None:
        """Queue ``text`` from ``sender`` for every other member."""
        self._batch.append((self.frame(as_name or sender.name, text), sender, None))
        self._posts += 1
        self._broadcasts += 1

    def notice(self, text: str, *, exclude: Member | None = None) -> None:
        """Queue a server notice for every member (but ``exclude``)."""
        self._batch.append((self.frame(NOTICE_SENDER, text), exclude, None))
        self._broadcasts += 1

    def send_to(self, member: Member, sender: str, text: str) -> None:
        """Queue a frame pair for one member, in order with the broadcasts."""
        self._batch.append((self.frame(sender, text), None, member))

    def flush(self) -> None:
        """Deliver everything posted since the last flush, once per member."""
        batch = self._batch
        if not batch:
            return
        self._batch = []
        self._posts = self._broadcasts = self._direct_from = 0
        fresh = self._fresh
        if fresh:
            self._fresh = {}
        members = list(self._members.values())
        if len(batch) == 1 and not fresh:
            data, exclude, only = batch[0]
            if only is not None:
                if only in self:
                    self.deliveries += 1
                    only.deliver(data)
                return
            for m in members:
                if m is not exclude:
                    m.deliver(data)
            self.deliveries += len(members) - (exclude in self)
            return
        # Members named in the batch (senders, private recipients) and those who
        # joined during it need their own selection; everyone else gets the
        # shared join of the broadcasts.
        named: dict[int, int] = {}  # id(member) -> the last index naming it
        broadcasts: list[bytes] = []
        at: list[int] = []  # the batch index of each broadcast
        for i, (data, ex, only) in enumerate(batch):
            if only is None:
                broadcasts.append(data)
                at.append(i)
                if ex is not None:
                    named[id(ex)] = i
            else:
                named[id(only)] = i
        special = dict.fromkeys(named, 0)
        special.update(fresh)
        shared = b"".join(broadcasts)
        tails: dict[int, bytes] = {}  # first broadcast -> the join from it on
        if fresh:
            # Newcomers first: their welcome should not wait for the whole room.
            # They joined last, so they are the last len(fresh) members.
            members = members[-len(fresh) :] + members[: -len(fresh)]
        for m in members:
            start = special.get(id(m))
            if start is None:
                if shared:
                    self.deliveries += len(broadcasts)
                    m.deliver(shared)
            elif named.get(id(m), -1) < start:
                # Nothing from ``start`` on names it (a newcomer served by
                # flush_direct): it gets every broadcast from there, shared.
                k = bisect.bisect_left(at, start)
                if k < len(at):
                    tail = tails.get(k)
                    if tail is None:
                        tail = tails[k] = b"".join(broadcasts[k:])
                    self.deliveries += len(at) - k
                    m.deliver(tail)
            else:
                mine = list(_select(batch, m, start))
                if mine:
                    self.deliveries += len(mine)
                    m.deliver(b"".join(mine))

    def flush_direct(self) -> None:
        """Deliver now only what needs no broadcast: each member's private frames
        (a welcome, a command's answer) up to the first broadcast due to it.

        The broadcasts (join and leave notices in a join storm) stay queued for
        the next flush(), so that many of them go to each member in one send;
        every member still gets its frames in the order they were posted.
        """
        batch = self._batch
        if not self._broadcasts:
            self.flush()  # nothing but private frames: all of it can go
            return
        fresh = self._fresh
        plan: list[tuple[Member, int, list[bytes]]] = []
        seen: set[int] = set()
        # Private frames before _direct_from were dealt with by an earlier call:
        # either sent, or stuck behind a broadcast until the next flush().
        scan = itertools.islice(batch, self._direct_from, None)
        self._direct_from = len(batch)
        for _, _, only in scan:
            if only is None or id(only) in seen:
                continue
            seen.add(id(only))
            if only not in self:
                continue
            start = fresh.get(id(only), 0)
            mine: list[bytes] = []
            end = len(batch)
            for i in range(start, len(batch)):
                d, exclude, to = batch[i]
                if to is only:
                    mine.append(d)
                elif to is None and exclude is not only:
                    end = i  # a broadcast for it: the rest waits behind it
                    break
            if mine:
                plan.append((only, end, mine))
        for m, end, mine in plan:
            if m in self:
                fresh[id(m)] = end  # before deliver(), which may make it leave
                self.deliveries += len(mine)
                m.deliver(b"".join(mine))


def _select(
    batch: list[tuple[bytes, Member | None, Member | None]], m: Member, start: int
) -> Iterator[bytes]:
    for data, exclude, only in itertools.islice(batch, start, None):
        if (only is None and exclude is not m) or only is m:
            yield data
