"""The room: who is in it, and fan-out of what is posted, without I/O.

The room knows its members by name and queues what each must receive.
Everything posted during one pass of the event loop is collected, and
`flush()` hands each member all of it in one piece, in the order it was
posted: members who sent none of it share one bytes object; only a sender
gets its own copy, without its messages.

Fan-out never changes who is in the room: a member whose delivery fails is
left in place for the rest of the pass (the server drops it afterwards), and a
bug in one member's ``deliver()`` is recorded in ``failures`` and costs that
member alone.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator
from typing import Generic, Protocol, TypeVar

from chatd.core.names import and_more, name_keys, names_line
from chatd.wire import framing
from chatd.wire.chat import NOTICE_SENDER, WHO_MAX_BYTES
from chatd.wire.notices import Notice, names_and_others

NAME_FRAMES_KEPT = 20000  # encoded sender names cached, at most (cleared when full)
NAMES_SHOWN = 2  # names in a notice of several joins or leaves: "a, b and 148 others joined"

# A notice that may be one of several in a row, which reach a member as one: the
# template of the several, its reason ("" for none) and the name (see Room.notice).
Run = tuple[Notice, str, str]


class Member(Protocol):
    """What the room needs of a connection."""

    name: str

    def deliver(self, data: bytes) -> None: ...


M = TypeVar("M", bound=Member)


class Room(Generic[M]):
    __slots__ = (
        "_batch",
        "_broadcasts",
        "_direct_from",
        "_first",
        "_fresh",
        "_keys",
        "_members",
        "_name_frames",
        "_posts",
        "deliveries",
        "failures",
        "header_length",
    )

    def __init__(self, header_length: int = framing.DEFAULT_HEADER_LENGTH) -> None:
        self.header_length = header_length
        self._members: dict[str, M] = {}  # casefolded name -> member, in join order
        self._keys: dict[str, M] = {}  # name_keys() -> member: no two look alike
        # Frames posted this pass: (data, excluded sender or None, sole recipient or
        # None, the Run of a join or leave notice or None).
        self._batch: list[tuple[bytes, M | None, M | None, Run | None]] = []
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
        # Members whose deliver() raised during a flush, with the exception: a bug,
        # which the server logs and answers by dropping the member.
        self.failures: list[tuple[M, Exception]] = []

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

    def __iter__(self) -> Iterator[M]:
        return iter(self._members.values())

    def __contains__(self, member: object) -> bool:
        name = getattr(member, "name", None)
        return isinstance(name, str) and self._members.get(name.casefold()) is member

    def get(self, name: str) -> M | None:
        return self._members.get(name.casefold())

    def names(self) -> list[str]:
        return [m.name for m in self._members.values()]

    def first_names(self, max_bytes: int) -> tuple[str, set[int], int, int | None]:
        """The first members' names in join order, as `names_line()` lists them.

        Returns (text, ids of the members named, how many, id of the first
        member that did not fit or None).  Kept between calls: a join only
        appends to the room, so once the list is full it stays right until
        someone leaves.
        """
        cached = self._first
        if cached is not None and cached[0] == max_bytes:
            return cached[1:]
        text, count = names_line((m.name for m in self._members.values()), max_bytes)
        shown = itertools.islice(self._members.values(), count + 1)
        ids = {id(m) for m in itertools.islice(shown, count)}
        stop = next(shown, None)
        self._first = (max_bytes, text, ids, count, None if stop is None else id(stop))
        return self._first[1:]

    def online_line(self, me: M, max_bytes: int = WHO_MAX_BYTES) -> str:
        """Who else is online, for a welcome: names up to about ``max_bytes``, then a count.

        In the usual case, a newcomer in a full room, the cached list of the first
        names is the answer: a join costs the same in a room of 10,000 as in one of
        100, and no welcome is larger than /who.
        """
        others = len(self) - (me in self)
        if not others:
            return "nobody else is online"
        text, ids, count, stop = self.first_names(max_bytes)
        if id(me) in ids or id(me) == stop:
            text, count = names_line((m.name for m in self if m is not me), max_bytes)
        return "online: " + and_more(text, count, others)

    def name_taken(self, name: str) -> bool:
        return name.casefold() in self._members

    def lookalike(self, name: str) -> M | None:
        """The member whose name looks like ``name`` (confusable skeletons), if any."""
        keys = self._keys
        for key in name_keys(name):
            member = keys.get(key)
            if member is not None:
                return member
        return None

    def join(self, member: M) -> None:
        name = member.name
        key = name.casefold()
        looks = name_keys(name)
        if key in self._members or not self._keys.keys().isdisjoint(looks):
            raise ValueError(f"the name {name!r} is taken")
        self._members[key] = member
        for look in looks:
            self._keys[look] = member
        if self._first is not None and self._first[4] is None:
            self._first = None  # it named everyone: the newcomer may fit too
        if self._batch:
            # What was posted before the join is not for the newcomer; flushing
            # here instead would cost a send per member per join.
            self._fresh[id(member)] = len(self._batch)

    def leave(self, member: M) -> bool:
        """Remove ``member``; True if it was here.  Queued frames for it are dropped."""
        key = member.name.casefold()
        if self._members.get(key) is not member:
            return False
        del self._members[key]
        for look in name_keys(member.name):
            del self._keys[look]
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
            fitted = framing.cut(sender, framing.max_length(hl))
            name = self._name_frames[sender] = framing.encode(fitted, hl)
        try:
            return name + framing.encode(text, hl)
        except ValueError:  # only a notice can be this long (messages are checked)
            return name + framing.encode(framing.cut(text, framing.max_length(hl)), hl)

    def post(self, sender: M, text: str, *, as_name: str | None = None) -> None:
        """Queue ``text`` from ``sender`` for every other member."""
        self._batch.append((self.frame(as_name or sender.name, text), sender, None, None))
        # equivalent: only whether _posts is 0 is read (notices_only)
        self._posts += 1  # pragma: no mutate
        self._broadcasts += 1

    def broadcast(self, sender: str, text: str, *, exclude: M | None = None) -> None:
        """Queue a member's message from ``sender`` (a name, or its action form) for every
        member but ``exclude``: a message from another node, or come back from it."""
        self._batch.append((self.frame(sender, text), exclude, None, None))
        self._posts += 1  # pragma: no mutate
        self._broadcasts += 1

    def notice(self, text: str, *, exclude: M | None = None, run: Run | None = None) -> None:
        """Queue a server notice for every member (but ``exclude``).

        With ``run`` (many, reason, name), notices that follow one another with the
        same ``many`` and reason reach a member as one, ``many(names=..., reason=...)``:
        "alice, bob and 148 others joined" (a member's own join is left out of its
        list); one alone stays ``text``.
        """
        self._batch.append((self.frame(NOTICE_SENDER, text), exclude, None, run))
        self._broadcasts += 1

    def send_to(self, member: M, sender: str, text: str) -> None:
        """Queue a frame pair for one member, in order with the broadcasts."""
        self._batch.append((self.frame(sender, text), None, member, None))

    def send_frames(self, member: M, data: bytes) -> None:
        """Queue frame pairs already encoded (a replay) for one member, as send_to()."""
        if data:
            self._batch.append((data, None, member, None))

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
        if len(batch) == 1 and not fresh:
            data, exclude, only, _ = batch[0]
            if only is not None:
                if only in self:
                    self.deliveries += 1
                    self._deliver(only, data)
                return
            self.deliveries += len(self._members) - (exclude in self)
            for m in self._members.values():
                if m is not exclude:
                    try:
                        m.deliver(data)
                    except Exception as e:
                        self.failures.append((m, e))
            return
        # Members named in the batch (senders, private recipients) and those who
        # joined during it need their own selection; everyone else gets the
        # shared join of the broadcasts.
        named: dict[int, int] = {}  # id(member) -> the last index naming it
        broadcasts: list[bytes] = []
        runs: list[Run | None] = []  # of each broadcast
        at: list[int] = []  # the batch index of each broadcast
        for i, (data, ex, only, run) in enumerate(batch):
            if only is None:
                broadcasts.append(data)
                runs.append(run)
                at.append(i)
                if ex is not None:
                    named[id(ex)] = i
            else:
                named[id(only)] = i
        special = dict.fromkeys(named, 0)
        special.update(fresh)
        shared = b"".join(self._coalesced(zip(broadcasts, runs, strict=True)))
        tails: dict[int, bytes] = {}  # first broadcast -> the join from it on
        members: Iterable[M] = self._members.values()
        if fresh:
            # Newcomers first: their welcome should not wait for the whole room.
            # They joined last, so they are the last len(fresh) members.
            everyone = list(members)
            members = everyone[-len(fresh) :] + everyone[: -len(fresh)]
        for m in members:
            try:
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
                            pairs = zip(broadcasts[k:], runs[k:], strict=True)
                            tail = tails[k] = b"".join(self._coalesced(pairs))
                        self.deliveries += len(at) - k
                        m.deliver(tail)
                else:
                    mine = list(_select(batch, m, start))
                    if mine:
                        self.deliveries += len(mine)
                        m.deliver(b"".join(self._coalesced(mine)))
            except Exception as e:
                self.failures.append((m, e))

    def _deliver(self, m: M, data: bytes) -> None:
        try:
            m.deliver(data)
        except Exception as e:
            self.failures.append((m, e))

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
        plan: list[tuple[M, int, list[bytes]]] = []
        seen: set[int] = set()
        # Private frames before _direct_from were dealt with by an earlier call:
        # either sent, or stuck behind a broadcast until the next flush().
        scan = itertools.islice(batch, self._direct_from, None)
        # equivalent as None: islice() reads it as 0, and a scan from 0 finds the frames
        # already served behind fresh[] again; it only keeps the next scan short
        self._direct_from = len(batch)  # pragma: no mutate
        for _, _, only, _ in scan:
            if only is None or id(only) in seen:
                continue
            seen.add(id(only))
            if only not in self:
                continue
            start = fresh.get(id(only), 0)
            mine: list[bytes] = []
            end = len(batch)
            for i in range(start, len(batch)):
                d, exclude, to, _ = batch[i]
                if to is only:
                    mine.append(d)
                elif to is None and exclude is not only:
                    end = i  # a broadcast for it: the rest waits behind it
                    break
            if mine:
                plan.append((only, end, mine))
        for m, end, mine in plan:
            fresh[id(m)] = end
            self.deliveries += len(mine)
            self._deliver(m, b"".join(mine))

    def _coalesced(self, frames: Iterable[tuple[bytes, Run | None]]) -> list[bytes]:
        """``frames`` with each row of notices of the same run made one (see notice())."""
        out: list[bytes] = []
        row: list[Run] = []  # the run being gathered
        first = b""  # its first notice, as it would go alone
        for data, run in frames:
            if row and run is not None and run[:2] == row[0][:2]:
                row.append(run)
                continue
            if row:
                out.append(self._run_frame(row, first))
                row = []
            if run is None:
                out.append(data)
            else:
                row, first = [run], data
        if row:
            out.append(self._run_frame(row, first))
        return out

    def _run_frame(self, row: list[Run], first: bytes) -> bytes:
        if len(row) == 1:
            return first  # byte for byte the notice of one join or leave
        many, reason, _ = row[0]
        names = names_and_others([name for _, _, name in row], NAMES_SHOWN)
        return self.frame(NOTICE_SENDER, many(names=names, reason=reason))


def _select(
    batch: list[tuple[bytes, M | None, M | None, Run | None]], m: M, start: int
) -> Iterator[tuple[bytes, Run | None]]:
    for data, exclude, only, run in itertools.islice(batch, start, None):
        if only is None and exclude is not m:
            yield data, run
        elif only is m:
            yield data, None
