"""`chatd --daemon`: detach with python-daemon, for systems without systemd.

What can be checked before detaching (the pidfile is held, the address is
taken, another chatd answers on the control socket, the log file cannot be
opened) is, while stderr is still the terminal.
Then the command forks: the parent waits on a pipe while the child lets
DaemonContext detach (two more forks), keep the listening sockets, the log
file and the pipe open, and take the pidfile; its signal map ignores only the
terminal job-control signals, so SIGTERM, SIGINT and SIGHUP reach the event
loop's own wake-up.  Once the daemon serves, it writes "ok" to the pipe and
the parent exits 0; if it cannot start (the control socket is live, the state
file is corrupt...), it writes the error, which the parent prints, exiting 1.
So `chatd --daemon` returns only when chatd serves, or with the reason it
does not.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import select
import signal
import socket
import sys
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import daemon  # type: ignore[import-untyped]

from chatd.server import reexec, systemd
from chatd.server.config import Config, ConfigError
from chatd.server.control import probe_control_socket
from chatd.server.errors import StartupError
from chatd.server.handover import HandoverError
from chatd.server.listeners import bind_all
from chatd.server.server import Server

DEFAULT_PIDFILE = "/run/chatd.pid"
READY_TIMEOUT = 60.0  # seconds the parent waits for the daemon to report


@dataclass(frozen=True)
class Identity:
    """The user and group a daemon started as root serves as, once it has bound."""

    user: str
    uid: int
    gid: int

    @classmethod
    def of(cls, user: str, group: str, allow_root: bool) -> Identity | None:
        """Who to become (None: stay); raises ValueError, the one-line reason."""
        if not user:
            if group:
                raise ValueError("--group needs --user (daemon.group needs daemon.user)")
            if os.geteuid() == 0 and not allow_root:
                raise ValueError(
                    "--daemon would serve as root: give --user USER (daemon.user), or "
                    "--allow-root to mean it"
                )
            return None
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ValueError(f"--user: no user {user!r}") from None
        gid = entry.pw_gid
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ValueError(f"--group: no group {group!r}") from None
        if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
            raise ValueError(f"--user {user}: only root can serve as another user")
        if entry.pw_uid == 0 and not allow_root:
            raise ValueError("--user root would serve as root: --allow-root to mean it")
        return cls(user, entry.pw_uid, gid)

    def become(self, cfg: Config) -> None:
        """Hand chatd's files to the user (so it can keep writing them), then drop root:
        the state and history files, the directories they are in where those are
        chatd's alone, the control socket, the log file; no links followed.  Raises
        StartupError for a directory shared with other files that the user could not
        write in: it is never handed over (a state file in /var/lib must not give
        /var/lib away)."""
        if os.geteuid() != 0:
            return
        history = cfg.history.file
        files = [cfg.state_file, cfg.control.socket, cfg.log.file]
        if history:
            files += [history + suffix for suffix in ("", "-wal", "-shm", "-journal")]
        owned = list(files)
        for key, path in (("state_file", cfg.state_file), ("history.file", history)):
            if path:
                directory = os.path.dirname(path) or "."
                if self._ours(directory, files):
                    owned.append(directory)
                elif not self._writable(directory):
                    raise StartupError(
                        f"{key}: {self.user} could not write in {directory}, which holds "
                        "other files too: give chatd a directory of its own"
                    )
        for path in owned:
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(
                        path,
                        self.uid,
                        -1 if path == cfg.control.socket else self.gid,
                        follow_symlinks=False,
                    )
        os.setgroups([self.gid])
        os.setgid(self.gid)
        os.setuid(self.uid)

    @staticmethod
    def _ours(directory: str, files: list[str]) -> bool:
        """Whether ``directory`` is chatd's alone (made now if missing): nothing in it
        but chatd's files and the state's temporary ones."""
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o750)
            return True
        mine = {os.path.basename(f) for f in files if f and os.path.dirname(f) == directory}
        return all(e in mine or e.startswith(".state-") for e in os.listdir(directory))

    def _writable(self, directory: str) -> bool:
        st = os.stat(directory)
        if st.st_uid == self.uid:
            return bool(st.st_mode & 0o200)
        if st.st_gid == self.gid:
            return bool(st.st_mode & 0o020)
        return bool(st.st_mode & 0o002)


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

    @classmethod
    def inherited(cls, fd: int) -> PidFile:
        """The pidfile a chatd that started this one holds locked on ``fd`` (the lock
        comes with the descriptor): ours now, our pid written in it."""
        pidfile = cls(os.readlink(f"/proc/self/fd/{fd}"))
        pidfile.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return pidfile

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
    allow_root: bool = False,
) -> int:
    """Detach and serve; the parent returns 0 once the child is on its way."""
    if not cfg.log.file:
        print(
            "chatd: error: --daemon needs log.file in the config (a daemon has no terminal)",
            file=sys.stderr,
        )
        return 2
    try:
        identity = Identity.of(cfg.daemon.user, cfg.daemon.group, allow_root)
    except ValueError as e:
        print(f"chatd: error: {e}", file=sys.stderr)
        reexec.cannot_start(str(e))
        return 2
    if reexec.started_by_predecessor():
        return _take_over(cfg, config_path, overrides)
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
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child:
        os.close(ready_w)
        for s in sockets:
            s.close()
        logfile.close()
        return _await_daemon(ready_r, child, cfg.log.file)
    os.close(ready_r)
    context = daemon.DaemonContext(
        detach_process=True,
        working_directory="/",
        umask=0o022,
        pidfile=pidfile,
        files_preserve=[*sockets, logfile, ready_w],
        stdout=logfile,
        stderr=logfile,
        signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
    )
    ready = _Report(ready_w)
    try:
        context.open()
    except PidFileError as e:
        # Lost a race for the pidfile after the check above.
        ready.error(str(e))
        return 1
    try:
        return _serve(cfg, config_path, sockets, overrides, ready, identity, pidfile.fd)
    finally:
        ready.error("chatd exited during start-up")  # no-op once "ok" was sent
        context.close()


class _Report:
    """The daemon's end of the readiness pipe: one line, then closed."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def _send(self, line: str) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.fd, line.encode()[:4000] + b"\n")
            os.close(self.fd)
            self.fd = None

    def ok(self) -> None:
        self._send("ok")

    def error(self, message: str) -> None:
        if self.fd is not None:
            print(f"chatd: error: {message}", file=sys.stderr)  # the log file
        self._send(f"error: {message}")


