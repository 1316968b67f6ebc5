"""What was said before: the recent messages in memory, the rules of retention, and
what a newcomer (or /history) is sent of them.  No I/O: the time is passed in.

Every ordinary message a user says to the room is kept (`Chat.relay` calls `add()`);
private messages, actions and the server's notices are not.  A message is the row
``(id, time, name, text)``: its place in the room's order, the wall-clock time it was
said, its sender and its text.  `add()` appends the row to a ring of the last RING
messages and hands it to the sink (the server's writer: a queue put), and does
nothing else: the hot path formats and allocates nothing but the row.

Replay is served from the ring alone, never from the disk: the welcome is followed
by the frames ``HISTORY_BEGIN`` ("20 earlier messages"), one pair per message from a
sender that says when it was said (``alice [2026-11-25 14:03:07 UTC]``, see
chatd.wire.chat), and ``HISTORY_END`` ("now").  The frames are built once and kept
until the next message, so a join storm pays for them once.

Retention: at most ``keep_messages`` messages (0 keeps none: history is off), none
older than ``keep_days`` (0: no age limit).  The ring applies both when it is read;
the server's store applies the same rules to the disk (`age_cutoff`, `excess`).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from chatd.wire import framing, notices
from chatd.wire.chat import NOTICE_SENDER, history_sender

Row = tuple[int, float, str, str]  # (id, time, name, text)
Sink = Callable[[Row], None]

RING = 1000  # messages kept in memory: what replay and /history draw on
DAY = 86400.0


class HistorySettings(Protocol):
    @property
    def replay_on_join(self) -> int: ...
    @property
    def file(self) -> str: ...
    @property
    def keep_messages(self) -> int: ...
    @property
    def keep_days(self) -> float: ...


def age_cutoff(now: float, keep_days: float) -> float | None:
    """Messages said before this time (seconds since the epoch) are no longer kept;
    None when there is no age limit."""
    return now - keep_days * DAY if keep_days > 0 else None


def excess(count: int, keep_messages: int) -> int:
    """How many of ``count`` messages kept are over the limit (the oldest go)."""
    return max(0, count - keep_messages)


def pair(sender: str, text: str, header_length: int) -> bytes:
    """The frame pair (sender, text), the sender cut to fit a short header."""
    fitted = framing.cut(sender, framing.max_length(header_length))
    return framing.encode(fitted, header_length) + framing.encode(text, header_length)


class History:
    """The ring of recent messages, with the rules of what is kept and replayed."""

    __slots__ = (
        "_replay",
        "floor",
        "header_length",
        "keep_days",
        "keep_messages",
        "keeping",
        "persistent",
        "ring",
        "seq",
        "sink",
    )

    def __init__(self, settings: HistorySettings, header_length: int) -> None:
        self.header_length = header_length
        self.persistent = bool(settings.file)  # the disk holds more than the ring
        self.ring: deque[Row] = deque(maxlen=RING)
        self.seq = 0  # the id of the last message
        self.floor = 1  # no message on disk has a smaller id
        self.sink: Sink | None = None  # takes every new row (the server's writer)
        # The replay last built: (seq, count, valid until, frames).
        self._replay: tuple[int, int, float, bytes] | None = None
        self.keep_messages = 0
        self.keep_days = 0.0
        self.keeping = False
        self.configure(settings)

    def configure(self, settings: HistorySettings) -> None:
        """Take new retention settings (at start and on reload)."""
        self.keep_messages = settings.keep_messages
        self.keep_days = settings.keep_days
        self.keeping = self.keep_messages > 0
        size = min(self.keep_messages, RING)
        if size != self.ring.maxlen:
            self.ring = deque(self.ring, maxlen=size)
        self._replay = None

    def load(self, rows: Iterable[Row], floor: int, last_id: int) -> None:
        """At start: the newest rows from the disk, oldest first; the smallest id
        there; the id of the last message ever said (ids go on from it)."""
        self.ring.extend(rows)
        self.floor = floor
        self.seq = max(self.seq, last_id)
        self._replay = None

    def add(self, name: str, text: str, t: float) -> None:
        """``name`` said ``text`` to the room at ``t`` (wall clock): keep it."""
        self.seq = seq = self.seq + 1
        row = (seq, t, name, text)
        self.ring.append(row)
        sink = self.sink
        if sink is not None:
            sink(row)

    # Reading.

    def recent(self, count: int, now: float) -> list[Row]:
        """The last ``count`` messages still kept at ``now``, oldest first."""
        rows = list(itertools.islice(reversed(self.ring), count))
        rows.reverse()
        cutoff = age_cutoff(now, self.keep_days)
        if cutoff is not None and rows and rows[0][1] < cutoff:
            rows = [r for r in rows if r[1] >= cutoff]
        return rows

    def replay(self, count: int, now: float) -> bytes:
        """The frames that replay the last ``count`` messages (b"" when there are none):
        HISTORY_BEGIN, the messages, HISTORY_END."""
        cached = self._replay
        if cached is not None and cached[:2] == (self.seq, count) and now < cached[2]:
            return cached[3]
        rows = self.recent(count, now)
        hl = self.header_length
        if rows:
            n = len(rows)
            begin = notices.HISTORY_BEGIN(count=n, s="" if n == 1 else "s")
            data = b"".join(
                [
                    pair(NOTICE_SENDER, begin, hl),
                    *[pair(history_sender(name, t), text, hl) for _, t, name, text in rows],
                    pair(NOTICE_SENDER, notices.HISTORY_END(), hl),
                ]
            )
        else:
            data = b""
        # Until its oldest message expires (then a shorter replay is due).
        until = rows[0][1] + self.keep_days * DAY if rows and self.keep_days > 0 else math.inf
        self._replay = (self.seq, count, until, data)
        return data

    def older(self) -> bool:
        """Whether messages older than the ring's may be kept (on disk)."""
        ring = self.ring
        return self.persistent and (not ring or ring[0][0] > self.floor)

    def query(
        self, limit: int, since: float | None, user: str | None, now: float
    ) -> tuple[list[Row], bool]:
        """The last ``limit`` messages said at ``since`` or later, by ``user`` (any case)
        if given, as the ring has them, oldest first; and whether that is the whole
        answer (else the disk may hold more: `merge` the two)."""
        folded = user.casefold() if user is not None else None
        cutoff = age_cutoff(now, self.keep_days)
        lower = max(-math.inf if since is None else since, -math.inf if cutoff is None else cutoff)
        found: list[Row] = []
        if limit > 0:
            for row in reversed(self.ring):
                if row[1] >= lower and (folded is None or row[2].casefold() == folded):
                    found.append(row)
                    if len(found) == limit:
                        break
        found.reverse()
        ring = self.ring
        whole = (
            len(found) == limit
            or not self.older()
            or (since is not None and bool(ring) and since > ring[0][1])
        )
        return found, whole

    @staticmethod
    def merge(disk: Iterable[Row], ring: Iterable[Row], limit: int) -> list[Row]:
        """The last ``limit`` of two answers to one query, each message once, in order."""
        rows = {row[0]: row for row in disk}
        rows.update((row[0], row) for row in ring)
        return [rows[i] for i in sorted(rows)[-limit:]] if limit > 0 else []

    def size(self, now: float) -> tuple[int, float | None]:
        """(messages, time of the oldest) the ring keeps at ``now``."""
        cutoff = age_cutoff(now, self.keep_days)
        kept = [r for r in self.ring if cutoff is None or r[1] >= cutoff]
        return len(kept), (kept[0][1] if kept else None)

    # Forgetting.

    def forget(self, name: str) -> int:
        """Drop ``name``'s messages (any case); return how many the ring had."""
        folded = name.casefold()
        ring = self.ring
        kept = [r for r in ring if r[2].casefold() != folded]
        gone = len(ring) - len(kept)
        if gone:
            self.ring = deque(kept, maxlen=ring.maxlen)
            self._replay = None
        return gone
