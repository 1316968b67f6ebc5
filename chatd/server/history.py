"""The history on disk, written by one thread that the event loop never waits for.

The loop's whole cost per message is the row it hands over: chatd.core.history calls
`Store.put`, which is ``deque.append``.  Once a pass, the server calls `nudge()`,
which wakes the writer if it sleeps and rows wait, so a busy room costs one wake-up
a batch, not one a message.  The writer thread is chatd's only other thread.  It
lets a batch gather until its first row is GATHER seconds old, and commits at most
BATCH_ROWS rows in one transaction (chatd.server.historydb: the file and its format).
Requests (a reload's retention, a query, a forget) come through a second deque; the
rows queued before one are written before it is carried out.

What the thread has to say to the loop (a failing disk, a recovery, the answer to a
read, how many a forget deleted) it puts in ``results`` and signals on a socketpair
that the loop watches (`ready()`), so every log event and every reply is made on the
loop's thread.

Durability: a committed batch survives the death of chatd (kill -9), so a crash loses
at most the batch that was gathering.  With ``synchronous=NORMAL`` a power cut may
also lose the last batches committed before it, never the file's consistency.  A
write that fails (a full disk) is logged once; its rows are held in memory (HELD_MAX
at most, the oldest beyond that lost and counted) and written when a retry succeeds,
RETRY_MIN seconds later, doubling up to RETRY_MAX; meanwhile the status says the
history is incomplete.

Retention (core's rules: at most keep_messages, none older than keep_days) and
`forget` take one batch (BATCH_ROWS messages at most) per transaction, with the new
rows written between two of them, so no transaction holds the file for long.  The
admin's deep reads (`chatctl history` beyond what memory holds) run in the same
thread on a connection of their own, between batches, and answer through the loop.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import structlog

from chatd.core.admin import Later
from chatd.core.history import History, HistorySettings, Row, age_cutoff, excess
from chatd.server.historydb import HistoryError, HistoryFile, words
from chatd.server.loop import READ, Loop
from chatd.wire.control import FAILED, RequestError, iso

__all__ = ["BATCH_ROWS", "HistoryError", "Store"]

BATCH_ROWS = 500  # rows per transaction at most
GATHER = 0.05  # seconds a batch gathers after its first row
AGE_CHECK = 60.0  # seconds between looks for messages past keep_days
RETRY_MIN = 1.0  # seconds before a failed write is tried again, doubling...
RETRY_MAX = 30.0  # ...up to this
HELD_MAX = 100_000  # rows held in memory while writes fail; the oldest beyond are lost
LAG_SAMPLES = 1000  # batches whose write lag the status keeps, for its p99
CLOSE_WAIT = 5.0  # seconds the close waits for the writer to finish
_EARLIEST = -1e300  # a time before every message


@dataclass(frozen=True)
class _Configure:
    keep_messages: int
    keep_days: float


@dataclass(frozen=True)
class _Query:
    limit: int
    since: float | None
    folded: str | None
    later: Later


@dataclass(frozen=True)
class _Forget:
    folded: str
    up_to: int  # the id of the last message said when it was asked
    later: Later


_STOP = object()

Job = Generator[None, None, None]  # one transaction per step


class Store:
    """The history file, its writer thread and the loop's end of their socketpair."""

    def __init__(self, path: str, loop: Loop) -> None:
        self.path = path
        self.loop = loop
        self.log: Any = structlog.get_logger("chatd")
        self.file = HistoryFile(path)
        self.rows: deque[Row] = deque()  # from the loop, in the room's order
        self.put: Callable[[Row], None] = self.rows.append  # the sink of core's History
        self.requests: deque[Any] = deque()  # from the loop: _Configure, _Query...
        self._wake = threading.Event()
        self._sleeping = False  # the writer waits for _wake
        self.results: deque[tuple[Callable[[Any], None], Any]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.thread: threading.Thread | None = None
        self.on_stop: Callable[[], None] = lambda: None  # the writer ended on a bug
        # The writer's state, read by the loop for the status (plain values).
        self.failing = False  # the last write failed
        self.lost = 0  # messages that could not be kept (held past HELD_MAX)
        self.dropped = 0  # the same, dropped from the queue by the loop
        self.dead = False  # the thread ended on a bug
        self.head: float | None = None  # when the oldest row not yet written was said
        self.lags: deque[float] = deque(maxlen=LAG_SAMPLES)  # per batch, its oldest row's
        # The writer's alone.
        self.held: list[Row] = []
        self.jobs: deque[tuple[Job, Later]] = deque()  # forgets under way
        self.keep_messages = 0
        self.keep_days = 0.0
        self.next_age_check = 0.0
        self.expiring = False  # the last look expired a whole batch: more may be due
        self.retain_at = 0.0  # no retention before then (after one failed)
        self.retry_at = 0.0
        self.backoff = RETRY_MIN

    @property
    def count(self) -> int:
        """Messages in the file."""
        return self.file.count

    # Start and stop (the loop's thread).

    def open(self, keep_messages: int, keep_days: float) -> tuple[list[Row], int, int]:
        """Open the file (HistoryError if it cannot be used); return its newest
        messages for the ring (oldest first), its smallest id and its largest."""
        self.file.open()
        self.keep_messages, self.keep_days = keep_messages, keep_days
        return self.file.newest(), self.file.first or 1, self.file.last

    def start(self) -> None:
        """Start the writer; its results come to the loop from now on."""
        self.loop.register(self._wake_r, READ, self)
        self.thread = threading.Thread(target=self._run, name="chatd-history", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Write what is queued and stop the writer (waiting CLOSE_WAIT seconds at most)."""
        thread = self.thread
        if thread is not None and thread.is_alive():
            self._request(_STOP)
            thread.join(CLOSE_WAIT)
            if thread.is_alive():
                self.log.error("history_not_closed", file=self.path, waited=CLOSE_WAIT)
        if thread is None or not thread.is_alive():
            self.file.close()
        self._report()  # what the writer said last
        self.loop.unregister(self._wake_r)
        self._wake_r.close()
        self._wake_w.close()

    # Requests (the loop's thread).

    def nudge(self) -> None:
        """Wake the writer if rows wait for it (once a pass of the loop); drop the
        oldest rows past HELD_MAX if it cannot keep up (a disk that hangs)."""
        rows = self.rows
        if self._sleeping and rows:
            self._sleeping = False
            self._wake.set()
        over = len(rows) - HELD_MAX
        if over > 0:
            with contextlib.suppress(IndexError):  # the writer took them meanwhile
                for _ in range(over):
                    rows.popleft()
                    self.dropped += 1

    def _request(self, request: Any) -> None:
        self.requests.append(request)
        self._wake.set()

    def configure(self, keep_messages: int, keep_days: float) -> None:
        self._request(_Configure(keep_messages, keep_days))

    def query(self, limit: int, since: float | None, user: str | None) -> Later:
        """The last ``limit`` messages at ``since`` or later, by ``user``: a Later of rows."""
        later = Later()
        self._ask(_Query(limit, since, None if user is None else user.casefold(), later))
        return later

    def forget(self, name: str, up_to: int) -> Later:
        """Delete ``name``'s messages up to id ``up_to``: a Later of how many went."""
        later = Later()
        self._ask(_Forget(name.casefold(), up_to, later))
        return later

    def _ask(self, request: _Query | _Forget) -> None:
        if self.dead or self.thread is None:
            error = f"the history {self.path} is not being written"
            request.later.fail(RequestError(FAILED, error))
        else:
            self._request(request)

    def status(self) -> dict[str, Any]:
        """For stats: the file, how many it holds and since when, how far behind the writer
        is, and whether everything said is on its way to the file."""
        for _ in range(3):
            try:
                lags = sorted(self.lags)
                break
            except RuntimeError:  # appended to meanwhile
                continue
        else:
            lags = []
        heads = [self.head]
        with contextlib.suppress(IndexError):  # emptied meanwhile
            heads += [self.held[0][1] if self.held else None, self.rows[0][1]]
        head = min((h for h in heads if h is not None), default=None)
        return {
            "file": self.path,
            "messages": self.file.count,
            "oldest": self.file.oldest,
            "complete": not (self.failing or self.dead),
            "lost": self.lost + self.dropped,
            "pending": len(self.rows) + len(self.held),
            "write_lag": round(max(0.0, time.time() - head), 3) if head is not None else 0.0,
            "write_lag_p99": round(lags[int(len(lags) * 0.99)], 3) if lags else None,
            "write_lag_max": round(lags[-1], 3) if lags else None,
        }

    # What the writer says, on the loop.

    def ready(self, mask: int) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        self._report()

    def _report(self) -> None:
        results = self.results
        while results:
            fn, arg = results.popleft()
            try:
                fn(arg)
            except Exception:
                self.loop.internal_error("history", None)

    def _post(self, fn: Callable[[Any], None], arg: Any = None) -> None:
        """(The writer's thread.)  Have the loop call ``fn(arg)``."""
        self.results.append((fn, arg))
        with contextlib.suppress(OSError):  # full: the loop has a wake-up pending anyway
            self._wake_w.send(b"\0")

    def _write_failed(self, error: str) -> None:
        self.log.error("history_write_failed", file=self.path, error=error)

    def _write_recovered(self, lost: int) -> None:
        self.log.info("history_write_recovered", file=self.path, lost=lost)

    def _retention_failed(self, error: str) -> None:
        self.log.warning("history_retention_failed", file=self.path, error=error)

    def _crashed(self, error: BaseException) -> None:
        self.on_stop()
        self.loop.internal_error("history", None, error)
        self.log.error("history_stopped", file=self.path, queued=len(self.rows))

    # The writer's thread.

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:
            self.dead = True
            self._post(self._crashed, e)
            self._drop_jobs("the history's writer stopped on a bug (see the log)")
        finally:
            self.file.close()

    def _serve(self) -> None:
        rows, requests = self.rows, self.requests
        while True:
            if not rows and not requests:
                wait = self._wait()
                if wait != 0:
                    self._sleep(wait)
            if requests:
                # What was said before the request was made is written first.
                while rows:
                    self._insert(_take(rows))
                request = requests.popleft()
                if request is _STOP:
                    self._stop()
                    return
                self._command(request)
            elif rows:
                # The batch gathers until its first row is GATHER old (at once if it
                # waited that long already, behind the last batch).
                gather = GATHER - (time.time() - rows[0][1])
                if gather > 0 and len(rows) < BATCH_ROWS:
                    self._wake.clear()
                    if not requests:
                        self._wake.wait(min(gather, GATHER))  # a request cuts it short
                    if requests:
                        continue
                self._insert(_take(rows))
            self._work()

    def _sleep(self, wait: float | None) -> None:
        """Wait for a row (the loop's nudge), a request, or ``wait`` seconds."""
        self._wake.clear()
        self._sleeping = True
        if not self.rows and not self.requests:  # else a nudge may have come just before
            self._wake.wait(wait)
        self._sleeping = False

    def _wait(self) -> float | None:
        """How long the writer may wait for a row: 0 with work to do, None for ever."""
        now = time.monotonic()
        if self.jobs or self._retention_due(now):
            return 0
        due = [self.retain_at] if self.file.count > self.keep_messages else []
        if self.held:
            due.append(self.retry_at)
        if self.keep_days > 0:
            due.append(self.next_age_check)
        return max(0.0, min(due) - now) if due else None

    def _work(self) -> None:
        """One transaction of what waits besides new rows: held rows, a forget, retention."""
        if self.held and time.monotonic() >= self.retry_at:
            self._insert([])
        elif self.jobs:
            job, _ = self.jobs[0]
            if next(job, _STOP) is _STOP:
                self.jobs.popleft()
        else:
            self._retain()

    # Writing.

    def _insert(self, rows: list[Row]) -> None:
        if self.held:
            self.held.extend(rows)
            self._trim_held()
            if time.monotonic() < self.retry_at:
                return
            rows, self.held = self.held, []
        for start in range(0, len(rows), BATCH_ROWS):
            batch = rows[start : start + BATCH_ROWS]
            self.head = batch[0][1]
            try:
                self.file.append(batch)
            except sqlite3.Error as e:
                self.held = rows[start:]
                self._trim_held()
                self.head = self.held[0][1] if self.held else None
                self._failed(e)
                return
            self.lags.append(time.time() - batch[0][1])
        self.head = None
        if self.failing:
            self.failing = False
            self.backoff = RETRY_MIN
            self._post(self._write_recovered, self.lost)

    def _trim_held(self) -> None:
        over = len(self.held) - HELD_MAX
        if over > 0:
            del self.held[:over]
            self.lost += over

    def _failed(self, error: sqlite3.Error) -> None:
        self.retry_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, RETRY_MAX)
        if not self.failing:
            self.failing = True
            self._post(self._write_failed, words(error))

    # Retention.

    def _retention_due(self, now: float) -> bool:
        if now < self.retain_at:
            return False
        if self.file.count > self.keep_messages or self.expiring:
            return True
        return self.keep_days > 0 and now >= self.next_age_check

    def _retain(self) -> None:
        """One retention transaction, if one is due: the oldest over keep_messages first,
        then what is past keep_days."""
        now = time.monotonic()
        if not self._retention_due(now):
            return
        try:
            over = excess(self.file.count, self.keep_messages)
            if over:
                self.file.drop_oldest(over)
                return
            cutoff = age_cutoff(time.time(), self.keep_days)
            if cutoff is None:
                self.expiring = False
                return
            _, self.expiring = self.file.expire(cutoff)
            if not self.expiring:
                self.next_age_check = now + AGE_CHECK
        except sqlite3.Error as e:
            self.expiring = False
            self.retain_at = self.next_age_check = now + AGE_CHECK  # not again before then
            self._post(self._retention_failed, words(e))

    # Commands.

    def _command(self, item: Any) -> None:
        if isinstance(item, _Configure):
            self.keep_messages, self.keep_days = item.keep_messages, item.keep_days
            self.next_age_check = 0.0
        elif isinstance(item, _Query):
            self._query(item)
        elif isinstance(item, _Forget):
            self.jobs.append((self._forget(item), item.later))

    def _query(self, q: _Query) -> None:
        lower = max(
            _EARLIEST if q.since is None else q.since,
            age_cutoff(time.time(), self.keep_days) or _EARLIEST,
        )
        try:
            found = self.file.query(q.limit, lower, q.folded)
        except sqlite3.Error as e:
            error = RequestError(FAILED, f"cannot read the history {self.path}: {words(e)}")
            self._post(q.later.fail, error)
            return
        self._post(q.later.resolve, found)

    def _forget(self, f: _Forget) -> Job:
        """Delete a name's messages, held ones and then the file's, a batch a step."""
        kept = [r for r in self.held if r[0] > f.up_to or r[2].casefold() != f.folded]
        gone = len(self.held) - len(kept)
        self.held = kept
        after: int | None = 0
        try:
            while after is not None:
                deleted, after = self.file.forget(f.folded, f.up_to, after)
                gone += deleted
                if after is not None:
                    yield
        except sqlite3.Error as e:
            message = f"cannot delete from the history {self.path}: {words(e)}"
            self._post(f.later.fail, RequestError(FAILED, message))
            return
        self._post(f.later.resolve, gone)

    def _stop(self) -> None:
        """The last rows, once more however the last write went; forgets under way stop."""
        if self.held:
            self.retry_at = 0.0
            self._insert([])
        self._drop_jobs("chatd is shutting down")

    def _drop_jobs(self, why: str) -> None:
        for job, later in self.jobs:
            job.close()
            self._post(later.fail, RequestError(FAILED, f"not done: {why}"))
        self.jobs.clear()


def _take(rows: deque[Row]) -> list[Row]:
    """The next batch from the queue (BATCH_ROWS at most)."""
    batch: list[Row] = []
    take, pop = batch.append, rows.popleft
    with contextlib.suppress(IndexError):  # the loop dropped some meanwhile (nudge)
        for _ in range(min(len(rows), BATCH_ROWS)):
            take(pop())
    return batch


def open_store(cfg: HistorySettings, loop: Loop, history: History) -> Store | None:
    """Open the history file (None without one; HistoryError if it cannot be used),
    fill ``history`` with its newest messages, and start its writer."""
    if not cfg.file:
        return None
    store = Store(cfg.file, loop)
    try:
        rows, floor, last = store.open(cfg.keep_messages, cfg.keep_days)
    except HistoryError:
        store.close()
        raise
    history.load(rows, floor, last)
    history.sink = store.put
    store.on_stop = lambda: setattr(history, "sink", None)
    store.start()
    return store


def history_status(store: Store | None, history: History) -> dict[str, Any]:
    """The history's part of `stats`."""
    if store is not None:
        status = store.status()
    else:
        count, oldest = history.size(time.time())
        status = {"file": "", "messages": count, "oldest": oldest, "complete": True}
        status.update(lost=0, pending=0, write_lag=0.0, write_lag_p99=None)
        status["write_lag_max"] = None
    status["oldest"] = iso(status["oldest"])
    status["kept"] = history.keeping
    return status
