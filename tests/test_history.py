"""The history on disk (chatd.server.history) and end to end: the writer thread and its
batches, retention and forget in small transactions, a failing disk, start-up errors,
restarts and kill -9, chatctl history / forget / stats, and what the tutorial client
and `chat` show of a replay."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from helpers import NOTICE, ROOT, Client, Daemon, run_chatd_with, wait_until
from structlog.testing import capture_logs

from chatd.core.admin import Later
from chatd.server import history as store_module
from chatd.server import historydb
from chatd.server.history import BATCH_ROWS, HistoryError, Store
from chatd.server.historydb import APPLICATION_ID, HistoryFile
from chatd.server.loop import Loop
from chatd.wire.chat import history_sender, read_history

TUTORIAL = Path(__file__).with_name("tutorial_client.py")
FAST = {"flood": {"rate": 0}}  # one talker sends many messages


# The store, in process, with a loop the test turns.


class Pumped:
    """A Store on a Loop of its own; `until()` turns the loop while waiting."""

    def __init__(self, path: Path, keep_messages: int = 100_000, keep_days: float = 30) -> None:
        self.loop = Loop()
        self.store = Store(str(path), self.loop)
        self.loaded = self.store.open(keep_messages, keep_days)
        self.store.start()
        self.next_id = self.loaded[2] + 1

    def put(self, name: str, text: str, t: float | None = None) -> None:
        self.store.put((self.next_id, time.time() if t is None else t, name, text))
        self.store.nudge()  # as the server does once a pass
        self.next_id += 1

    def until(self, what: str, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = fn()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.store.status()}")
            self.loop.run_pass(0.02)

    def settled(self, later: Later) -> Any:
        self.until("an answer", lambda: later.outcome is not None)
        assert later.outcome is not None
        ok, value = later.outcome
        assert ok, value
        return value

    def close(self) -> None:
        self.store.close()
        self.loop.close()


@pytest.fixture
def pumped(tmp_path: Path) -> Iterator[Callable[..., Pumped]]:
    made: list[Pumped] = []

    def make(**kw: Any) -> Pumped:
        p = Pumped(tmp_path / "history.sqlite3", **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        with contextlib.suppress(Exception):
            p.close()


def test_a_new_file_has_the_schema_wal_and_mode_0600(tmp_path: Path, pumped: Any) -> None:
    p = pumped()
    assert p.loaded == ([], 1, 0)
    path = tmp_path / "history.sqlite3"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(historydb.MIGRATIONS)
    assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    db.close()


def test_rows_are_committed_in_batches_and_come_back_at_start(
    tmp_path: Path, pumped: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    real = HistoryFile.append

    def counting(self: HistoryFile, batch: list[Any]) -> None:
        sizes.append(len(batch))
        real(self, batch)

    monkeypatch.setattr(HistoryFile, "append", counting)
    p = pumped()
    base = time.time() - 10_000
    for i in range(1, 1201):
        p.put("alice" if i % 2 else "bob", f"m{i}", base + i)
    p.until("1200 rows", lambda: p.store.count == 1200)
    assert max(sizes) <= BATCH_ROWS and sum(sizes) == 1200
    assert len(sizes) <= 10  # batches, not a transaction a row
    status = p.store.status()
    assert status["complete"] and status["pending"] == 0 and status["write_lag_p99"] is not None
    assert status["oldest"] == base + 1
    p.close()
    again = Pumped(tmp_path / "history.sqlite3")
    rows, floor, last = again.loaded
    assert (len(rows), floor, last) == (1000, 1, 1200)
    assert rows[0] == (201, base + 201, "alice", "m201") and rows[-1][0] == 1200
    found = again.settled(again.store.query(3, None, "BOB"))
    assert [r[3] for r in found] == ["m1196", "m1198", "m1200"]
    since = again.settled(again.store.query(10_000, base + 1195, None))
    assert [r[0] for r in since] == list(range(1195, 1201))
    again.close()


def test_retention_by_count_and_age_in_small_transactions(
    pumped: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    deleted: list[int] = []
    real = HistoryFile._rewrite

    def counting(self: HistoryFile, batch: Any, kept: list[Any]) -> int:
        n = real(self, batch, kept)
        deleted.append(n)
        return n

    monkeypatch.setattr(HistoryFile, "_rewrite", counting)  # one transaction each
    p = pumped(keep_messages=300, keep_days=1)
    now = time.time()
    for i in range(1500):
        p.put("old", f"m{i}", now - 2 * 86400 if i < 1000 else now)
    p.until("retention", lambda: sum(deleted) == 1200 and p.store.count == 300)
    assert max(deleted) <= BATCH_ROWS
    found = p.settled(p.store.query(10_000, None, None))
    assert [r[3] for r in found] == [f"m{i}" for i in range(1200, 1500)]


def test_retention_by_age_a_batch_a_transaction(
    pumped: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    deleted: list[int] = []
    real = HistoryFile._rewrite

    def counting(self: HistoryFile, batch: Any, kept: list[Any]) -> int:
        n = real(self, batch, kept)
        deleted.append(n)
        return n

    monkeypatch.setattr(HistoryFile, "_rewrite", counting)
    p = pumped(keep_days=0)  # no age limit while they are written
    now = time.time()
    for i in range(800):
        p.put("alice", f"m{i}", now - 3 * 86400 if i < 700 else now)
    p.until("the rows", lambda: p.store.count == 800 and p.store.head is None)
    p.store.configure(100_000, 1)
    p.until("expiry", lambda: sum(deleted) == 700)
    assert len(deleted) >= 2 and max(deleted) <= BATCH_ROWS  # a batch a transaction
    assert p.store.file.oldest == now
    found = p.settled(p.store.query(1000, None, None))
    assert [r[3] for r in found] == [f"m{i}" for i in range(700, 800)]


def test_forget_counts_what_went_and_spares_what_came_after(pumped: Any) -> None:
    p = pumped()
    for i in range(1200):
        p.put("Eve" if i % 3 == 0 else "bob", f"m{i}")
    p.until("rows", lambda: p.store.count == 1200)
    up_to = p.next_id - 1
    later = p.store.forget("EVE", up_to)
    p.put("eve", "after the forget")
    assert p.settled(later) == 400
    p.until("the last row", lambda: p.store.count == 801)
    found = p.settled(p.store.query(10, None, "eve"))
    assert [r[3] for r in found] == ["after the forget"]


def test_a_failing_write_is_logged_once_held_and_written_when_it_works_again(
    pumped: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "RETRY_MIN", 0.05)
    failing = [True]
    real = HistoryFile.append

    def flaky(self: HistoryFile, batch: list[Any]) -> None:
        if failing[0]:
            raise sqlite3.OperationalError("database or disk is full")
        real(self, batch)

    monkeypatch.setattr(HistoryFile, "append", flaky)
    structlog.reset_defaults()
    with capture_logs() as logs:
        p = pumped()
        for i in range(10):
            p.put("alice", f"m{i}")
            p.loop.run_pass(0.01)
        p.until("a failure", lambda: p.store.failing)
        time.sleep(0.3)  # retries, failing again
        p.loop.run_pass(0.01)
        status = p.store.status()
        assert not status["complete"] and status["pending"] == 10 and status["write_lag"] > 0
        failing[0] = False
        p.until("recovery", lambda: p.store.count == 10)
        p.until(
            "the recovery said", lambda: any(e["event"] == "history_write_recovered" for e in logs)
        )
    failed = [e for e in logs if e["event"] == "history_write_failed"]
    assert len(failed) == 1 and failed[0]["error"] == "database or disk is full"
    assert p.store.status()["complete"] and p.store.lost == 0


def test_rows_held_past_the_limit_are_counted_as_lost(
    pumped: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "HELD_MAX", 5)
    monkeypatch.setattr(store_module, "RETRY_MIN", 0.05)
    failing = [True]
    real = HistoryFile.append

    def flaky(self: HistoryFile, batch: list[Any]) -> None:
        if failing[0]:
            raise sqlite3.OperationalError("disk I/O error")
        real(self, batch)

    monkeypatch.setattr(HistoryFile, "append", flaky)
    p = pumped()
    for i in range(8):
        p.put("alice", f"m{i}")
    p.until("held", lambda: p.store.status()["lost"] == 3)
    failing[0] = False
    p.until("recovery", lambda: p.store.count == 5)
    found = p.settled(p.store.query(10, None, None))
    assert [r[3] for r in found] == [f"m{i}" for i in range(3, 8)]


def test_a_bug_in_the_writer_is_an_internal_error_and_the_rows_stop(
    pumped: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Store) -> None:
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(Store, "_serve", broken)
    stopped: list[bool] = []
    structlog.reset_defaults()
    with capture_logs() as logs:
        p = pumped()
        p.store.on_stop = lambda: stopped.append(True)
        p.until("the crash", lambda: stopped)
    assert [e["stage"] for e in logs if e["event"] == "internal_error"] == ["history"]
    assert not p.store.status()["complete"]
    later = p.store.query(1, None, None)
    assert later.outcome is not None and not later.outcome[0]


# Files that cannot be the history: errors naming the file, at start.


def open_error(path: Path) -> str:
    with pytest.raises(HistoryError) as e:
        Store(str(path), Loop()).open(10, 1)
    return str(e.value)


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    path.write_bytes(b"not a database at all" * 100)
    assert open_error(path) == f"cannot open the history {path}: file is not a database"


def test_a_database_of_something_else_or_of_a_newer_chatd(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite3"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE photos (id)")
    db.commit()
    db.close()
    assert (
        open_error(other) == f"{other} is not a chatd history: an SQLite database of another kind"
    )
    newer = tmp_path / "newer.sqlite3"
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    assert open_error(newer) == (
        f"the history {newer} is of a newer chatd (schema version 99, this one knows 1 at most)"
    )


def corrupt(path: Path) -> None:
    """A history with many rows, then garbage over pages in the middle of the file."""
    p = Pumped(path)
    for i in range(3000):
        p.put("alice", f"message {i} " + "x" * 100)
    p.until("rows", lambda: p.store.count == 3000)
    p.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(8192))


def test_a_corrupt_database(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    corrupt(path)
    error = open_error(path)
    assert error.startswith(
        (f"the history {path} is corrupt: ", f"cannot open the history {path}: ")
    ), error
    assert "\n" not in error


def test_migrations_run_from_the_first_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "history.sqlite3"
    p = Pumped(path)
    p.put("alice", "from version 1")
    p.until("the row", lambda: p.store.count == 1)
    p.close()
    step = ("ALTER TABLE batches ADD COLUMN edited BLOB",)
    monkeypatch.setattr(historydb, "MIGRATIONS", [*historydb.MIGRATIONS, step])
    again = Pumped(path)
    assert [r[3] for r in again.loaded[0]] == ["from version 1"]
    again.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert "edited" in [c[1] for c in db.execute("PRAGMA table_info(batches)")]
    db.close()


# The real daemon.


def history_file(d: Daemon) -> Path:
    return Path(d.config["history"]["file"])


def replay_of(c: Client) -> list[tuple[str, str]]:
    """What ``c`` was replayed when it joined."""
    assert c.replayed is not None, "no replay after the welcome"
    return c.replayed


def history_reply(c: Client) -> list[tuple[str, str]]:
    """The answer to /history: from "N earlier messages" to "now"."""
    sender, text = c.recv()
    assert sender == NOTICE and text.endswith(("earlier messages", "earlier message")), text
    got = []
    while (pair := c.recv()) != (NOTICE, "now"):
        got.append(pair)
    return got


def test_replay_on_join_and_history_over_the_wire(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    bob = daemon.client("bob", source="127.0.0.2")
    alice.expect(NOTICE, "bob joined")
    t0 = time.time()
    alice.send("one")
    alice.send("/msg bob private")
    alice.send("/me acts")
    alice.send("two")
    bob.expect("alice", "one")
    bob.expect("alice (private)", "private")
    bob.expect("* alice", "acts")
    bob.expect("alice", "two")
    carol = daemon.client("carol")
    got = replay_of(carol)
    assert [text for _, text in got] == ["one", "two"]
    for sender, _ in got:
        said = read_history(sender)
        assert said is not None and said[0] == "alice" and abs(said[1] - t0) < 3
    carol.send("/history 1")
    assert history_reply(carol) == [got[1]]
    alice.expect("alice -> bob (private)", "private")
    alice.expect(NOTICE, "carol joined")
    alice.expect_nothing()  # a replay is for the newcomer alone


def test_the_tutorial_client_shows_a_replay(daemon: Daemon) -> None:
    alice = daemon.client("alice")
    alice.send("hello from before")
    daemon.wait_for("message", user="alice")
    tutorial = subprocess.Popen(
        [sys.executable, str(TUTORIAL), str(daemon.port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert tutorial.stdin
        tutorial.stdin.write("bob\n")
        tutorial.stdin.flush()
        daemon.wait_for("join", user="bob")
        time.sleep(0.2)
        out, _ = tutorial.communicate("\n", timeout=10)  # Enter shows what arrived
    finally:
        if tutorial.poll() is None:
            tutorial.kill()
            tutorial.wait()
    lines = [line.removeprefix("bob > ") for line in out.splitlines()]
    i = lines.index("chatd > 1 earlier message")
    assert lines[i + 1].startswith("alice [") and lines[i + 1].endswith(" UTC] > hello from before")
    assert lines[i + 2] == "chatd > now"


def test_a_restart_keeps_the_history(start: Callable[..., Daemon], tmp_path: Path) -> None:
    first = start()
    alice = first.client("alice")
    for i in range(3):
        alice.send(f"kept {i}")
    first.wait_for("message", text="kept 2")
    assert first.stop() == 0  # SIGTERM: everything queued is written
    again = start({"history": {"file": str(history_file(first))}})
    assert again.wait_for("startup")["history_messages"] == 3
    bob = again.client("bob")
    assert [t for _, t in replay_of(bob)] == ["kept 0", "kept 1", "kept 2"]
    bob.send("after the restart")
    again.wait_for("message", text="after the restart")
    result = wait_until(
        "the new message on disk", lambda: again.result("stats")["history"]["messages"] == 4
    )
    assert result
    ids = [m["id"] for m in again.result("history")["messages"]]
    assert ids == [1, 2, 3, 4]


def test_kill_9_loses_at_most_the_last_batch(start: Callable[..., Daemon]) -> None:
    d = start(FAST)
    talker = d.client("talker")
    for i in range(300):
        talker.send(f"n{i}")
    d.wait_for("message", text="n299")
    time.sleep(0.5)  # longer than a batch gathers: these are on disk
    for i in range(300, 600):
        talker.send(f"n{i}")
    d.wait_for("message", text="n599")  # logged: accepted
    d.stop(signal.SIGKILL)
    db = sqlite3.connect(history_file(d))
    kept = [row[3] for row in historydb.rows(db)]
    db.close()
    # Everything but at most the batch gathering at the kill, and in order.
    assert len(kept) >= 600 - BATCH_ROWS and len(kept) >= 300
    assert kept == [f"n{i}" for i in range(len(kept))]
    again = start({"history": {"file": str(history_file(d))}, **FAST})
    assert again.wait_for("startup")["history_messages"] == len(kept)


def test_a_corrupt_or_foreign_file_stops_the_start_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "history.sqlite3"
    bad.write_text("this is not SQLite\n" * 50)
    r = run_chatd_with(tmp_path, {"control": {"socket": ""}, "history": {"file": str(bad)}})
    assert r.returncode == 1
    assert r.stderr == f"chatd: error: cannot open the history {bad}: file is not a database\n"
    damaged = tmp_path / "damaged.sqlite3"
    corrupt(damaged)
    r = run_chatd_with(tmp_path, {"control": {"socket": ""}, "history": {"file": str(damaged)}})
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert str(damaged) in r.stderr and r.stderr.startswith("chatd: error: ")


# File systems the test makes: it mounts them (as root) under its own directory.


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "chatd-test", str(where)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_read_only_directory_stops_the_start(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        path = ro / "history.sqlite3"
        r = run_chatd_with(tmp_path, {"control": {"socket": ""}, "history": {"file": str(path)}})
    assert r.returncode == 1
    assert r.stderr == f"chatd: error: cannot open the history {path}: read-only file system\n"


def test_a_read_only_directory_with_the_file_in_it(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        path = disk / "history.sqlite3"
        p = Pumped(path)
        p.put("alice", "before")
        p.until("the row", lambda: p.store.count == 1)
        p.close()
        for extra in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{extra}")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        r = run_chatd_with(tmp_path, {"control": {"socket": ""}, "history": {"file": str(path)}})
    assert r.returncode == 1
    assert r.stderr == f"chatd: error: cannot open the history {path}: read-only file system\n"


@pytest.mark.slow
def test_a_full_disk_is_logged_once_and_the_chat_goes_on(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "disk", "size=2m") as disk:
        d = start({"history": {"file": str(disk / "history.sqlite3")}, **FAST})
        alice = d.client("alice")
        bob = d.client("bob", source="127.0.0.2")
        alice.send("before the disk filled")
        bob.expect("alice", "before the disk filled")
        wait_until("it on disk", lambda: d.result("stats")["history"]["messages"] == 1)
        filler = disk / "filler"
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        for i in range(200):  # more than the WAL's room
            alice.send(f"on a full disk {i} " + "x" * 1000)
        for i in range(200):
            assert bob.recv_text("alice").startswith(f"on a full disk {i} ")  # the chat goes on
        d.wait_for("history_write_failed", timeout=10)
        status = d.result("stats")["history"]
        assert status["complete"] is False and status["pending"] > 0
        carol = d.client("carol", source="127.0.0.3")  # replay is from memory: it works
        assert len(replay_of(carol)) == 20
        filler.unlink()
        d.wait_for("history_write_recovered", timeout=40)
        wait_until("all on disk", lambda: d.result("stats")["history"]["messages"] == 201, 10)
        assert d.result("stats")["history"]["complete"] is True
        assert len(d.find("history_write_failed")) == 1  # said once
        assert d.stop() == 0


# chatctl.


def test_deep_history_is_read_from_the_file_and_answered_in_order(
    start: Callable[..., Daemon],
) -> None:
    d = start(FAST)
    talker = d.client("talker")
    for i in range(1300):  # more than memory keeps (1000)
        talker.send(f"m{i}")
    d.wait_for("message", text="m1299")
    with d.admin() as a:  # three requests at once: answered in order
        a.send_line(
            b'{"cmd": "history", "args": {"limit": 1250}, "id": 1}\n'
            b'{"cmd": "stats", "id": 2}\n'
            b'{"cmd": "history", "args": {"limit": 2}, "id": 3}'
        )
        first, second, third = a.read_reply(), a.read_reply(), a.read_reply()
    assert [first["id"], second["id"], third["id"]] == [1, 2, 3]
    texts = [m["text"] for m in first["result"]["messages"]]
    assert texts == [f"m{i}" for i in range(50, 1300)]
    assert [m["text"] for m in third["result"]["messages"]] == ["m1298", "m1299"]


def test_memory_only_history(start: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start({"history": {"file": ""}})
    alice = d.client("alice")
    alice.send("in memory")
    d.wait_for("message", text="in memory")
    bob = d.client("bob")
    assert [t for _, t in replay_of(bob)] == ["in memory"]
    status = d.result("stats")["history"]
    assert (status["file"], status["messages"], status["complete"]) == ("", 1, True)
    assert not list(Path(d.config_path).parent.glob("*.sqlite3"))


def test_a_reload_applies_retention_to_the_file(start: Callable[..., Daemon]) -> None:
    d = start(FAST)
    talker = d.client("talker")
    for i in range(30):
        talker.send(f"m{i}")
    d.wait_for("message", text="m29")
    wait_until("all on disk", lambda: d.result("stats")["history"]["messages"] == 30)
    cfg = dict(d.config)
    cfg["history"] = {**cfg["history"], "keep_messages": 10}
    import yaml

    d.config_path.write_text(yaml.safe_dump(cfg))
    d.signal(signal.SIGHUP)
    assert "history.keep_messages" in d.wait_for("reload")["applied"]
    wait_until("retention", lambda: d.result("stats")["history"]["messages"] == 10)
    assert d.result("history")["messages"][0]["text"] == "m20"


def test_the_unit_keeps_the_history_in_its_state_directory() -> None:
    unit = (ROOT / "systemd" / "chatd.service").read_text()
    assert "StateDirectory=chatd\n" in unit
    from chatd.server.config import defaults

    assert defaults().history.file == "/var/lib/chatd/history.sqlite3"
    assert history_sender("a", 0) == "a [1970-01-01 00:00:00 UTC]"


def test_history_file_on_the_command_line(start: Callable[..., Daemon], tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "h.sqlite3"
    d = start(args=["--history-file", str(path)])
    assert d.wait_for("startup")["history"] == str(path)
    d.client("alice").send("here")
    d.wait_for("message", text="here")
    d.signal(signal.SIGHUP)
    assert d.wait_for("reload")["needs_restart"] == []  # kept over reloads
    assert d.stop() == 0
    db = sqlite3.connect(path)
    assert [row[3] for row in historydb.rows(db)] == ["here"]
    db.close()
    memory = start(args=["--history-file", ""])
    assert memory.wait_for("startup")["history"] is None


def test_make_run_keeps_the_history_under_dot_run() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "--history-file .run/history.sqlite3" in makefile


def test_damage_inside_a_value_is_found_by_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    p = Pumped(path)
    for i in range(10):
        p.put("alice", f"message {i}")
    p.until("rows", lambda: p.store.count == 10)
    p.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE batches SET texts = replace(texts, 'message 3', 'massage 3')")
    db.commit()
    db.close()
    assert open_error(path) == (
        f"the history {path} is corrupt: the batch of messages 1 to 10 fails its checksum"
    )


def test_a_writer_that_cannot_keep_up_costs_the_oldest_rows_not_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "HELD_MAX", 5)
    store = Store(str(tmp_path / "history.sqlite3"), Loop())
    store.open(100, 1)  # not started: a writer stuck on its disk
    for i in range(1, 9):
        store.put((i, time.time(), "alice", f"m{i}"))
    store.nudge()
    assert [r[3] for r in store.rows] == ["m4", "m5", "m6", "m7", "m8"]
    assert store.status()["lost"] == 3
    store.close()