def _await_daemon(fd: int, child: int, logfile: str) -> int:
    """In the parent: wait for the daemon's "ok" or error; return the exit status."""
    with os.fdopen(fd, "rb") as pipe:
        # The child exits as soon as it has forked again: reap it.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, 0)
        line = _read_line(pipe, READY_TIMEOUT)
    if line == "ok":
        return 0
    if line.startswith("error: "):
        print(f"chatd: {line}", file=sys.stderr)
    elif line == "":
        print(f"chatd: error: the daemon exited during start-up (see {logfile})", file=sys.stderr)
    else:
        print(f"chatd: error: no word from the daemon within {READY_TIMEOUT:g} s", file=sys.stderr)
    return 1


def _read_line(pipe: Any, timeout: float) -> str:
    """The first line from the pipe ("" at EOF), or "?" after ``timeout`` seconds."""
    data = b""
    while b"\n" not in data:
        ready, _, _ = select.select([pipe], [], [], timeout)
        if not ready:
            return "?"
        chunk = os.read(pipe.fileno(), 4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def _serve(
    cfg: Config,
    config_path: str | None,
    sockets: list[socket.socket],
    overrides: dict[str, Any] | None,
    ready: _Report,
    identity: Identity | None,
    pidfile_fd: int | None,
) -> int:
    try:
        server = Server(cfg, config_path, systemd.Notifier.from_environ(), overrides=overrides)
    except ConfigError as e:
        ready.error(str(e))
        return 1
    try:

        def become() -> None:  # before the history file is opened: it must be that user's
            if identity is not None:
                identity.become(cfg)
                server.log.info(
                    "serving_as", user=identity.user, uid=identity.uid, gid=identity.gid
                )

        try:
            server.open(sockets, become=become)
        except (StartupError, OSError) as e:
            ready.error(str(e) if isinstance(e, StartupError) else f"cannot drop root: {e}")
            return 1
        ready.ok()
        server.daemon_argv = reexec.argv()  # SIGUSR2 starts the next chatd
        server.pidfile_fd = pidfile_fd
        return server.run()
    finally:
        server.close_all()
        server.notifier.close()


def _take_over(cfg: Config, config_path: str | None, overrides: dict[str, Any] | None) -> int:
    """A chatd --daemon started this one on SIGUSR2: once ready, take its sockets and
    state, tell it so, and serve; or tell it why not (it serves on) and exit 1."""
    link = reexec.Predecessor.from_environ()
    try:
        server = Server(cfg, config_path, systemd.Notifier.from_environ(), overrides=overrides)
    except ConfigError as e:
        link.report(f"error: {e}")
        return 1
    pidfile: PidFile | None = None
    try:
        try:
            inherited = link.take()
            if inherited.state is None:
                inherited.close()
                raise HandoverError(inherited.state_error)
            server.open(inherited=inherited)
        except (HandoverError, StartupError) as e:
            server.handed_over = True  # the sockets are the chatd before's: close them quietly
            link.report(f"error: {e}")
            return 1
        server.daemon_argv = reexec.argv()
        server.pidfile_fd = link.pidfile_fd
        if link.pidfile_fd is not None:
            pidfile = PidFile.inherited(link.pidfile_fd)
        link.report("ok")
        return server.run()
    finally:
        server.close_all()
        server.notifier.close()
        if pidfile is not None and not server.handed_over:
            pidfile.release()
