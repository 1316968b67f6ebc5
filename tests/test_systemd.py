"""systemd protocols for real, without systemd: sd_notify to a datagram socket of
the test's own, socket activation through systemd-socket-activate."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from helpers import NOTICE, ROOT, Client, Daemon

from chatd.server import systemd


class NotifySocket:
    """The service manager's end of sd_notify: a datagram socket, messages parsed."""

    def __init__(self, address: str) -> None:
        self.address = address  # as given in NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.seen: list[dict[str, str]] = []

    def recv(self, timeout: float = 5.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in data.split("\n"))
        self.seen.append(message)
        return message

    def wait_for(self, key: str, value: str | None = None, timeout: float = 5.0) -> dict[str, str]:
        """The next message carrying ``key`` (with ``value``); earlier ones are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value} within {timeout}s; seen {self.seen}")
            try:
                message = self.recv(left)
            except TimeoutError:
                continue
            if key in message and (value is None or message[key] == value):
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(str(tmp_path / "notify.sock"))
    yield n
    n.close()


def test_ready_status_and_stopping(start: Callable[..., Daemon], notify: NotifySocket) -> None:
    d = start(env={"NOTIFY_SOCKET": notify.address})
    ready = notify.wait_for("READY", "1")
    assert ready["STATUS"] == "0 users online, 0 connections"
    assert ready["MAINPID"] == str(d.proc.pid)

    alice = d.client("alice")
    bob = d.client("bob")
    alice.expect(NOTICE, "bob joined")
    # Two joins within the rate-limit interval make one update.
    assert notify.wait_for("STATUS")["STATUS"] == "2 users online, 2 connections"
    with pytest.raises(AssertionError):
        notify.wait_for("STATUS", timeout=1.5)

    alice.close()
    assert notify.wait_for("STATUS")["STATUS"] == "1 user online, 1 connection"
    bob.close()

    assert d.stop() == 0
    assert notify.wait_for("STOPPING", "1")["STATUS"] == "shutting down"


def test_abstract_notify_socket(start: Callable[..., Daemon]) -> None:
    n = NotifySocket(f"@chatd-test-{uuid.uuid4().hex}")
    try:
        start(env={"NOTIFY_SOCKET": n.address})
        assert n.wait_for("READY", "1")["STATUS"].endswith("online, 0 connections")
    finally:
        n.close()


def test_reload_is_bracketed_by_reloading_and_ready(
    start: Callable[..., Daemon], notify: NotifySocket
) -> None:
    d = start(env={"NOTIFY_SOCKET": notify.address})
    notify.wait_for("READY", "1")
    d.config_path.write_text(yaml.safe_dump({**d.config, "max_message_bytes": 100}))
    d.signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1")
    # MONOTONIC_USEC is this machine's CLOCK_MONOTONIC at the reload, as systemd 253+ wants.
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 < now - int(reloading["MONOTONIC_USEC"]) < 60_000_000
    assert notify.wait_for("READY", "1")["STATUS"] == "0 users online, 0 connections"
    d.wait_for("reload", applied=["max_message_bytes"])

    d.config_path.write_text("max_message_bytes: lots\n")
    d.signal(signal.SIGHUP)
    notify.wait_for("RELOADING", "1")
    failed = notify.wait_for("READY", "1")
    assert failed["STATUS"] == (
        f"0 users online, 0 connections; reload failed, old config kept: {d.config_path}: "
        "max_message_bytes: expected an integer 1-16777216, got 'lots'"
    )
    # It stays in the status until a reload succeeds.
    alice = d.client("alice")
    assert notify.wait_for("STATUS")["STATUS"].startswith(
        "1 user online, 1 connection; reload failed"
    )
    d.config_path.write_text(yaml.safe_dump(d.config))
    d.signal(signal.SIGHUP)
    notify.wait_for("RELOADING", "1")
    assert notify.wait_for("READY", "1")["STATUS"] == "1 user online, 1 connection"
    alice.close()


def test_watchdog_pings_at_half_the_interval(
    start: Callable[..., Daemon], notify: NotifySocket
) -> None:
    t0 = time.monotonic()
    start(env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"})
    notify.wait_for("READY", "1")
    for _ in range(3):
        notify.wait_for("WATCHDOG", "1", timeout=3)
    # Three pings at 0.2 s each, with generous room for a loaded machine.
    assert time.monotonic() - t0 < 30


def test_watchdog_meant_for_another_process_is_ignored(
    start: Callable[..., Daemon], notify: NotifySocket
) -> None:
    d = start(env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    notify.wait_for("READY", "1")
    with pytest.raises(AssertionError):
        notify.wait_for("WATCHDOG", timeout=1)
    assert not d.find("watchdog")


def test_unreachable_notify_socket_is_logged_and_chat_goes_on(
    start: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = start(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    warning = d.wait_for("sd_notify_unavailable")
    assert "cannot connect to NOTIFY_SOCKET" in warning["error"]
    alice = d.client("alice")
    bob = d.client("bob")
    bob.send("still here")
    alice.expect(NOTICE, "bob joined")
    alice.expect("bob", "still here")


def test_notifier_without_socket_does_nothing() -> None:
    env = {"PATH": "/bin"}
    n = systemd.Notifier.from_environ(env)
    assert not n.enabled and n.error is None
    assert n.notify("READY=1") is False


def test_notifier_takes_the_variable_out_of_the_environment(notify: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": notify.address}
    n = systemd.Notifier.from_environ(env)
    assert env == {}
    assert n.notify("STATUS=two\nlines", "READY=1")
    assert notify.recv() == {"STATUS": "two lines", "READY": "1"}
    n.close()


# Socket activation.


def test_listen_fds_for_another_process_are_left_alone() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "chat"}
    assert systemd.listen_fds(env) is None
    assert env == {}  # never handed down to a child


def test_listen_fds_with_a_bad_count_is_an_error() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "many"}
    with pytest.raises(systemd.ActivationError, match="LISTEN_FDS: expected a positive number"):
        systemd.listen_fds(env)


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        (
            "file",
            "chatd: error: LISTEN_FDS: fd 3 (chat) is not a socket: Socket operation on non-socket",
        ),
        ("udp", "chatd: error: LISTEN_FDS: fd 3 (chat) is not a listening TCP socket"),
        ("tcp", "chatd: error: LISTEN_FDS: fd 3 (chat) is not a listening TCP socket"),
    ],
)
def test_inherited_fd_that_is_no_listener_is_refused(tmp_path: Path, kind: str, error: str) -> None:
    config = tmp_path / "chatd.yaml"
    config.write_text("listen: ['127.0.0.1:0']\n")
    if kind == "file":
        inherited = open(config, "rb")  # noqa: SIM115
    else:
        inherited = socket.socket(type=socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    fd = inherited.fileno()
    # Like a service manager: the descriptor at fd 3, LISTEN_PID naming the process it execs.
    launcher = (
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='chat')\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'chatd', '-c', sys.argv[1]])\n"
    )
    try:
        r = subprocess.run(
            [sys.executable, "-c", launcher, str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            pass_fds=[fd],
        )
    finally:
        inherited.close()
    assert r.returncode == 1, r
    assert r.stderr.strip() == error
    assert r.stdout == ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


needs_activate = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (package systemd)",
)


@needs_activate
def test_socket_activation_serves_the_inherited_socket(
    start: Callable[..., Daemon], notify: NotifySocket
) -> None:
    # The config names another address: the inherited socket wins.
    port = free_port()
    d = start(
        {"listen": ["127.0.0.1:0"]},
        prefix=[
            "systemd-socket-activate",
            f"--listen=127.0.0.1:{port}",
            "--fdname=chat",
            "-E",
            "PYTHONUNBUFFERED=1",
            "-E",
            f"NOTIFY_SOCKET={notify.address}",
        ],
        wait=False,
    )
    # The first client connects before chatd runs (it is what starts it) and is served.
    deadline = time.monotonic() + 10
    while True:
        try:
            alice = Client(port)
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "systemd-socket-activate never listened"
            time.sleep(0.05)
    alice.send("alice")
    assert alice.recv()[1].startswith("welcome, alice")
    d.wait_started()
    assert d.listen == [f"127.0.0.1:{port}"]
    notify.wait_for("READY", "1")
    bob = Client(port)
    bob.join("bob")
    alice.expect(NOTICE, "bob joined")
    bob.send("activated")
    alice.expect("bob", "activated")
    assert d.stop() == 0
