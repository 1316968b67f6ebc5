"""`chatd --daemon`: detach, pidfile, log file, chat through it, stop with SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import NOTICE, ROOT, TIMEOUT, Client

from chatd.server.daemon import PidFile


def run_chatd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatd", *args], capture_output=True, text=True, timeout=30, cwd=ROOT
    )


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_until(what: str, check: Any, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# Run as root, the tests say they mean it (one test checks that chatd asks).
AS_ROOT = ["--allow-root"] if os.geteuid() == 0 else []


class Detached:
    """A `chatd --daemon` started by the test, found by its pidfile."""

    def __init__(self, tmp_path: Path, settings: dict[str, Any] | None = None) -> None:
        self.log_path = tmp_path / "chatd.log"
        self.pidfile = tmp_path / "chatd.pid"
        self.config_path = tmp_path / "chatd.yaml"
        self.config: dict[str, Any] = {
            "listen": ["127.0.0.1:0"],
            "log": {"format": "json", "file": str(self.log_path)},
            "control": {"socket": str(tmp_path / "admin.sock")},
            "state_file": str(tmp_path / "state.json"),
            "history": {"file": str(tmp_path / "history.sqlite3")},
            **(settings or {}),
        }
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.pid = 0

    def start(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return run_chatd("-c", str(self.config_path), *extra)

    def daemonize(self) -> None:
        r = self.start("--daemon", *AS_ROOT, "--pidfile", str(self.pidfile))
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
        # `chatd --daemon` returns once the daemon serves: no waiting needed.
        pid = self._live_pid()
        assert pid, f"no live pid in {self.pidfile} once chatd --daemon returned"
        self.pid = pid
        self.port = int(self.wait_for("startup")["listen"][0].rsplit(":", 1)[1])

    def _live_pid(self) -> int | None:
        try:
            text = self.pidfile.read_text()
        except FileNotFoundError:
            return None
        return int(text) if text.strip().isdigit() and alive(int(text)) else None

    def events(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        # chatd's own one-line errors (on stderr, the log file too) are no events.
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_for(self, event: str, **fields: Any) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for e in self.events():
                if e["event"] == event and all(e.get(k) == v for k, v in fields.items()):
                    return e
            return None

        found: dict[str, Any] = wait_until(f"{event} {fields} in {self.log_path}", find)
        return found

    def kill(self) -> None:
        """Teardown: SIGKILL the daemon if a test left it running (checked to be ours)."""
        if self.pid and alive(self.pid):
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
            if str(self.config_path).encode() in cmdline:
                os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def detached(tmp_path: Path) -> Iterator[Detached]:
    d = Detached(tmp_path)
    yield d
    d.kill()


def test_daemon_detaches_serves_reloads_and_stops(detached: Detached) -> None:
    detached.daemonize()
    # Detached: not our child, in a session of its own, away from our terminal.
    assert os.getsid(detached.pid) != os.getsid(0)
    with pytest.raises(ChildProcessError):
        os.waitpid(detached.pid, os.WNOHANG)

    alice = Client(detached.port)
    alice.join("alice")
    bob = Client(detached.port)
    bob.join("bob")
    alice.expect(NOTICE, "bob joined")
    bob.send("hello from the background")
    alice.expect("bob", "hello from the background")
    detached.wait_for("message", user="bob", text="hello from the background")

    detached.config_path.write_text(yaml.safe_dump({**detached.config, "max_name_bytes": 8}))
    os.kill(detached.pid, signal.SIGHUP)
    detached.wait_for("reload", applied=["max_name_bytes"])

    os.kill(detached.pid, signal.SIGTERM)
    assert alice.expect_closed() == [(NOTICE, "the server is shutting down")]
    wait_until("the daemon to exit", lambda: not alive(detached.pid))
    assert not detached.pidfile.exists()
    detached.wait_for("shutdown")
    assert [e for e in detached.events() if e["level"] == "error"] == []


def test_second_daemon_is_refused_while_the_first_runs(detached: Detached) -> None:
    detached.daemonize()
    r = detached.start("--daemon", *AS_ROOT, "--pidfile", str(detached.pidfile))
    assert r.returncode == 1
    assert r.stderr == (
        f"chatd: error: chatd is already running (pid {detached.pid}, pidfile {detached.pidfile})\n"
    )
    assert int(detached.pidfile.read_text()) == detached.pid
    os.kill(detached.pid, signal.SIGTERM)
    wait_until("the daemon to exit", lambda: not alive(detached.pid))


def test_stale_pidfile_is_taken_over(detached: Detached) -> None:
    # A daemon killed with SIGKILL leaves its pidfile, but no lock on it.
    detached.pidfile.write_text("999999\n")
    detached.daemonize()
    assert detached.pid != 999999
    os.kill(detached.pid, signal.SIGTERM)
    wait_until("the daemon to exit", lambda: not alive(detached.pid))
    assert not detached.pidfile.exists()


def test_daemon_without_a_log_file_is_refused(tmp_path: Path) -> None:
    d = Detached(tmp_path, {"log": {"format": "json"}})
    r = d.start("--daemon", *AS_ROOT, "--pidfile", str(d.pidfile))
    assert r.returncode == 2
    assert r.stderr == (
        "chatd: error: --daemon needs log.file in the config (a daemon has no terminal)\n"
    )
    assert not d.pidfile.exists()


def test_daemon_reports_a_taken_address_before_detaching(detached: Detached) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        detached.config_path.write_text(
            yaml.safe_dump({**detached.config, "listen": [f"127.0.0.1:{port}"]})
        )
        r = detached.start("--daemon", *AS_ROOT, "--pidfile", str(detached.pidfile))
    assert r.returncode == 1
    assert r.stderr == f"chatd: error: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert not detached.pidfile.exists()


def test_pidfile_needs_daemon(detached: Detached) -> None:
    r = detached.start("--pidfile", str(detached.pidfile))
    assert r.returncode == 2
    assert r.stderr.endswith("chatd: error: --pidfile needs --daemon\n")


def test_pidfile_lock_is_what_counts(tmp_path: Path) -> None:
    path = str(tmp_path / "x.pid")
    first = PidFile(path)
    assert first.holder() is None
    first.acquire()
    assert first.holder() == os.getpid()
    with pytest.raises(Exception, match=r"already running \(pid \d+, pidfile .*x\.pid\)"):
        PidFile(path).acquire()
    first.release()
    assert not os.path.exists(path)
    assert PidFile(path).holder() is None


def test_log_file_in_the_foreground_is_reopened_on_reload(tmp_path: Path) -> None:
    log_path = tmp_path / "chatd.log"
    config_path = tmp_path / "chatd.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "listen": ["127.0.0.1:0"],
                "log": {"format": "json", "file": str(log_path)},
                "control": {"socket": ""},
                "history": {"file": ""},
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatd", "-c", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        wait_until("startup in the log file", lambda: log_path.exists() and log_path.read_text())
        assert json.loads(log_path.read_text().splitlines()[0])["event"] == "startup"
        # logrotate: move the file away, then reload.
        log_path.rename(tmp_path / "chatd.log.1")
        proc.send_signal(signal.SIGHUP)
        wait_until("a new log file", lambda: log_path.exists() and "reload" in log_path.read_text())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert out == err == ""  # nothing on stdout: the events went to the file
    assert "shutdown" in log_path.read_text()


def test_log_file_must_be_absolute(tmp_path: Path) -> None:
    config_path = tmp_path / "chatd.yaml"
    config_path.write_text("log: {file: chatd.log}\n")
    r = run_chatd("-c", str(config_path), "--check-config")
    assert r.returncode == 2
    assert r.stderr == (
        f'chatd: error: {config_path}: log.file: expected an absolute path or "", '
        "got 'chatd.log'\n"
    )


def test_log_file_that_cannot_be_opened_is_a_startup_error(tmp_path: Path) -> None:
    config_path = tmp_path / "chatd.yaml"
    missing = tmp_path / "no-such-dir" / "chatd.log"
    config_path.write_text(
        yaml.safe_dump(
            {
                "listen": ["127.0.0.1:0"],
                "log": {"file": str(missing)},
                "control": {"socket": ""},
                "state_file": str(tmp_path / "state.json"),
                "history": {"file": ""},
            }
        )
    )
    r = run_chatd("-c", str(config_path))
    assert r.returncode == 1
    assert r.stderr == (
        f"chatd: error: {config_path}: log.file: cannot open {missing}: No such file or directory\n"
    )


def test_failure_after_detaching_is_reported_by_the_command(detached: Detached) -> None:
    # A corrupt state file is found only by the daemon, once detached.
    state = Path(detached.config["state_file"])
    state.write_text("{not json")
    r = detached.start("--daemon", *AS_ROOT, "--pidfile", str(detached.pidfile))
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.startswith(f"chatd: error: cannot read {state}: not a chatd state file")
    assert r.stderr.count("\n") == 1
    assert not detached.pidfile.exists()
    assert r.stderr in detached.log_path.read_text()


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="dropping root needs root")
NOBODY = 65534


@root_only
def test_as_root_the_daemon_asks_whom_to_serve_as(detached: Detached) -> None:
    r = detached.start("--daemon", "--pidfile", str(detached.pidfile))
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (
        "chatd: error: --daemon would serve as root: give --user USER (daemon.user), or "
        "--allow-root to mean it\n"
    )
    assert not detached.pidfile.exists()
    r = detached.start("--daemon", "--user", "no-such-user", "--pidfile", str(detached.pidfile))
    assert (r.returncode, r.stderr) == (2, "chatd: error: --user: no user 'no-such-user'\n")
    r = run_chatd("--user", "nobody")
    assert r.returncode == 2 and r.stderr.endswith("chatd: error: --user needs --daemon\n")


@root_only
def test_the_daemon_drops_root_once_bound_and_keeps_its_files(tmp_path: Path) -> None:
    public = Path(tempfile.mkdtemp(prefix="chatd-test-"))  # reachable by nobody
    public.chmod(0o755)
    state = public / "state"  # made by chatd, given to nobody: the history goes there too
    d = Detached(
        public,
        {
            "state_file": str(state / "state.json"),
            "history": {"file": str(state / "history.sqlite3")},
        },
    )
    try:
        r = d.start("--daemon", "--user", "nobody", "--pidfile", str(tmp_path / "chatd.pid"))
        assert (r.returncode, r.stderr) == (0, "")
        d.pidfile = tmp_path / "chatd.pid"
        d.pid = int(d.pidfile.read_text())
        status = Path(f"/proc/{d.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{NOBODY}\s+{NOBODY}\s+{NOBODY}\s", status, re.M), status
        assert re.search(r"^Groups:\s+\d+\s*$", status, re.M)  # its group alone
        d.wait_for("serving_as", user="nobody", uid=NOBODY)
        with socket.socket(socket.AF_UNIX) as s:  # root, as admins do, asks for a ban
            s.connect(str(public / "admin.sock"))
            s.sendall(b'{"cmd": "ban", "args": {"target": "eve"}}\n')
            assert b'"ok": true' in s.recv(65536)
        assert os.stat(public / "state" / "state.json").st_uid == NOBODY  # saved as nobody
        assert os.stat(state / "history.sqlite3").st_uid == NOBODY
        os.kill(d.pid, signal.SIGHUP)
        d.wait_for("reload")  # the log file, reopened as nobody
        os.kill(d.pid, signal.SIGTERM)
        wait_until("the daemon to exit", lambda: not alive(d.pid))
    finally:
        d.kill()
        shutil.rmtree(public, ignore_errors=True)


@root_only
def test_a_directory_shared_with_other_files_is_never_handed_to_the_user(tmp_path: Path) -> None:
    shared = Path(tempfile.mkdtemp(prefix="chatd-test-"))  # as /var/lib would be
    shared.chmod(0o755)
    (shared / "someone-elses").write_text("not chatd's\n")
    d = Detached(shared, {"state_file": str(shared / "state.json")})
    try:
        r = d.start("--daemon", "--user", "nobody", "--pidfile", str(tmp_path / "chatd.pid"))
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr == (
            f"chatd: error: state_file: nobody could not write in {shared}, which holds "
            "other files too: give chatd a directory of its own\n"
        )
        assert os.stat(shared).st_uid == 0  # still root's
        own = shared / "chatd"  # a directory of its own, already there, empty: handed over
        own.mkdir()
        d.config["state_file"] = str(own / "state.json")
        d.config["history"] = {"file": str(own / "history.sqlite3")}
        d.config_path.write_text(yaml.safe_dump(d.config))
        r = d.start("--daemon", "--user", "nobody", "--pidfile", str(tmp_path / "chatd.pid"))
        assert (r.returncode, r.stderr) == (0, "")
        d.pidfile = tmp_path / "chatd.pid"
        d.pid = int(d.pidfile.read_text())
        assert os.stat(own).st_uid == NOBODY and os.stat(shared).st_uid == 0
    finally:
        d.kill()
        shutil.rmtree(shared, ignore_errors=True)


# Restart without dropping anyone: SIGUSR2 to chatd --daemon.


def restart(d: Detached) -> int:
    """SIGUSR2, then the new chatd's pid once it took over (the pidfile follows it)."""
    old = d.pid
    handovers = len([e for e in d.events() if e["event"] == "handover"])
    os.kill(old, signal.SIGUSR2)
    wait_until(
        "the handover", lambda: len([e for e in d.events() if e["event"] == "handover"]) > handovers
    )
    wait_until("the old chatd to leave", lambda: not alive(old))
    new = int(d.pidfile.read_text())
    assert new != old and alive(new)
    d.pid = new
    return new


