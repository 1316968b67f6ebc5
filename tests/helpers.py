"""Test helpers: a real chatd subprocess and a minimal blocking client."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal as signals
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from chatd.wire import notices

ROOT = Path(__file__).resolve().parent.parent
NOTICE = "chatd"
TIMEOUT = 5.0
# A start imports chatd and its dependencies: on a loaded shared machine that alone
# has taken over 5 s.  Waiting longer costs nothing when it starts at once.
STARTUP_TIMEOUT = 30.0
BYSTANDER_HOST = "127.0.0.3"  # where Bystanders connect from
# Settings for a test that opens more connections from 127.0.0.1 than one address
# may (max_per_address, max_handshakes_per_address) or that join at once.
CROWD = {"address_exempt": ["127.0.0.1"], "max_handshakes": 20000}


def frame(text: str | bytes, header_length: int = 10) -> bytes:
    payload = text.encode() if isinstance(text, str) else text
    return f"{len(payload):<{header_length}}".encode() + payload


class Daemon:
    """chatd running as a subprocess on an ephemeral port, its log collected."""

    def __init__(
        self,
        tmp_path: Path,
        settings: dict[str, Any] | None = None,
        *,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        wait: bool = True,
    ) -> None:
        """``prefix`` runs chatd under another program (systemd-socket-activate);
        with ``wait=False`` call ``wait_started()`` before using the daemon."""
        cfg: dict[str, Any] = {
            "listen": ["127.0.0.1:0"],
            "log": {"format": "json"},
            "control": {"socket": str(tmp_path / "admin.sock")},
            "state_file": str(tmp_path / "state.json"),
            "history": {"file": str(tmp_path / "history.sqlite3")},
        }
        for key, value in (settings or {}).items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        self.config = cfg
        self.config_path = tmp_path / "chatd.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.events: list[dict[str, Any]] = []
        self.stderr = ""
        self._cond = threading.Condition()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [
                *(prefix or []),
                sys.executable,
                "-m",
                "chatd",
                "--config",
                str(self.config_path),
                *(args or []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.listen: list[str] = []
        self.port = 0
        self.control_path: str = cfg["control"]["socket"]
        if wait:
            self.wait_started()

    def wait_started(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Wait for the startup event; take the port from it."""
        try:
            startup = self.wait_for("startup", timeout)
        except AssertionError:
            self.proc.kill()
            self.proc.wait()
            assert self.proc.stderr
            raise AssertionError(f"chatd did not start: {self.proc.stderr.read()}") from None
        self.listen = startup["listen"]
        self.port = int(self.listen[0].rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "<not json>", "line": line}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def wait_for(self, event: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        """Wait for a log event with these fields; return it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if e.get("event") == event and all(e.get(k) == v for k, v in fields.items()):
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no {event} event with {fields}; log: {self.events}")
                self._cond.wait(min(left, 0.1))

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [
                e
                for e in self.events
                if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
            ]

    def client(self, name: str | None = None, **kw: Any) -> Client:
        c = Client(self.port, **kw)
        if name is not None:
            c.join(name)
        return c

    def admin(self, **kw: Any) -> Admin:
        return Admin(self.control_path, **kw)

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one control request on a new connection; return the reply."""
        with self.admin() as a:
            return a.request({"cmd": cmd, "args": args})

    def result(self, cmd: str, **args: Any) -> Any:
        """The result of a control request that must succeed."""
        reply = self.request(cmd, **args)
        assert reply["ok"] is True, reply
        return reply["result"]

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run `chatctl --socket THIS_DAEMON'S ARGS...`."""
        return chatctl("--socket", self.control_path, *args, timeout=timeout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signals.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self._reader.join(timeout)
        assert self.proc.stderr
        self.stderr = self.proc.stderr.read()
        return rc

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


class Client:
    """A blocking client speaking the frame protocol, every wait bounded."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        header_length: int = 10,
        timeout: float = TIMEOUT,
        source: str | None = None,
    ) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.hl = header_length
        self.timeout = timeout
        self.buf = b""
        self.name = ""
        self.replayed: list[tuple[str, str]] | None = None  # what join() was replayed

    def join(self, name: str) -> list[tuple[str, str]]:
        """Send the name and read the welcome notice, and the replay of what was said
        before if one follows (kept in ``replayed``, without its first and last notices)."""
        self.name = name
        self.send(name)
        sender, text = self.recv()
        assert sender == NOTICE and text.startswith(f"welcome, {name}"), (sender, text)
        self._read_replay()
        return [(sender, text)]

    def _read_replay(self) -> None:
        # The daemon sends the replay with the welcome, in one piece: what of it there
        # is has arrived with the welcome.
        self.sock.settimeout(0.0)
        try:
            with contextlib.suppress(BlockingIOError):
                while data := self.sock.recv(65536):
                    self.buf += data
        finally:
            self.sock.settimeout(self.timeout)
        begin = frame(NOTICE, self.hl)
        if not self.buf.startswith(begin) or b" earlier message" not in self.buf[:200]:
            return
        _, text = self.recv()
        assert re.fullmatch(r"\d+ earlier messages?", text), text
        self.replayed = []
        while (pair := self.recv()) != (NOTICE, "now"):
            self.replayed.append(pair)

    def send(self, text: str | bytes) -> None:
        self.sock.sendall(frame(text, self.hl))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int, deadline: float) -> bool:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"waited for {n} bytes, have {self.buf!r}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return False
            self.buf += data
        return True

    def _frame(self, deadline: float) -> str | None:
        if not self._fill(self.hl, deadline):
            return None
        n = int(self.buf[: self.hl])
        if not self._fill(self.hl + n, deadline):
            return None
        payload, self.buf = self.buf[self.hl : self.hl + n], self.buf[self.hl + n :]
        return payload.decode()

    def recv(self, timeout: float | None = None) -> tuple[str, str]:
        """The next (sender, text) pair; AssertionError if the server closed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        sender = self._frame(deadline)
        text = self._frame(deadline) if sender is not None else None
        if sender is None or text is None:
            raise AssertionError(f"connection closed; unread {self.buf!r}")
        return sender, text

    def recv_text(self, sender: str, timeout: float | None = None) -> str:
        """Skip pairs until one from ``sender``; return its text."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            s, text = self.recv(max(0.0, deadline - time.monotonic()))
            if s == sender:
                return text

    def expect(self, sender: str, text: str, timeout: float | None = None) -> None:
        got = self.recv(timeout)
        assert got == (sender, text), got

    def expect_nothing(self, wait: float = 0.3) -> None:
        """Assert that nothing arrives within ``wait`` seconds."""
        try:
            got = self.recv(wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected {got}")

    def expect_closed(self, timeout: float | None = None) -> list[tuple[str, str]]:
        """Read until the server closes; return what came before."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        got = []
        while True:
            sender = self._frame(deadline)
            if sender is None:
                return got
            text = self._frame(deadline)
            if text is None:
                return got
            got.append((sender, text))

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close abruptly, with RST."""
        import struct

        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class Bystanders:
    """Two users who join before an abuse case and must not notice it.

    ``check()`` asserts the daemon still serves: a new client can join, and the
    two bystanders exchange a message both ways, each within ``within`` seconds.
    """

    def __init__(self, daemon: Daemon, within: float = 1.0) -> None:
        self.daemon = daemon
        self.within = within
        # From an address of their own: flood control and the per-address limits
        # are the address's, and the case under test comes from 127.0.0.1.
        self.a = daemon.client("bystander-a", source=BYSTANDER_HOST)
        self.b = daemon.client("bystander-b", source=BYSTANDER_HOST)
        self.a.expect(NOTICE, "bystander-b joined")
        self.rounds = 0

    def check(self) -> float:
        """Assert the daemon still serves; return the slower one-way delay in seconds."""
        self.rounds += 1
        newcomer = self.daemon.client(f"newcomer-{self.rounds}", source=BYSTANDER_HOST)
        slowest = 0.0
        for src, dst in ((self.a, self.b), (self.b, self.a)):
            text = f"ping {self.rounds} from {src.name}"
            t0 = time.monotonic()
            deadline = t0 + self.within
            src.send(text)
            # Anything else queued for dst (joins, leaves, the case's traffic) is skipped.
            while dst.recv_text(src.name, timeout=max(0.0, deadline - time.monotonic())) != text:
                pass
            slowest = max(slowest, time.monotonic() - t0)
        newcomer.close()
        return slowest


def run_chatd_with(
    tmp_path: Path, settings: dict[str, Any], *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run chatd on a config of ``settings`` until it exits (a start that must fail)."""
    cfg = tmp_path / "run.yaml"
    history = {"history": {"file": str(tmp_path / "history.sqlite3")}}
    cfg.write_text(yaml.safe_dump({"listen": ["127.0.0.1:0"], **history, **settings}))
    return subprocess.run(
        [sys.executable, "-m", "chatd", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def chatctl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatd.ctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


class Admin:
    """A raw control-socket connection: one JSON object per line."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_line(self, data: bytes) -> None:
        self.sock.sendall(data + b"\n")

    def read_reply(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"control connection closed; unread {self.buf!r}")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def request(self, req: Any) -> dict[str, Any]:
        self.send_line(json.dumps(req).encode())
        return self.read_reply()

    def close(self) -> None:
        self.sock.close()


def names_told(text: str) -> int:
    """How many users a join or leave notice tells of: 1, or for several in a row
    ("a, b and 48 others left (closed)", "a and b joined") the names and the others."""
    for many in (notices.JOINED_MANY, notices.LEFT_MANY):
        fields = many.match(text)
        if fields is not None and " and " in fields["names"]:
            head, _, tail = fields["names"].rpartition(" and ")
            shown = len(head.split(", "))
            return shown + (int(tail.split()[0]) if tail.endswith(" others") else 1)
    return 1


def joined_names(text: str) -> list[str]:
    """The names a join notice tells of, one join or several in a row ("a, b and c
    joined"; every name shown, as they are up to three)."""
    one = notices.JOINED.match(text)
    if one is not None:
        return [one["name"]]
    fields = notices.JOINED_MANY.match(text)
    assert fields is not None, text
    head, _, last = fields["names"].rpartition(" and ")
    return [*head.split(", "), last]


def expect_joins(client: Client, *names: str) -> None:
    """``client`` is told that ``names`` joined, in that order: in one notice or several."""
    told: list[str] = []
    while len(told) < len(names):
        sender, text = client.recv()
        assert sender == NOTICE, (sender, text)
        told += joined_names(text)
    assert told == list(names)


def wait_until(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``check`` until it returns something true, and return that; fail with
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return result
