"""The event loop (chatd.server.loop), and a Server run in process on 127.0.0.1:0.

A bug must cost one connection, never the daemon: every stage of a pass is guarded,
a bug that repeats every pass neither spins nor floods the log, and the wait of
select() is clamped in the one place it is computed.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from helpers import NOTICE, Client, joined_names
from structlog.testing import capture_logs

from chatd.server import config
from chatd.server.connection import Connection
from chatd.server.loop import BACKOFF_MAX, ERROR_LOG_BURST, MAX_WAIT, Histogram, Loop
from chatd.server.server import Server


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    structlog.reset_defaults()
    with capture_logs() as captured:
        yield captured


class Boom:
    """A handler whose ready() raises."""

    def __init__(self) -> None:
        self.calls = 0

    def ready(self, mask: int) -> None:
        self.calls += 1
        raise RuntimeError("boom")


def test_a_handler_that_raises_is_logged_and_handed_over(logs: list[dict[str, Any]]) -> None:
    loop = Loop()
    dropped: list[Any] = []
    loop.on_error = dropped.append
    a, b = socket.socketpair()
    boom = Boom()
    loop.register(a, 1, boom)
    b.send(b"x")
    loop.run_pass(None)
    assert boom.calls == 1 and dropped == [boom]
    (event,) = [e for e in logs if e["event"] == "internal_error"]
    assert event["stage"] == "io" and event["exc_info"] is True
    loop.unregister(a)
    loop.close()
    a.close(), b.close()


def test_the_wait_is_clamped_whatever_the_timers_say() -> None:
    loop = Loop()
    waits: list[float | None] = []
    loop.sel.select = lambda timeout=None: waits.append(timeout) or []  # type: ignore[method-assign]
    loop.call_at(time.monotonic() + 30 * 86400, lambda _: None)  # a ban of a month
    loop.run_pass(None)
    loop.run_pass(time.monotonic() + 100 * 365 * 86400)
    empty = Loop()
    empty.sel.select = loop.sel.select  # type: ignore[method-assign]
    empty.run_pass(None)  # nothing at all to wait for
    assert waits == [MAX_WAIT, MAX_WAIT, MAX_WAIT]
    loop.run_pass(0.0)
    assert waits[-1] == 0.0


def test_call_soon_waits_for_the_next_pass() -> None:
    loop = Loop()
    loop.sel.select = lambda timeout=None: []  # type: ignore[method-assign]
    ran: list[int] = []

    def again(n: int) -> None:
        ran.append(n)
        loop.call_soon(again, n + 1)

    loop.call_soon(again, 0)
    assert loop._timeout(None) == 0.0  # something is due: no waiting
    for _ in range(3):
        loop.run_pass(None)
    assert ran == [0, 1, 2]  # one a pass, however often it asks again


def test_a_stage_that_fails_every_pass_neither_spins_nor_floods_the_log(
    logs: list[dict[str, Any]],
) -> None:
    loop = Loop()

    def broken_stage() -> None:
        raise ValueError("a bug in every pass")

    cpu0, t0 = time.process_time(), time.monotonic()
    while time.monotonic() - t0 < 3.0 and loop.passes < 10_000:
        loop.run_pass(0.0, (broken_stage,))  # always "work to do"
    cpu = time.process_time() - cpu0
    errors = [e for e in logs if e["event"] == "internal_error"]
    # Backoff 1 ms doubling to 1 s: about a dozen passes in 3 s, not thousands.
    assert loop.passes < 20, loop.passes
    assert cpu < 1.0, cpu
    assert 1 <= len(errors) <= ERROR_LOG_BURST
    assert loop._backoff == BACKOFF_MAX
    loop.run_pass(0.0)  # a clean pass ends the backoff
    assert loop._backoff == 0.0


def test_the_internal_error_log_is_rate_limited_and_counts_what_it_left_out(
    logs: list[dict[str, Any]],
) -> None:
    loop = Loop()
    for _ in range(ERROR_LOG_BURST + 30):
        try:
            raise KeyError("x")
        except KeyError:
            loop.internal_error("test", None)
    assert len([e for e in logs if e["event"] == "internal_error"]) == ERROR_LOG_BURST
    loop._error_log.stamp -= 5.0  # five seconds later
    try:
        raise KeyError("y")
    except KeyError:
        loop.internal_error("test", None)
    assert logs[-1]["suppressed"] == 30


def test_select_failing_does_not_spin(logs: list[dict[str, Any]]) -> None:
    loop = Loop()

    def bad_select(timeout: float | None = None) -> list[Any]:
        raise OSError(9, "Bad file descriptor")

    loop.sel.select = bad_select  # type: ignore[method-assign]
    t0 = time.monotonic()
    for _ in range(8):
        loop.run_pass(0.0)
    assert time.monotonic() - t0 >= 0.1  # 1+2+4+...+64 ms at least: it waited
    assert all(e["stage"] == "select" for e in logs if e["event"] == "internal_error")


class FakeTime:
    """The loop's clock, moved by the test (and by sleep)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def test_each_pass_is_timed_from_waking_to_the_next_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatd.server import loop as loopmod

    clock = FakeTime()
    monkeypatch.setattr(loopmod, "time", clock)
    loop = Loop()

    def waiting(timeout: float | None = None) -> list[Any]:
        clock.t += 5.0  # waiting in select() is not the pass's time
        return []

    loop.sel.select = waiting  # type: ignore[method-assign]
    work = iter([0.0002, 0.003, 0.003, 0.001, 7.0])

    def stage() -> None:
        clock.t += next(work)

    for _ in range(5):
        loop.run_pass(None, (stage,))
    clock.t += 0.5  # what the owner does between passes counts too
    loop.run_pass(None)
    h = loop.pass_seconds
    assert h.count == 5 and h.sum == pytest.approx(0.0002 + 0.003 + 0.003 + 0.001 + 7.5)
    got = dict(h.cumulative())
    assert (got[0.0001], got[0.00025], got[0.001], got[0.0025], got[0.005]) == (0, 1, 2, 2, 4)
    assert (got[2.5], got[float("inf")]) == (4, 5)