def test_sigusr2_restarts_the_daemon_and_every_connection_stays(detached: Detached) -> None:
    detached.daemonize()
    alice = Client(detached.port)
    alice.join("alice")
    bob = Client(detached.port, source="127.0.0.2")
    bob.join("bob")
    carol = Client(detached.port, source="127.0.0.3")
    carol.join("carol")
    ports = [c.sock.getsockname() for c in (alice, bob, carol)]
    for c in (alice, bob):
        c.recv_text(NOTICE)  # carol joined, at least
    bob.send_raw(b"10        partial ")  # a frame begun before the restart...
    sent = 0
    for _ in range(2):
        for _ in range(15):  # a numbered stream, sent across the restart
            alice.send(f"n{sent}")
            sent += 1
        restart(detached)
    for _ in range(15):
        alice.send(f"n{sent}")
        sent += 1
    bob.send_raw(b"\xc3\xa9")  # ...and ended after it
    for reader in (bob, carol):
        assert [reader.recv_text("alice", timeout=10) for _ in range(sent)] == [
            f"n{i}" for i in range(sent)
        ]
    assert carol.recv_text("bob") == "partial é"
    bob.send("both ways")
    assert [alice.recv_text("bob") for _ in range(2)] == ["partial é", "both ways"]
    assert [c.sock.getsockname() for c in (alice, bob, carol)] == ports  # the same connections
    took = [e for e in detached.events() if e["event"] == "handover_taken"]
    assert [(e["connections"], e["users"]) for e in took] == [(3, 3), (3, 3)]
    stats = json.loads(chatctl_json(detached, "stats"))
    assert stats["users"] == 3 and stats["messages"] >= sent
    os.kill(detached.pid, signal.SIGTERM)  # a stop after the restarts says goodbye
    assert alice.expect_closed()[-1] == (NOTICE, "the server is shutting down")
    wait_until("the daemon to exit", lambda: not alive(detached.pid))
    assert not detached.pidfile.exists()


