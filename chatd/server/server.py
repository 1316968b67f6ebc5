"""The daemon: listeners, connections and the control socket around one `Chat`.

Data flows one way: socket bytes -> decoder -> frames -> chat rules -> room ->
per-client queues -> sockets.  `Server` is the `Host` the chat calls back (time,
timers, closing a connection, saving bans) and the `Daemon` the admin commands work
on (reload, counters); it runs the loop's passes: I/O, then the fan-out and what it
settles (failed deliveries become drops only after the room was walked), timers, and
last the reaping of closed sockets.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import socket
import time
from collections.abc import Iterable
from typing import Any

from chatd import __version__
from chatd.core import chat as chat_rules
from chatd.core.admin import Later, ReloadFailed
from chatd.core.bans import Bans, StateError
from chatd.core.chat import Chat, Member
from chatd.server import config as configmod
from chatd.server import handover, log, state
from chatd.server.config import Config
from chatd.server.connection import Connection
from chatd.server.control import ControlServer
from chatd.server.errors import StartupError
from chatd.server.handover import Inherited
from chatd.server.history import HistoryError, Store, history_status, open_store
from chatd.server.listeners import bind_all, raise_nofile_limit, sock_address
from chatd.server.loop import READ, Loop
from chatd.server.metrics import Metrics
from chatd.server.outbox import CLOSING, Outbox
from chatd.server.reexec import Successor
from chatd.server.systemd import Notifier, monotonic_usec
from chatd.wire import notices

RECV_SIZE = 256 * 1024  # one read per ready socket per pass, at most this much
ACCEPT_BATCH = 128  # connections accepted per listener per pass
STATUS_INTERVAL = 1.0  # seconds between STATUS= updates to systemd, at most one each


class Server:
    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        notifier: Notifier | None = None,
        *,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides or {}  # settings from the command line, kept over reloads
        self.loop = Loop()
        self.loop.on_error = self._on_internal_error
        self.log: Any = log.get()
        self.conns: dict[int, Connection] = {}
        self.listeners: list[Listener] = []
        self.max_queue_bytes = config.max_queue_bytes
        self.rbuf = memoryview(bytearray(RECV_SIZE))
        self.doomed: list[Connection] = []  # closed this pass: reaped at its end
        # Deliveries that failed this pass, dropped once the fan-out is done:
        # (connection, reason, log fields).
        self.failed: list[tuple[Connection, str, dict[str, Any]]] = []
        self.stopping = False
        self.handed_over = False  # the next chatd has the sockets: close, tell nobody
        self.handover_armed = False  # the next SIGTERM is a restart (chatctl systemd-stop)
        self._stop_deadline = 0.0
        self._serials = itertools.count(1)  # connections' names in the fd store
        self.fdstore = 0  # descriptors the service manager keeps for us (0: none)
        self.daemon_argv: list[str] | None = None  # --daemon: how to start the next chatd
        self.pidfile_fd: int | None = None
        self.successor: Successor | None = None  # the next chatd while it starts
        self.notifier = notifier or Notifier(None)
        self._status_scheduled = False
        self._reload_error: str | None = None  # shown in STATUS= until a reload succeeds
        self._configure_logging()
        self.chat = Chat(config, self, hot=log.hot)
        self.chat.log_messages = self._log_messages
        self.control = ControlServer(self)
        self.metrics = Metrics(self)  # and its listener, metrics.listen
        self.store: Store | None = None  # the history file, when there is one

    # The Host of the chat.

    now = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    def call_at(self, when: float, fn: Any, arg: Any = None) -> None:
        self.loop.call_at(when, fn, arg)

    def close(self, member: Member, last: bytes | None) -> None:
        assert isinstance(member, Connection)
        if last is None:
            member.close_now()
        else:
            member.close_after(last)

    def members(self) -> Iterable[Member]:
        return self.conns.values()

    def save_bans(self, bans: Bans) -> None:
        state.save(self.config.state_file, bans)

    def users_changed(self) -> None:
        """Send STATUS= soon: at most once per STATUS_INTERVAL, however busy the room."""
        if self.notifier.sock is not None and not self._status_scheduled and not self.stopping:
            self._status_scheduled = True
            self.call_at(time.monotonic() + STATUS_INTERVAL, self._send_status)

    # The Daemon of the admin commands (reload is below).

    def arm_handover(self) -> None:
        """The service manager is restarting chatd: the next SIGTERM hands over."""
        if not self.fdstore:
            raise ReloadFailed(
                "no file descriptor store (FileDescriptorStoreMax= and FDSTORE=): "
                "a restart ends every connection"
            )
        self.handover_armed = True

    def counters(self) -> dict[str, int]:
        live = self.conns.values()
        stats = self.chat.stats
        return {
            "connections": len(self.conns),
            "bytes_in": stats.bytes_in + sum(c.bytes_in for c in live),
            "bytes_out": stats.bytes_out + sum(c.bytes_out for c in live),
        }

    def metrics_text(self) -> str:
        return self.metrics.text()

    def history_status(self) -> dict[str, Any]:
        return history_status(self.store, self.chat.history)

    def read_history(self, limit: int, since: float | None, user: str | None) -> Later:
        assert self.store is not None  # asked only when the history has a file
        return self.store.query(limit, since, user)

    def forget_history(self, name: str, up_to: int) -> Later:
        assert self.store is not None
        return self.store.forget(name, up_to)

    # Start-up.

    def open(
        self,
        sockets: list[socket.socket] | None = None,
        *,
        signals: bool = True,
        inherited: Inherited | None = None,
        become: Any = None,
    ) -> None:
        """Load the bans; bind the control socket and the listeners (or adopt
        ``sockets``, or what the chatd before this one handed over: ``inherited``);
        call ``become()`` if given (chatd --daemon drops root there); open the history.

        Then install the signal wake-up (not for a server run by a test).
        """
        nofile = raise_nofile_limit()
        try:
            self.chat.moderation.load_bans(state.load(self.config.state_file))
        except StateError as e:
            raise StartupError(str(e)) from None
        self.control.open(inherited.control if inherited else None)
        if inherited is not None and inherited.listeners:
            socks = inherited.listeners
        else:
            socks = sockets if sockets is not None else bind_all(self.config.listen)
        self.listeners = [Listener(self, s) for s in socks]
        self.metrics.open(inherited.metrics if inherited else None)
        if self.fdstore:
            handover.store_listening(self)
        if become is not None:
            become()
        try:
            self.store = open_store(self.config.history, self.loop, self.chat.history)
        except HistoryError as e:
            raise StartupError(str(e)) from None
        began = time.monotonic()
        adopted = handover.adopt(self, inherited) if inherited is not None else 0
        adopt_ms = round((time.monotonic() - began) * 1000, 1)
        if signals:
            signums = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
            self.loop.install_signals(signums, self._on_signal)
        self.chat.start_idle_sweep()
        if inherited is not None:
            if inherited.state_error:
                self.log.error("handover_refused", error=inherited.state_error)
            self.log.info(
                "handover_taken", connections=adopted, users=len(self.chat.room), ms=adopt_ms
            )
            if len(self.chat.room):
                self.chat.say(notices.RESTARTED(version=__version__))
        self.log.info(
            "startup",
            version=__version__,
            pid=os.getpid(),
            config=self.config_path,
            listen=[sock_address(lst.sock) for lst in self.listeners],
            control=self.control.path or None,
            metrics=self.metrics.address,
            bans=len(self.chat.bans),
            history=self.config.history.file or None,
            history_messages=self.store.count if self.store else None,
            max_clients=self.config.max_clients,
            nofile=nofile,
        )
        self.notifier.ready(self.status_line(), self.log, self.call_at)

    def close_all(self) -> None:
        """Release everything (after run(), or if it never ran).  After a handover the
        sockets are only closed here: the next chatd has them, the files stay."""
        log.defer(False)
        for conn in list(self.conns.values()):
            conn.close_now()
        self.reap()
        for lst in self.listeners:
            lst.close()
        self.listeners = []
        self.metrics.close()
        self.control.close(keep_file=self.handed_over)
        self.close_history()
        self.loop.close()

    def close_history(self) -> None:
        """Write what the history's writer has queued, and stop it."""
        if self.store is not None:
            self.chat.history.sink = None
            self.store.close()
            self.store = None

    # The loop.

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; return the exit status."""
        log.defer(True)  # each pass's lines are written in one piece, before select()
        while not self.done:
            self.step()
        log.defer(False)
        self._log_shutdown()
        return 0

    @property
    def done(self) -> bool:
        """Handed over, or stopped and every connection closed or the grace time over."""
        if self.handed_over:
            return True
        return self.stopping and (not self.conns or time.monotonic() >= self._stop_deadline)

    def step(self) -> None:
        """One pass of the loop."""
        self.loop.guard("log", log.flush)
        due = 0.0 if self.doomed or self.failed else self.chat.next_flush()
        self.loop.run_pass(due, (self._fan_out, self.settle), (self.reap,))

    def _fan_out(self) -> None:
        self.chat.flush()
        if self.store is not None:
            self.store.nudge()  # what this pass said, to the history's writer

    def settle(self) -> None:
        """Drop the members whose delivery failed this pass, now that nobody walks the room."""
        room = self.chat.room
        while room.failures or self.failed:
            failures, room.failures = room.failures, []
            for member, error in failures:
                self.loop.internal_error("fan-out", member, error)
            failed, self.failed = self.failed, []
            for conn, reason, fields in failed:
                if reason == "slow consumer":
                    self.chat.slow_consumer(conn, fields["queued"])
                else:
                    self.chat.drop(conn, reason, **fields)

    def _on_internal_error(self, data: Any) -> None:
        if isinstance(data, Connection):
            self.chat.drop(data, "internal error")
            data.close_now()
        elif isinstance(data, Outbox):  # an admin's or a scraper's connection
            data.close_now()

    def reap(self) -> None:
        doomed, self.doomed = self.doomed, []
        stats = self.chat.stats
        for conn in doomed:
            if self.conns.get(conn.fd) is conn:
                del self.conns[conn.fd]
                stats.bytes_in += conn.bytes_in
                stats.bytes_out += conn.bytes_out
                self.loop.unregister(conn.sock)
                conn.sock.close()
                if not self.handed_over:
                    self.unstore(conn.serial)

    # Accepting.

    def accept(self, sock: socket.socket, peer: Any) -> None:
        conn = self.adopt(sock, peer, next(self._serials))
        conn.update_interest()
        if self.fdstore:  # so that a restart keeps it: removed again when it closes
            self.notifier.store([conn.fd], f"c{conn.serial}")
        self.chat.admit(conn)

    def adopt(self, sock: socket.socket, peer: Any, serial: int) -> Connection:
        """A connection of ours from now on (the chat does not know it yet)."""
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(self, sock, peer, serial)
        self.conns[conn.fd] = conn
        if serial >= next(self._serials) - 1:  # serials go on from the largest handed over
            self._serials = itertools.count(serial + 1)
        return conn

    def unstore(self, serial: int) -> None:
        if self.fdstore:
            self.notifier.unstore(f"c{serial}")

    # Signals, shutdown and reload.

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            with contextlib.suppress(ReloadFailed):  # logged
                self.reload()
        elif signum == signal.SIGUSR2:
            Successor.start(self)
        elif signum == signal.SIGTERM and self.handover_armed:
            handover.to_systemd(self)
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.stop(signal.Signals(signum).name)

    def stop(self, why: str) -> None:
        """Stop accepting, tell everyone, and finish within the grace time."""
        if self.stopping:
            return
        self.stopping = True
        self._stop_deadline = time.monotonic() + self.config.shutdown_grace
        # Wake the loop at the deadline even if no other timer is due by then.
        self.call_at(self._stop_deadline, _ignore_timer)
        self.notifier.notify("STOPPING=1", "STATUS=shutting down")
        self.log.info(
            "shutdown_begin", signal=why, users=len(self.chat.room), connections=len(self.conns)
        )
        for lst in self.listeners:
            lst.close()
        self.listeners = []
        self.metrics.close()
        for conn in list(self.conns.values()):
            if conn.link is CLOSING:  # refused or left earlier: no more lingering
                conn.close_now()
        self.chat.stop()

    def _log_shutdown(self) -> None:
        stats = self.chat.stats
        self.log.info(
            "shutdown",
            uptime=round(time.time() - stats.started, 3),
            connections=stats.connections,
            messages=stats.messages,
            peak_users=stats.peak_users,
            unflushed=sum(1 for c in self.conns.values() if c.queued),
        )

    def reload(self) -> tuple[list[str], list[str]]:
        """Re-read the config file; return (keys applied, keys needing a restart).

        An invalid file raises ReloadFailed (logged) and changes nothing.  systemd is
        told RELOADING=1 before and READY=1 after, whatever the outcome; a failure
        stays in STATUS= until a reload succeeds.
        """
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")
        try:
            applied, restart = self._reload()
        except configmod.ConfigError as e:
            self._reload_error = str(e)
            self.log.error("reload_failed", error=str(e))
            raise ReloadFailed(str(e)) from None
        else:
            self._reload_error = None
        finally:
            self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
        return applied, restart

    def _reload(self) -> tuple[list[str], list[str]]:
        path = self.config_path
        new = configmod.load(path) if path else configmod.defaults()
        new = configmod.override(new, self.overrides, "command line")
        applied, restart = self.config.diff(new)
        merged = self.config.merged_for_reload(new)
        configmod.check(merged, path or "<defaults>")
        self.apply(merged)
        self.log.info("reload", applied=applied, needs_restart=restart)
        return applied, restart

    def apply(self, cfg: Config) -> None:
        """Switch to ``cfg``; only settings a reload may change differ from the current.

        A log file is reopened even when unchanged (logrotate moves it, then
        reloads); when it cannot be, ConfigError is raised before anything changed.
        """
        if cfg.log != self.config.log or cfg.log.file:
            self._configure_logging(cfg)
            self.log = log.get()
        self.config = cfg
        self.max_queue_bytes = cfg.max_queue_bytes
        self.control.resolve_group(cfg)
        self.chat.log_messages = self._log_messages
        self.chat.reconfigure(cfg)
        if self.store is not None:
            self.store.configure(cfg.history.keep_messages, cfg.history.keep_days)
        for conn in self.conns.values():
            if conn.state is chat_rules.JOINED:
                conn.decoder.max_payload = cfg.max_message_bytes
            elif conn.state is chat_rules.HANDSHAKE:
                conn.decoder.max_payload = cfg.max_name_bytes

    def _configure_logging(self, cfg: Config | None = None) -> None:
        settings = (cfg or self.config).log
        log.configure(settings, source=self.config_path or "<defaults>")
        self._log_messages = log.LEVELS[settings.level] <= log.LEVELS["info"]

    # systemd.

    def status_line(self) -> str:
        """One line for STATUS=: users online, connections, a failed reload."""
        users = len(self.chat.room)
        line = (
            f"{users} user{'' if users == 1 else 's'} online, "
            f"{len(self.conns)} connection{'' if len(self.conns) == 1 else 's'}"
        )
        if self._reload_error:
            line += f"; reload failed, old config kept: {self._reload_error}"
        return line

    def _send_status(self, _: Any = None) -> None:
        self._status_scheduled = False
        if not self.stopping:
            self.notifier.notify(f"STATUS={self.status_line()}")


class Listener:
    """A listening socket: accepts up to ACCEPT_BATCH connections per pass."""

    __slots__ = ("server", "sock")

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        sock.setblocking(False)
        server.loop.register(sock, READ, self)

    def ready(self, mask: int) -> None:
        server = self.server
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment rather than spin.
                    server.log.warning(
                        "accept_paused", error=e.strerror, connections=len(server.conns)
                    )
                    server.loop.unregister(self.sock)
                    server.call_at(time.monotonic() + 0.1, self._resume)
                return
            server.accept(sock, peer)

    def _resume(self, _: Any) -> None:
        if self in self.server.listeners:
            self.server.loop.register(self.sock, READ, self)

    def close(self) -> None:
        self.server.loop.unregister(self.sock)
        self.sock.close()


def _ignore_timer(arg: Any) -> None:
    pass
