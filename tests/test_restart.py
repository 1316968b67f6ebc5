"""Restart without dropping anyone, through systemd's fd store, outside a container.

The test plays the part of the service manager's end of the protocol: it takes the
descriptors chatd stores (FDSTORE=1 with FDNAME=, FDSTOREREMOVE=1) on its
$NOTIFY_SOCKET, runs chatd.service's ExecStop= (`chatctl systemd-stop`, with a
`systemctl` on PATH answering for the unit's job) before SIGTERM, and starts the
next chatd with the descriptors as LISTEN_FDS and LISTEN_FDNAMES, as systemd does.
The real thing, with systemd as PID 1, is in tests/system/run.sh (`make test-system`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import NOTICE, ROOT, Client

SYSTEMCTL = """#!/bin/sh
# systemctl list-jobs as chatctl systemd-stop asks it: the unit's job is $JOB_TYPE.
echo "7 chatd.service $JOB_TYPE running"
"""

# Run as the next chatd: put the descriptors at 3.. as systemd does, then exec chatd.
WRAP = """
import fcntl, os, sys
fds = [int(f) for f in os.environ.pop("FDS").split(",") if f]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]  # out of the way of 3..
for fd in fds:
    os.close(fd)  # only the copies at 3.. stay open, as with systemd
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
if fds:
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "chatd", *sys.argv[1:]])
"""


class Manager:
    """The service manager's side: the notify socket and the fd store."""

    def __init__(self, tmp_path: Path, job: str = "restart") -> None:
        self.tmp = tmp_path
        self.address = str(tmp_path / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.store: dict[str, list[int]] = {}  # name -> descriptors, in the order stored
        self.messages: list[str] = []
        bindir = tmp_path / "bin"
        bindir.mkdir()
        (bindir / "systemctl").write_text(SYSTEMCTL)
        (bindir / "systemctl").chmod(0o755)
        self.env = {
            **os.environ,
            "PATH": f"{bindir}:{os.environ['PATH']}",
            "JOB_TYPE": job,
            "FDSTORE": "100",
            "PYTHONUNBUFFERED": "1",
        }
        self.config = tmp_path / "chatd.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "listen": ["127.0.0.1:0"],
                    "log": {"format": "json"},
                    "control": {"socket": str(tmp_path / "admin.sock")},
                    "state_file": str(tmp_path / "state.json"),
                }
            )
        )
        self.proc: subprocess.Popen[str] | None = None
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def receive(self) -> None:
        """Take what chatd sent on its notify socket, stored descriptors included."""
        self.sock.setblocking(False)
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, 300)
            except BlockingIOError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            self.messages.append(data.decode())
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTORE") == "1":
                self.store.setdefault(name, []).extend(fds)
            elif fields.get("FDSTOREREMOVE") == "1":
                for fd in self.store.pop(name, []):
                    os.close(fd)
            else:
                for fd in fds:
                    os.close(fd)

    def start(self, *, with_store: bool) -> None:
        """chatd, given what the store holds (a restart) or nothing (the first start)."""
        env = {**self.env, "NOTIFY_SOCKET": self.address}
        fds: list[int] = []
        names: list[str] = []
        if with_store:
            self.receive()
            for name, stored in self.store.items():
                fds += stored
                names += [name] * len(stored)
        env["FDS"] = ",".join(map(str, fds))
        env["LISTEN_FDNAMES"] = ":".join(names)
        self.events = []
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRAP, "--config", str(self.config)],
            pass_fds=fds,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        self.wait_for("startup")

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout
        for line in proc.stdout:
            with self._lock:
                self.events.append(json.loads(line))

    def wait_for(self, event: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for e in self.events:
                    if e["event"] == event:
                        return e
            time.sleep(0.02)
        raise AssertionError(f"no {event}: {self.events}")

    def port(self) -> int:
        return int(self.wait_for("startup")["listen"][0].rsplit(":", 1)[1])

    def stop(self, timeout: float = 10) -> int:
        """ExecStop= (chatctl systemd-stop), then SIGTERM: systemctl restart and
        systemctl stop both do so."""
        assert self.proc
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "chatd.ctl",
                "--socket",
                str(self.tmp / "admin.sock"),
                "systemd-stop",
                "chatd.service",
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self.receive()
        return rc

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stored in self.store.values():
            for fd in stored:
                os.close(fd)
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path)
    yield m
    m.close()


def test_a_restart_through_the_fd_store_keeps_every_connection(manager: Manager) -> None:
    manager.start(with_store=False)
    port = manager.port()
    alice = Client(port)
    alice.join("alice")
    bob = Client(port, source="127.0.0.2")
    bob.join("bob")
    alice.expect(NOTICE, "bob joined")
    gone = Client(port, source="127.0.0.3")
    gone.join("gone")
    gone.close()  # its descriptor leaves the store with it
    alice.expect(NOTICE, "gone joined")
    alice.expect(NOTICE, "gone left (quit)")
    manager.receive()
    assert set(manager.store) == {"listen", "control", "c1", "c2"}
    ports = [alice.sock.getsockname(), bob.sock.getsockname()]
    for round_ in range(2):
        alice.send(f"before {round_}")
        assert manager.stop() == 0  # systemctl restart: the state goes to the store
        assert "state" in manager.store
        alice.send(f"during {round_}")  # read by the next chatd
        manager.start(with_store=True)
        taken = manager.wait_for("handover_taken")
        assert (taken["connections"], taken["users"]) == (2, 2)
        assert bob.recv_text("alice", timeout=10) == f"before {round_}"
        assert bob.recv_text(NOTICE) == "chatd restarted (version 0.1.0)"
        assert bob.recv_text("alice") == f"during {round_}"
        manager.receive()
        assert "state" not in manager.store  # taken, and dropped from the store
    bob.send("both ways")
    assert alice.recv_text("bob") == "both ways"
    assert [alice.sock.getsockname(), bob.sock.getsockname()] == ports
    list_ = Client(port, source="127.0.0.4")  # the listener is the same, too
    list_.join("late")


