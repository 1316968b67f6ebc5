"""The event loop: one thread, one selector, timers, signals, and passes in which a bug
costs one connection, never the daemon.

Each pass waits in select() (for at most MAX_WAIT, the one clamp: epoll cannot
wait longer than 2**31 ms), calls the handler of every ready socket, runs the
owner's stages that follow the I/O (the server's fan-out), the due timers, and last
the owner's closing stages (the reaping of closed connections).  Every one of those
runs guarded: an exception is logged as an ``internal_error`` event with its
traceback, the connection involved (if any) is handed to ``on_error``, and the loop
goes on.  A bug that fires on every pass neither floods the log (the events are
rate-limited, the suppressed ones counted) nor spins the CPU (after a pass with an
error the next wait lasts at least a backoff that doubles up to a second).

Signals reach the loop as bytes on a socketpair (``signal.set_wakeup_fd``); their
Python handlers do nothing.

The loop times its passes, for the metrics: from waking up in select() to the next
wait, one clock reading at each end and a fixed-bucket histogram, whatever the pass
did (nothing is measured per event).
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import itertools
import selectors
import signal
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import structlog

from chatd.wire.tokenbucket import TokenBucket

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE

MAX_WAIT = 60.0  # seconds select() waits at most, whatever the timers say
BACKOFF_MAX = 1.0  # seconds: the longest wait forced after passes with errors
ERROR_LOG_RATE = 1.0  # internal_error events a second, after a burst of ERROR_LOG_BURST
ERROR_LOG_BURST = 20


# Seconds: the upper bounds of the buckets of a pass's duration.
PASS_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class Histogram:
    """Observations counted into fixed buckets (each bound inclusive, as Prometheus'
    ``le``), the last one unbounded; one bisect and two additions an observation."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, the last for the rest
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(bound, observations up to it) for each bound and then ``inf``."""
        out = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class Handler(Protocol):
    def ready(self, mask: int) -> None: ...


Timer = tuple[float, int, Callable[[Any], None], Any]


class Loop:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.log: Any = structlog.get_logger("chatd")
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._soon: list[tuple[Callable[[Any], None], Any]] = []
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._old_handlers: dict[int, Any] = {}
        self._on_signal: Callable[[int], None] = lambda signum: None
        self._errors = 0  # internal errors in the current pass
        self._backoff = 0.0
        self._error_log = TokenBucket(ERROR_LOG_RATE, ERROR_LOG_BURST, time.monotonic())
        self._suppressed = 0  # internal_error events not logged since the last one
        self.on_error: Callable[[Any], None] = lambda data: None  # the owner drops ``data``
        self.passes = 0
        self.internal_errors = 0  # in all
        self.pass_seconds = Histogram(PASS_BUCKETS)  # each pass's time from select() to select()
        self._woke = 0.0  # monotonic time the current pass's select() returned

    # Sockets.

    def register(self, sock: socket.socket, mask: int, handler: Handler) -> None:
        self.sel.register(sock, mask, handler)

    def modify(self, sock: socket.socket, mask: int, handler: Handler) -> None:
        self.sel.modify(sock, mask, handler)

    def unregister(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    # Time.

    now = staticmethod(time.monotonic)

    def call_at(self, when: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Call ``fn(arg)`` at monotonic time ``when``, or in the first pass after it."""
        heapq.heappush(self._timers, (when, next(self._seq), fn, arg))

    def call_soon(self, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Call ``fn(arg)`` in the next pass, after its I/O (never in this one)."""
        self._soon.append((fn, arg))

    def _timeout(self, due: float | None) -> float | None:
        """How long select() may wait: until ``due`` or the next timer, clamped."""
        if self._soon:
            due = 0.0
        elif self._timers and (due is None or self._timers[0][0] < due):
            due = self._timers[0][0]
        wait = MAX_WAIT if due is None else min(max(0.0, due - time.monotonic()), MAX_WAIT)
        return max(wait, self._backoff)

    # Signals.

    def install_signals(self, signums: Iterable[int], on_signal: Callable[[int], None]) -> None:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._wakeup = (r, w)
        self._on_signal = on_signal
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        for sig in signums:
            # The C-level handler writes the signal number to the wake-up fd;
            # the Python-level one has nothing to do.
            self._old_handlers[sig] = signal.signal(sig, _ignore_signal)
        self.register(r, READ, _Wakeup(self))

    def _read_signals(self) -> None:
        assert self._wakeup is not None
        try:
            data = self._wakeup[0].recv(512)
        except BlockingIOError:
            return
        for signum in data:
            self._on_signal(signum)

    # The passes.

    def run_pass(
        self,
        due: float | None,
        after_io: Iterable[Callable[[], None]] = (),
        after_timers: Iterable[Callable[[], None]] = (),
    ) -> None:
        """One pass: wait (until ``due`` at most), I/O, ``after_io``, timers, ``after_timers``."""
        self.passes += 1
        self._errors = 0
        soon, self._soon = self._soon, []  # what earlier passes asked for, not this one
        if soon:
            due = 0.0
        if self._woke:  # the last pass (and what its owner did after it) is over
            self.pass_seconds.observe(time.monotonic() - self._woke)
        try:
            events = self.sel.select(self._timeout(due))
        except Exception:
            self.internal_error("select", None)
            events = []
            time.sleep(self._backoff or 0.001)  # nothing can wait for us: do not spin
        self._woke = time.monotonic()
        for key, mask in events:
            data = key.data
            try:
                data.ready(mask)
            except Exception:
                self.internal_error("io", data)
        for stage in after_io:
            self.guard(stage.__name__, stage)
        self._run_timers(soon)
        for stage in after_timers:
            self.guard(stage.__name__, stage)
        if self._errors:
            self._backoff = min(BACKOFF_MAX, max(0.001, self._backoff * 2))
        else:
            self._backoff = 0.0

    def guard(self, stage: str, fn: Callable[[], None]) -> None:
        """Call ``fn()``; a bug in it is an internal error of ``stage``."""
        try:
            fn()
        except Exception:
            self.internal_error(stage, None)

    def _run_timers(self, soon: list[tuple[Callable[[Any], None], Any]]) -> None:
        for fn, arg in soon:
            try:
                fn(arg)
            except Exception:
                self.internal_error("timer", arg)
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, fn, arg = heapq.heappop(timers)
            try:
                fn(arg)
            except Exception:
                self.internal_error("timer", arg)

    def internal_error(self, stage: str, data: Any, error: BaseException | None = None) -> None:
        """Log the exception being handled (or ``error``), rate-limited; drop ``data``."""
        self._errors += 1
        self.internal_errors += 1
        if self._error_log.take(time.monotonic()):
            fields: dict[str, Any] = {"stage": stage, "connection": repr(data)}
            if self._suppressed:
                fields["suppressed"] = self._suppressed
                self._suppressed = 0
            if error is None:
                self.log.exception("internal_error", **fields)
            else:
                self.log.error("internal_error", exc_info=error, **fields)
        else:
            self._suppressed += 1
        if data is not None:
            try:
                self.on_error(data)
            except Exception:
                self._suppressed += 1  # the handler of a bug failed too: nothing more to do

    def close(self) -> None:
        if self._wakeup:
            signal.set_wakeup_fd(-1)
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            self._old_handlers.clear()
            for s in self._wakeup:
                self.unregister(s)
                s.close()
            self._wakeup = None
        self.sel.close()


class _Wakeup:
    __slots__ = ("loop",)

    def __init__(self, loop: Loop) -> None:
        self.loop = loop

    def ready(self, mask: int) -> None:
        self.loop._read_signals()


def _ignore_signal(signum: int, frame: Any) -> None:
    pass
