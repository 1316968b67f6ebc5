"""`chatd --daemon`: detach with python-daemon, for systems without systemd.

Everything that can fail for a reason the admin must see (the pidfile is
held, the address is taken, another chatd answers on the control socket, the
log file cannot be opened) is checked before
detaching, while stderr is still the terminal.  Then DaemonContext forks
twice, keeps the listening sockets and the log file open and takes the
pidfile; its signal map ignores only the terminal job-control signals, so
SIGTERM, SIGINT and SIGHUP reach the event loop's own wake-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
from types import TracebackType
from typing import Any

import daemon  # type: ignore[import-untyped]

from chatd import systemd
from chatd.admin import probe_control_socket
from chatd.config import Config, ConfigError
from chatd.server import Server, StartupError, bind_all

DEFAULT_PIDFILE = "/run/chatd.pid"


class PidFileError(Exception):
    """The pidfile cannot be taken; str() is the one-line reason."""


class PidFile:
    """A pidfile locked with flock() for as long as the daemon runs.

    The lock, not the file's existence, says whether chatd runs: a pidfile
    left behind by a killed daemon is unlocked and simply taken over.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def holder(self) -> int | None:
        """The pid in the pidfile if a live process holds its lock, else None."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        finally:
            os.close(fd)
        return None

    def acquire(self) -> None:
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise PidFileError(f"cannot create pidfile {self.path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise PidFileError(
                    f"chatd is already running (pid {pid}, pidfile {self.path})"
                ) from None
            # The holder may have removed the file between our open and lock: start over.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)
        raise PidFileError(f"cannot take pidfile {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    # DaemonContext enters the pidfile once detached and exits it at close.

    def __enter__(self) -> PidFile:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def run(
    cfg: Config,
    config_path: str | None,
    pidfile_path: str,
    *,
    overrides: dict[str, Any] | None = None,
) -> int:
    """Detach and serve; the parent returns 0 once the child is on its way."""
    if not cfg.log.file:
        print(
            "chatd: error: --daemon needs log.file in the config (a daemon has no terminal)",
            file=sys.stderr,
        )
        return 2
    pidfile = PidFile(os.path.abspath(pidfile_path))
    pid = pidfile.holder()
    if pid is not None:
        print(
            f"chatd: error: chatd is already running (pid {pid}, pidfile {pidfile.path})",
            file=sys.stderr,
        )
        return 1
    try:
        logfile = open(cfg.log.file, "a", encoding="utf-8")  # noqa: SIM115
    except OSError as e:
        print(f"chatd: error: log.file: cannot open {cfg.log.file}: {e.strerror}", file=sys.stderr)
        return 1
    try:
        # A live control socket is found now, while stderr is the terminal.
        if cfg.control.socket:
            probe_control_socket(cfg.control.socket)
        sockets = systemd.listen_fds() or bind_all(cfg.listen)
    except (StartupError, systemd.ActivationError) as e:
        print(f"chatd: error: {e}", file=sys.stderr)
        logfile.close()
        return 1
    context = daemon.DaemonContext(
        detach_process=True,
        working_directory="/",
        umask=0o022,
        pidfile=pidfile,
        files_preserve=[*sockets, logfile],
        stdout=logfile,
        stderr=logfile,
        signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
    )
    try:
        context.open()
    except PidFileError as e:
        # Lost a race for the pidfile after the check above; stderr is the log file now.
        print(f"chatd: error: {e}", file=sys.stderr)
        return 1
    try:
        return _serve(cfg, config_path, sockets, overrides)
    finally:
        context.close()


def _serve(
    cfg: Config,
    config_path: str | None,
    sockets: list[socket.socket],
    overrides: dict[str, Any] | None,
) -> int:
    try:
        server = Server(cfg, config_path, systemd.Notifier.from_environ(), overrides=overrides)
    except ConfigError as e:
        print(f"chatd: error: {e}", file=sys.stderr)
        return 1
    try:
        server.open(sockets)
        return server.run()
    finally:
        server.close()
        server.notifier.close()