def test_a_stop_says_goodbye_and_hands_nothing_over(tmp_path: Path) -> None:
    manager = Manager(tmp_path, job="stop")
    try:
        manager.start(with_store=False)
        alice = Client(manager.port())
        alice.join("alice")
        assert manager.stop() == 0
        assert alice.expect_closed() == [(NOTICE, "the server is shutting down")]
        assert "state" not in manager.store
        assert not [n for n in manager.store if n[0] == "c" and n[1:].isdigit()]  # removed
    finally:
        manager.close()


def test_connections_handed_over_without_a_state_are_told_to_reconnect(
    manager: Manager,
) -> None:
    manager.start(with_store=False)
    alice = Client(manager.port())
    alice.join("alice")
    manager.proc.kill()  # type: ignore[union-attr]  # a crash: no state stored
    manager.proc.wait()  # type: ignore[union-attr]
    manager.start(with_store=True)
    assert alice.expect_closed() == [
        (NOTICE, "the server restarted without what it knew of your connection; reconnect")
    ]
    Client(manager.port()).join("alice")  # the name is free


def test_a_corrupt_state_is_refused_in_the_log_and_nobody_is_half_adopted(
    manager: Manager,
) -> None:
    manager.start(with_store=False)
    alice = Client(manager.port())
    alice.join("alice")
    assert manager.stop() == 0
    (state,) = manager.store["state"]
    os.ftruncate(state, 0)
    os.pwrite(state, b'{"format": "chatd-handover", "version": 99}', 0)
    manager.start(with_store=True)
    refused = manager.wait_for("handover_refused")
    assert refused["error"] == "the state handed over: handover version 99, this chatd reads 2"
    assert alice.expect_closed() == [
        (NOTICE, "the server restarted without what it knew of your connection; reconnect")
    ]


def test_a_restart_into_a_config_that_fails_tells_the_clients(manager: Manager) -> None:
    manager.start(with_store=False)
    alice = Client(manager.port())
    alice.join("alice")
    assert manager.stop() == 0
    manager.config.write_text(manager.config.read_text() + "max_clients: many\n")
    manager.receive()
    fds = [fd for stored in manager.store.values() for fd in stored]
    names = [n for n, stored in manager.store.items() for _ in stored]
    done = subprocess.run(
        [sys.executable, "-c", WRAP, "--config", str(manager.config)],
        pass_fds=fds,
        env={**manager.env, "FDS": ",".join(map(str, fds)), "LISTEN_FDNAMES": ":".join(names)},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 2  # RestartPreventExitStatus=2: no crash loop
    assert "max_clients: expected an integer" in done.stderr
    ((sender, text),) = alice.expect_closed()
    assert sender == NOTICE and text.startswith("the server could not restart (")
    assert text.endswith("max_clients: expected an integer 1-1000000, got 'many'); reconnect later")


def test_a_control_socket_whose_file_went_is_bound_again(manager: Manager) -> None:
    manager.start(with_store=False)
    alice = Client(manager.port())
    alice.join("alice")
    assert manager.stop() == 0
    (manager.tmp / "admin.sock").unlink()  # a RuntimeDirectory removed, say
    manager.start(with_store=True)
    r = subprocess.run(
        [sys.executable, "-m", "chatd.ctl", "--socket", str(manager.tmp / "admin.sock"), "list"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "alice" in r.stdout
    alice.close()


def test_the_metrics_listener_is_kept_across_a_restart(manager: Manager) -> None:
    settings = yaml.safe_load(manager.config.read_text())
    manager.config.write_text(yaml.safe_dump({**settings, "metrics": {"listen": "127.0.0.1:0"}}))
    manager.start(with_store=False)
    address = manager.wait_for("startup")["metrics"]
    alice = Client(manager.port())
    alice.join("alice")
    manager.receive()
    assert len(manager.store["metrics"]) == 1
    assert manager.stop() == 0
    manager.start(with_store=True)
    assert manager.wait_for("startup")["metrics"] == address  # the same socket, port 0 or not
    host, port = address.rsplit(":", 1)
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "chatd_users 1.0" in text.splitlines()
    manager.receive()
    assert len(manager.store["metrics"]) == 1  # stored again, not twice


def test_a_metrics_listener_turned_off_is_not_kept(manager: Manager) -> None:
    settings = yaml.safe_load(manager.config.read_text())
    manager.config.write_text(yaml.safe_dump({**settings, "metrics": {"listen": "127.0.0.1:0"}}))
    manager.start(with_store=False)
    host, port = manager.wait_for("startup")["metrics"].rsplit(":", 1)
    assert manager.stop() == 0
    manager.config.write_text(yaml.safe_dump(settings))
    manager.start(with_store=True)
    assert manager.wait_for("startup").get("metrics") is None
    manager.receive()
    assert "metrics" not in manager.store
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=5):
        pass