def test_a_restart_into_a_bad_config_is_refused_and_the_old_chatd_serves_on(
    detached: Detached,
) -> None:
    detached.daemonize()
    alice = Client(detached.port)
    alice.join("alice")
    bob = Client(detached.port, source="127.0.0.2")
    bob.join("bob")
    detached.config_path.write_text(yaml.safe_dump({**detached.config, "max_clients": "many"}))
    old = detached.pid
    os.kill(old, signal.SIGUSR2)
    failed = detached.wait_for("restart_failed")
    assert "max_clients: expected an integer" in failed["error"]
    assert alive(old) and int(detached.pidfile.read_text()) == old
    alice.send("still here")
    assert bob.recv_text("alice") == "still here"


def test_a_next_chatd_that_fails_once_ready_leaves_the_old_one_serving(
    detached: Detached,
) -> None:
    """The next chatd reads its config and says ready; the old one hands everything
    over; the next one cannot listen where its config says (the address is taken)
    and gives it all back: nobody is dropped, nothing is lost, the control socket
    stays."""
    detached.daemonize()
    alice = Client(detached.port)
    alice.join("alice")
    bob = Client(detached.port, source="127.0.0.2")
    bob.join("bob")
    alice.recv_text(NOTICE)  # bob joined
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = f"127.0.0.1:{taken.getsockname()[1]}"
    detached.config_path.write_text(
        yaml.safe_dump({**detached.config, "metrics": {"listen": busy}})
    )
    old = detached.pid
    alice.send("before")
    os.kill(old, signal.SIGUSR2)
    failed = detached.wait_for("restart_failed")
    assert "metrics.listen" in failed["error"] and failed["serving"] is True
    alice.send("after")
    assert [bob.recv_text("alice") for _ in range(2)] == ["before", "after"]
    assert alive(old) and int(detached.pidfile.read_text()) == old
    assert "alice" in chatctl_json(detached, "list")  # the control socket is still there
    bob.send("both ways")
    assert alice.recv_text("bob") == "both ways"
    assert not [e for e in detached.events() if e["event"] == "handover_taken"]
    taken.close()