def test_a_value_on_a_bound_is_in_that_bucket() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.1, 0.10001, 1.0, 1e9, 0.0):
        h.observe(value)
    assert h.counts == [2, 2, 1]
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (float("inf"), 5)]


def test_internal_errors_are_counted_even_when_not_logged() -> None:
    loop = Loop()
    for _ in range(ERROR_LOG_BURST + 5):
        loop.internal_error("test", None, RuntimeError("x"))
    assert loop.internal_errors == ERROR_LOG_BURST + 5


# A Server in process.


class Running:
    """A Server on 127.0.0.1:0 in this thread; ``talk(fn)`` runs clients in another
    thread while this one runs the loop's passes."""

    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        cfg = config.build(
            {
                "listen": ["127.0.0.1:0"],
                "log": {"format": "console"},
                "control": {"socket": str(tmp_path / "admin.sock")},
                "state_file": str(tmp_path / "state.json"),
                "history": {"file": str(tmp_path / "history.sqlite3")},
                **settings,
            },
            "<test>",
        )
        self.server = Server(cfg)
        self.server.open(signals=False)
        self.port = self.server.listeners[0].sock.getsockname()[1]
        self._tick()

    def _tick(self, _: Any = None) -> None:  # never wait long: the test thread may be done
        self.server.call_at(time.monotonic() + 0.02, self._tick)

    def talk(self, fn: Callable[[], None], timeout: float = 10.0) -> None:
        failure: list[BaseException] = []

        def run() -> None:
            try:
                fn()
            except BaseException as e:
                failure.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < deadline:
            self.server.step()
        thread.join(1.0)
        settled = time.monotonic() + 0.1  # what the clients' last words set off
        while time.monotonic() < settled:
            self.server.step()
        if failure:
            raise failure[0]
        assert not thread.is_alive(), "the clients did not finish"

    def close(self) -> None:
        self.server.stop("test")
        deadline = time.monotonic() + 5
        while not self.server.done and time.monotonic() < deadline:
            self.server.step()
        self.server.close_all()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path)
    yield r
    r.close()


def test_two_clients_chat_through_a_server_in_process(
    running: Running, logs: list[dict[str, Any]]
) -> None:
    def chat() -> None:
        alice = Client(running.port)
        alice.join("alice")
        bob = Client(running.port)
        bob.join("bob")
        alice.expect(NOTICE, "bob joined")
        bob.send("hi alice")
        alice.expect("bob", "hi alice")
        bob.close()
        alice.expect(NOTICE, "bob left (quit)")
        alice.close()

    running.talk(chat)
    got = [(e["event"], e.get("user"), e.get("reason")) for e in logs if "user" in e]
    assert got == [
        ("join", "alice", None),
        ("join", "bob", None),
        ("message", "bob", None),
        ("leave", "bob", "quit"),
        ("leave", "alice", "quit"),
    ]


def test_a_bug_in_one_members_delivery_costs_that_member_alone(
    running: Running, logs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Connection.deliver

    def deliver(self: Connection, data: bytes) -> None:
        if self.name == "victim" and b"trigger" in data:
            raise RuntimeError("a bug in deliver()")
        real(self, data)

    monkeypatch.setattr(Connection, "deliver", deliver)

    def chat() -> None:
        victim, a, b = Client(running.port), Client(running.port), Client(running.port)
        victim.join("victim")
        a.join("a")
        b.join("b")
        a.expect(NOTICE, "b joined")
        b.send("trigger")
        a.expect("b", "trigger")
        a.expect(NOTICE, "victim left (internal error)")
        (last,) = victim.expect_closed()[-1:]
        assert last[0] == NOTICE and joined_names(last[1])[-1] == "b"  # with a's, or alone
        b.send("after")
        a.expect("b", "after")

    running.talk(chat)
    (error,) = [e for e in logs if e["event"] == "internal_error"]
    assert error["stage"] == "fan-out" and "victim" in error["connection"]


def test_a_failing_fan_out_stage_is_logged_and_the_chat_goes_on(
    running: Running, logs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = running.server.chat
    real = chat.flush
    fail = [True]

    def flush() -> None:
        if fail and chat.room.pending:
            fail.clear()
            raise RuntimeError("a bug in the fan-out")
        real()

    monkeypatch.setattr(chat, "flush", flush)

    def talk() -> None:
        a, b = Client(running.port), Client(running.port)
        a.join("a")
        b.join("b")
        a.expect(NOTICE, "b joined")
        b.send("hello")
        a.expect("b", "hello")

    running.talk(talk)
    assert [e["stage"] for e in logs if e["event"] == "internal_error"] == ["_fan_out"]


def test_an_admin_request_flood_is_answered_sixteen_a_pass(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatd.server import control

    per_pass: dict[int, int] = {}
    real = control.handle

    def counting(*args: Any) -> Any:
        passes = running.server.loop.passes
        per_pass[passes] = per_pass.get(passes, 0) + 1
        return real(*args)

    monkeypatch.setattr(control, "handle", counting)
    path = running.server.control.path

    def flood() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"{}\n" * 4000)
        got = 0
        while got < 4000:
            got += s.recv(1 << 20).count(b"\n")
        s.close()

    running.talk(flood, timeout=20)
    assert sum(per_pass.values()) == 4000
    assert max(per_pass.values()) == 16  # the chat gets its turn between
    assert len(per_pass) >= 250