def test_the_metrics_listener_and_the_chat_go_on_across_sigusr2(tmp_path: Path) -> None:
    d = Detached(tmp_path, {"metrics": {"listen": "127.0.0.1:0"}})
    try:
        d.daemonize()
        address = d.wait_for("startup")["metrics"]
        alice = Client(d.port)
        alice.join("alice")
        old = d.pid
        os.kill(old, signal.SIGUSR2)
        d.wait_for("restart_begin")
        os.kill(old, signal.SIGUSR2)  # a second while the next chatd starts: one restart
        d.wait_for("restart_in_progress")
        wait_until("the old chatd to leave", lambda: not alive(old))
        d.pid = int(d.pidfile.read_text())
        started = [e for e in d.events() if e["event"] == "startup"]
        assert [e["metrics"] for e in started] == [address, address]
        host, port = address.rsplit(":", 1)
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
            assert "chatd_users 1.0" in r.read().decode().splitlines()
        assert alice.recv_text(NOTICE) == "chatd restarted (version 0.1.0)"
    finally:
        d.kill()


def chatctl_json(d: Detached, cmd: str) -> str:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatd.ctl",
            "--socket",
            str(d.config["control"]["socket"]),
            "--json",
            cmd,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("where", ["file", "memory"])
def test_the_history_goes_on_across_sigusr2(tmp_path: Path, where: str) -> None:
    """What was said just before a restart is replayed after it, the ids go on from
    the last one, and (with a file) the file has every message once the old chatd
    has left: kept in memory only, the history survives the restart too."""
    history = {"file": str(tmp_path / "history.sqlite3") if where == "file" else ""}
    d = Detached(tmp_path, {"history": history})
    try:
        d.daemonize()
        alice = Client(d.port)
        alice.join("alice")
        carol = Client(d.port, source="127.0.0.3")
        carol.join("carol")
        for i in range(5):
            alice.send(f"before {i}")
        assert [carol.recv_text("alice") for _ in range(5)] == [f"before {i}" for i in range(5)]
        restart(d)  # the old chatd said them all: in its ring, perhaps not yet on disk
        alice.send("after")
        assert carol.recv_text("alice") == "after"
        bob = Client(d.port, source="127.0.0.2")
        bob.join("bob")
        said = [(sender.split(" [")[0], text) for sender, text in bob.replayed or []]
        assert said == [("alice", f"before {i}") for i in range(5)] + [("alice", "after")]
        rows = json.loads(chatctl_json(d, "history"))["messages"]
        assert [(r["id"], r["text"]) for r in rows] == [
            (i + 1, t) for i, t in enumerate([f"before {i}" for i in range(5)] + ["after"])
        ]
    finally:
        d.kill()
