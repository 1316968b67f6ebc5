"""The event loop: one thread, one selector, no blocking calls.

Data flows one way: socket bytes -> decoder -> frames -> room -> per-client
queues -> sockets.  Each pass of the loop reads what is readable (one recv
per ready socket, so nobody starves the others), lets the room hand out what
was posted in one piece per member, runs due timers and only then closes the
connections that were dropped, so nothing is closed under the feet of code
iterating over the members.  Signals reach the loop as bytes on a socketpair
(``signal.set_wakeup_fd``); their handlers do nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import ipaddress
import itertools
import os
import resource
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatd import __version__, commands, log
from chatd import config as configmod
from chatd.admin import ControlServer
from chatd.bans import Ban, Bans, StateError
from chatd.config import Address, Config
from chatd.connection import CLOSED, CLOSING, HANDSHAKE, JOINED, Connection
from chatd.protocol import FrameTooLarge, ProtocolError
from chatd.room import NOTICE_SENDER, Room, name_problem, text_problem
from chatd.systemd import Notifier, monotonic_usec, watchdog_usec

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE

RECV_SIZE = 256 * 1024  # one read per ready socket per pass, at most this much
ACCEPT_BATCH = 128  # connections accepted per listener per pass
LINGER = 2.0  # seconds a closing connection gets to take its last notice
BACKLOG = 4096
NOTICE_INTERVAL = 0.025  # seconds: notices alone are broadcast at most this often
STATUS_INTERVAL = 1.0  # seconds between STATUS= updates to systemd, at most one each
BAN_TIMER_MAX = 86400.0  # seconds a ban's expiry timer waits at most (select() takes < 24.8 days)


class StartupError(Exception):
    """The daemon cannot start; str() is the one-line reason."""


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    connections: int = 0
    peak_users: int = 0
    messages: int = 0
    deliveries: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    evictions: int = 0
    flood_dropped: int = 0
    kicks: int = 0
    bytes_in: int = 0  # of closed connections; live ones keep their own counts
    bytes_out: int = 0

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


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
        self.sel = selectors.DefaultSelector()
        self.room = Room(config.header_length)
        self.conns: dict[int, Connection] = {}
        self.listeners: list[socket.socket] = []
        self.stats = Stats()
        self.log = log.get()
        self.max_queue_bytes = config.max_queue_bytes
        self._log_messages = True
        self._rbuf = memoryview(bytearray(RECV_SIZE))
        self._timers: list[tuple[float, int, Callable[..., None], Any]] = []
        self._timer_seq = itertools.count()
        self._doomed: list[Connection] = []
        self._lingering = 0  # connections in CLOSING: they hold a descriptor, not a place
        self._signals: list[int] = []
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._stopping = False
        self._stop_deadline = 0.0
        self._notices_due = 0.0  # notices alone wait until then (see _flush_room)
        self._holding = False  # notices are queued, waiting for _notices_due
        self.notifier = notifier or Notifier(None)
        self._status_scheduled = False
        self._reload_error: str | None = None  # shown in STATUS= until a reload succeeds
        self._per_address: dict[str, int] = {}  # peer address -> connections holding a place
        self._idle_sweep_id = 0  # the current idle sweep; older ones stop
        self.flood_rate = config.flood.rate
        self.flood_burst = float(config.flood.burst)
        self._configure_logging()
        self.bans = Bans()
        self.control = ControlServer(self)

    # Start-up.

    def open(self, sockets: list[socket.socket] | None = None) -> None:
        """Load the bans; bind the control socket and the listeners (or adopt ``sockets``).

        Then install the signal wake-up.
        """
        nofile = raise_nofile_limit()
        try:
            self.bans = Bans.load(self.config.state_file)
        except StateError as e:
            raise StartupError(str(e)) from None
        for ban in self.bans.active(time.time()):
            self.expire_ban_at(ban)
        self.control.open()
        self.listeners = sockets if sockets is not None else bind_all(self.config.listen)
        for lsock in self.listeners:
            lsock.setblocking(False)
            self.sel.register(lsock, READ, self._acceptor(lsock))
        self._install_signals()
        self._start_idle_sweep()
        self.log.info(
            "startup",
            version=__version__,
            pid=os.getpid(),
            config=self.config_path,
            listen=[sock_address(s) for s in self.listeners],
            control=self.control.path or None,
            bans=len(self.bans),
            max_clients=self.config.max_clients,
            nofile=nofile,
        )
        self._systemd_ready()

    def _systemd_ready(self) -> None:
        notifier = self.notifier
        if notifier.error:
            self.log.warning("sd_notify_unavailable", error=notifier.error)
        if not notifier.enabled:
            return
        notifier.notify("READY=1", f"STATUS={self.status_line()}", f"MAINPID={os.getpid()}")
        interval = watchdog_usec() / 2e6
        if interval > 0:
            self.log.info("watchdog", ping_seconds=interval)
            self.call_at(time.monotonic() + interval, self._watchdog, interval)

    def _install_signals(self) -> None:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._wakeup = (r, w)
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            # The C-level handler writes the signal number to the wake-up fd;
            # the Python-level one has nothing to do.
            signal.signal(sig, _ignore_signal)
        self.sel.register(r, READ, self._on_wakeup)

    def close(self) -> None:
        """Release everything (after run(), or if it never ran)."""
        log.defer(False)
        for conn in list(self.conns.values()):
            conn.state = CLOSED
            self._doomed.append(conn)
        self._reap()
        for lsock in self.listeners:
            self._unlisten(lsock)
        self.listeners = []
        self.control.close()
        if self._wakeup:
            signal.set_wakeup_fd(-1)
            for s in self._wakeup:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(s)
                s.close()
            self._wakeup = None
        self.sel.close()

    # The loop.

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; return the exit status."""
        select = self.sel.select
        log.defer(True)  # each pass's lines are written in one piece, before select()
        while True:
            log.flush()
            events = select(self._timeout())
            for key, mask in events:
                data = key.data
                try:
                    if data.__class__ is Connection:
                        if mask & READ:
                            self._on_readable(data)
                        if mask & WRITE and data.state is not CLOSED:
                            data.flush()
                            if data.state is CLOSING and not data.out:
                                self._half_close(data)
                    else:
                        data()
                except Exception:
                    self._internal_error(data)
            self._flush_room()
            if self._timers:
                self._run_timers()
            if self._doomed:
                self._reap()
            if self._stopping and (not self.conns or time.monotonic() >= self._stop_deadline):
                break
        log.defer(False)
        self._log_shutdown()
        return 0

    def _timeout(self) -> float | None:
        if (self.room.pending and not self._holding) or self._doomed:
            return 0
        due = self._notices_due if self._holding else None
        if self._timers and (due is None or self._timers[0][0] < due):
            due = self._timers[0][0]
        return None if due is None else max(0.0, due - time.monotonic())

    def _flush_room(self) -> None:
        """Hand out what this pass posted; hold back notices that come too often.

        Join and leave notices go out at once, unless the last broadcast was
        less than NOTICE_INTERVAL ago: then they wait for it (a join storm
        costs one send per member per interval, not per pass) while each
        newcomer's welcome goes at once.  Members' messages never wait.
        """
        room = self.room
        if not room.pending:
            return
        if room.notices_only and not self._stopping and time.monotonic() < self._notices_due:
            room.flush_direct()
            self._holding = room.pending
            return
        room.flush()
        self._holding = False
        self._notices_due = time.monotonic() + NOTICE_INTERVAL

    def _internal_error(self, data: Any) -> None:
        # A bug must cost one connection, never the daemon.
        self.log.exception("internal_error", connection=repr(data))
        if isinstance(data, Connection):
            self.drop(data, "internal error")

    # Timers.

    def call_at(self, when: float, fn: Callable[..., None], arg: Any = None) -> None:
        heapq.heappush(self._timers, (when, next(self._timer_seq), fn, arg))

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, fn, arg = heapq.heappop(timers)
            try:
                fn(arg)
            except Exception:
                self._internal_error(arg)

    # Accepting.

    def _acceptor(self, lsock: socket.socket) -> Callable[[], None]:
        return lambda: self._accept(lsock)

    def _accept(self, lsock: socket.socket) -> None:
        cfg = self.config
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = lsock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment rather than spin.
                    self.log.warning("accept_paused", error=e.strerror, connections=len(self.conns))
                    self.sel.unregister(lsock)
                    self.call_at(time.monotonic() + 0.1, self._resume_accept, lsock)
                return
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(self, sock, peer)
            self.conns[conn.fd] = conn
            self.sel.register(sock, READ, conn)
            self.stats.connections += 1
            host = conn.peer_host
            same_host = self._per_address[host] = self._per_address.get(host, 0) + 1
            if len(self.conns) - self._lingering > cfg.max_clients:
                self.reject(conn, "server full", "the server is full, try again later")
                continue
            if self.bans.has_address_bans:
                ban = self.bans.match_address(host, time.time())
                if ban is not None:
                    self.reject(conn, "banned", address_ban_notice(ban), ban=ban.target)
                    continue
            if cfg.max_per_address and same_host > cfg.max_per_address:
                self.reject(
                    conn,
                    "too many from address",
                    f"too many connections from {host}, try again later",
                )
                continue
            conn.limited = self._flood_limited(host)
            self.call_at(time.monotonic() + cfg.handshake_timeout, self._handshake_expired, conn)

    def _resume_accept(self, lsock: socket.socket) -> None:
        if lsock in self.listeners:
            self.sel.register(lsock, READ, self._acceptor(lsock))

    # Reading.

    def _on_readable(self, conn: Connection) -> None:
        if conn.state is CLOSED:
            return
        if conn.state is CLOSING:
            self._drain(conn)
            return
        try:
            n = conn.read(self._rbuf)
        except OSError as e:
            self.drop(conn, "closed", error=e.strerror)
            return
        if n <= 0:
            if n == 0:
                self.drop(conn, "quit" if conn.decoder.idle else "closed")
            return
        conn.last_active = time.monotonic()
        next_frame = conn.decoder.next_frame
        try:
            while conn.state is HANDSHAKE:
                name = next_frame()
                if name is None:
                    return
                self._on_name(conn, name)
            while conn.state is JOINED:
                text = next_frame()
                if text is None:
                    return
                self._on_message(conn, text)
        except ProtocolError as e:
            self._protocol_error(conn, e)

    def _drain(self, conn: Connection) -> None:
        """Read and discard from a closing connection; close at its end of stream."""
        try:
            n = conn.sock.recv_into(self._rbuf)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0:
            self._close_now(conn)

    def _protocol_error(self, conn: Connection, error: ProtocolError) -> None:
        if conn.state is HANDSHAKE:
            if isinstance(error, FrameTooLarge):
                what = f"the name is too long (at most {self.config.max_name_bytes} bytes)"
            else:
                what = str(error)
            self.reject(conn, "bad name", f"name rejected: {what}")
        else:
            self.drop(conn, "protocol error", notice=f"protocol error: {error}", error=str(error))

    # Handshake.

    def _on_name(self, conn: Connection, name: str) -> None:
        cfg = self.config
        problem = name_problem(name, cfg.max_name_bytes)
        if problem:
            self.reject(conn, "bad name", f"name rejected: {problem}", name=name)
            return
        if self.bans:
            ban = self.bans.match_name(name, time.time())
            if ban is not None:
                notice = f"name rejected: {name!r} is banned{ban.describe()}"
                self.reject(conn, "banned", notice, name=name)
                return
        if self.room.name_taken(name):
            self.reject(conn, "name taken", f"name rejected: {name!r} is already taken", name=name)
            return
        conn.name = name
        conn.state = JOINED
        conn.decoder.max_payload = cfg.max_message_bytes
        conn.log = conn.log.bind(user=name)
        room = self.room
        room.join(conn)
        self.stats.peak_users = max(self.stats.peak_users, len(room))
        self.users_changed()
        log.hot(conn.log, "join")
        welcome = f"welcome, {name}; "
        limit = commands.list_bytes(cfg.header_length, len(welcome.encode()) + len("online: "))
        room.send_to(conn, NOTICE_SENDER, welcome + online_line(room, conn, limit))
        room.notice(f"{name} joined", exclude=conn)

    def _handshake_expired(self, conn: Connection) -> None:
        if conn.state is HANDSHAKE:
            # A reload may have raised the timeout since this timer was set.
            due = conn.accepted + self.config.handshake_timeout
            if due > time.monotonic():
                self.call_at(due, self._handshake_expired, conn)
                return
            self.reject(
                conn,
                "handshake timeout",
                f"timed out: no name within {self.config.handshake_timeout:g} seconds",
            )

    # Messages.

    def _on_message(self, conn: Connection, text: str) -> None:
        if conn.limited:
            # Token bucket: add what accrued since the last message (last_active is
            # the time of this read), then take one token or drop the message.
            now = conn.last_active
            tokens = conn.tokens + (now - conn.refilled) * self.flood_rate
            conn.refilled = now
            if tokens >= self.flood_burst:
                tokens = self.flood_burst
                if conn.dropped:
                    self._flood_over(conn)
            elif tokens < 1.0:
                conn.tokens = tokens
                self._flooding(conn)
                return
            conn.tokens = tokens - 1.0
        if not text:
            return
        problem = text_problem(text)
        if problem:
            conn.log.info("message_refused", reason=problem)
            self.room.send_to(conn, NOTICE_SENDER, f"message not sent: {problem}")
            return
        if text[0] == "/":
            commands.run(self, conn, text)
            return
        self.room.post(conn, text)
        self.message_accepted(conn, text)

    def message_accepted(self, conn: Connection, text: str, **fields: Any) -> None:
        """Count and log a message that was relayed (``fields``: kind, to)."""
        conn.messages += 1
        self.stats.messages += 1
        if self._log_messages:
            if self.config.log.messages:
                log.hot(conn.log, "message", bytes=len(text.encode()), text=text, **fields)
            else:
                log.hot(conn.log, "message", bytes=len(text.encode()), **fields)

    # Flood control.

    def _flood_limited(self, host: str) -> bool:
        """Whether flood control applies to connections from ``host``."""
        return self.flood_rate > 0 and not is_exempt(host, self.config.flood.exempt)

    def _flooding(self, conn: Connection) -> None:
        """``conn`` sent a message with no token left: drop it, with a logged reason."""
        conn.dropped += 1
        self.stats.flood_dropped += 1
        flood = self.config.flood
        if flood.max_dropped and conn.dropped >= flood.max_dropped:
            self.drop(
                conn,
                "flooding",
                notice=f"disconnected for flooding: {conn.dropped} messages over the limit",
            )
            return
        if conn.warned_at != conn.messages:
            # Told once per run of dropped messages, so a flood cannot make the
            # daemon write as much as it reads.
            conn.warned_at = conn.messages
            conn.log.warning("flood", dropped=conn.dropped, rate=flood.rate, burst=flood.burst)
            self.room.send_to(
                conn,
                NOTICE_SENDER,
                f"slow down: your messages are not being sent "
                f"(the limit is {flood.rate:g} a second, {flood.burst} at once)",
            )

    def _flood_over(self, conn: Connection) -> None:
        """The bucket filled up again: the flood is over."""
        conn.log.info("flood_end", dropped=conn.dropped)
        conn.dropped = 0
        conn.warned_at = -1

    # Idle timeout.

    def _start_idle_sweep(self) -> None:
        """(Re)start the periodic sweep for idle users; stops any earlier one."""
        self._idle_sweep_id += 1
        if self.config.idle_timeout:
            self._next_idle_sweep(self._idle_sweep_id)

    def _next_idle_sweep(self, sweep_id: int) -> None:
        # One timer for everyone, every tenth of the timeout (at most 30 s): a
        # user is disconnected between 1 and 1.1 timeouts after its last word.
        every = min(max(self.config.idle_timeout / 10, 0.05), 30.0)
        self.call_at(time.monotonic() + every, self._idle_sweep, sweep_id)

    def _idle_sweep(self, sweep_id: int) -> None:
        if sweep_id != self._idle_sweep_id:
            return
        timeout = self.config.idle_timeout
        now = time.monotonic()
        for conn in list(self.conns.values()):
            if conn.state is JOINED and now - conn.last_active > timeout:
                self.drop(
                    conn,
                    "idle",
                    notice=f"disconnected: nothing sent for {timeout:g} seconds",
                )
        self._next_idle_sweep(sweep_id)

    # Leaving.

    def reject(self, conn: Connection, reason: str, notice: str, **fields: Any) -> None:
        """Refuse a connection before it joined: tell it why, then close."""
        self.stats.reject(reason)
        conn.log.info("rejected", reason=reason, **fields)
        self._close_with_notice(conn, notice)

    def slow_consumer(self, conn: Connection) -> None:
        self.stats.evictions += 1
        self.drop(conn, "slow consumer", queued=conn.out_bytes)

    def drop(
        self,
        conn: Connection,
        reason: str,
        *,
        notice: str | None = None,
        announce: str | None = None,
        **fields: Any,
    ) -> None:
        """Take ``conn`` out of the room for ``reason``, log it, and close it.

        With ``notice``, the connection is told why and closed once that is sent.
        The room is told "NAME left (REASON)", or ``announce`` instead.
        """
        if conn.state is CLOSED:
            return
        if conn.state is CLOSING:
            self._close_now(conn)
            return
        if conn.state is JOINED:
            self.room.leave(conn)
            self.users_changed()
            if conn.dropped:
                fields["flood_dropped"] = conn.dropped
            level = "warning" if reason in ("slow consumer", "internal error") else "info"
            getattr(conn.log, level)("leave", reason=reason, **fields)
            if not self._stopping:
                self.room.notice(announce or f"{conn.name} left ({reason})")
        else:
            conn.log.debug("disconnect", reason=reason, **fields)
        if notice is None:
            self._close_now(conn)
        else:
            self._close_with_notice(conn, notice)

    def _close_with_notice(self, conn: Connection, notice: str) -> None:
        self._release(conn)
        conn.state = CLOSING  # from now on, what it sends is read and discarded
        self._lingering += 1
        conn.deliver(self.room.frame(NOTICE_SENDER, notice))
        if conn.state is CLOSING:
            self.call_at(time.monotonic() + LINGER, self._linger_expired, conn)
            if not conn.out:
                self._half_close(conn)

    def _half_close(self, conn: Connection) -> None:
        # Send FIN after the notice, then read until the peer closes: closing
        # with unread input would send RST and could destroy the notice.
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_now(conn)

    def _linger_expired(self, conn: Connection) -> None:
        if conn.state is CLOSING:
            self._close_now(conn)

    def _close_now(self, conn: Connection) -> None:
        if conn.state is CLOSING:
            self._lingering -= 1
        elif conn.state is not CLOSED:
            self._release(conn)
        if conn.state is not CLOSED:
            conn.state = CLOSED
            conn.out.clear()
            conn.out_bytes = 0
            self._doomed.append(conn)

    def _release(self, conn: Connection) -> None:
        """``conn`` no longer holds a place: count it off its address."""
        host = conn.peer_host
        left = self._per_address[host] - 1
        if left:
            self._per_address[host] = left
        else:
            del self._per_address[host]

    def _reap(self) -> None:
        doomed, self._doomed = self._doomed, []
        for conn in doomed:
            if self.conns.get(conn.fd) is conn:
                del self.conns[conn.fd]
                self.stats.bytes_in += conn.bytes_in
                self.stats.bytes_out += conn.bytes_out
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(conn.sock)
                conn.sock.close()

    def update_interest(self, conn: Connection) -> None:
        if conn.state is not CLOSED:
            self.sel.modify(conn.sock, READ | WRITE if conn.writing else READ, conn)

    # Signals, shutdown and reload.

    def _on_wakeup(self) -> None:
        assert self._wakeup is not None
        try:
            data = self._wakeup[0].recv(512)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGHUP:
                self.reload_from_signal()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stop(signal.Signals(signum).name)

    def stop(self, why: str) -> None:
        """Stop accepting, tell everyone, and finish within the grace time."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_deadline = time.monotonic() + self.config.shutdown_grace
        # Wake the loop at the deadline even if no other timer is due by then.
        self.call_at(self._stop_deadline, _ignore_timer)
        self.notifier.notify("STOPPING=1", "STATUS=shutting down")
        self.log.info(
            "shutdown_begin", signal=why, users=len(self.room), connections=len(self.conns)
        )
        for lsock in self.listeners:
            self._unlisten(lsock)
        self.listeners = []
        # What this pass accepted goes out before the notice: once everyone has
        # left the room, nobody would be there to receive it.
        self._flush_room()
        for conn in list(self.conns.values()):
            self.drop(conn, "shutdown", notice="the server is shutting down")

    def _unlisten(self, lsock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(lsock)
        lsock.close()

    def _log_shutdown(self) -> None:
        unflushed = sum(1 for c in self.conns.values() if c.out)
        self.log.info(
            "shutdown",
            uptime=round(time.time() - self.stats.started, 3),
            connections=self.stats.connections,
            messages=self.stats.messages,
            peak_users=self.stats.peak_users,
            unflushed=unflushed,
        )

    def reload_from_signal(self) -> None:
        try:
            self.reload()
        except configmod.ConfigError as e:
            self.log.error("reload_failed", error=str(e))

    def reload(self) -> tuple[list[str], list[str]]:
        """Re-read the config file; return (keys applied, keys needing a restart).

        An invalid file raises ConfigError and changes nothing.  systemd is
        told RELOADING=1 before and READY=1 after, whatever the outcome; a
        failure stays in STATUS= until a reload succeeds.
        """
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")
        try:
            applied, restart = self._reload()
        except configmod.ConfigError as e:
            self._reload_error = str(e)
            raise
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
        log_changed = cfg.log != self.config.log or bool(cfg.log.file)
        idle_changed = cfg.idle_timeout != self.config.idle_timeout
        handshake_shorter = cfg.handshake_timeout < self.config.handshake_timeout
        if log_changed:
            self._configure_logging(cfg)
            self.log = log.get()
        self.config = cfg
        self.max_queue_bytes = cfg.max_queue_bytes
        self.flood_rate = cfg.flood.rate
        self.flood_burst = float(cfg.flood.burst)
        self.control.resolve_group(cfg)
        if idle_changed:
            self._start_idle_sweep()
        for conn in self.conns.values():
            conn.limited = self._flood_limited(conn.peer_host)
            if conn.state is JOINED:
                conn.decoder.max_payload = cfg.max_message_bytes
            elif conn.state is HANDSHAKE:
                conn.decoder.max_payload = cfg.max_name_bytes
                if handshake_shorter:  # its timer is set for the old, later time
                    self.call_at(
                        conn.accepted + cfg.handshake_timeout, self._handshake_expired, conn
                    )
            if log_changed:
                conn.rebind_log()

    # Bans.

    def save_bans(self) -> None:
        """Write the bans to the state file; raises StateError."""
        self._prune_bans()
        self.bans.save(self.config.state_file)

    def _prune_bans(self) -> bool:
        gone = self.bans.prune(time.time())
        for ban in gone:
            self.log.info("ban_expired", kind=ban.kind, target=ban.target)
        return bool(gone)

    def expire_ban_at(self, ban: Ban) -> None:
        """Lift ``ban`` from the state file and the log when it expires.

        The timer waits a day at most, then is set again: select() cannot wait
        more than about 24.8 days (2**31 ms), and a ban may last 100 years.
        """
        if ban.expires is not None:
            wait = min(ban.expires - time.time() + 0.01, BAN_TIMER_MAX)
            self.call_at(time.monotonic() + wait, self._expire_bans, ban)

    def _expire_bans(self, ban: Ban) -> None:
        if not ban.expired(time.time()):
            self.expire_ban_at(ban)  # a long ban, a day nearer its end
            return
        if self._prune_bans():
            try:
                self.bans.save(self.config.state_file)
            except StateError as e:
                self.log.error("state_not_saved", error=str(e))

    def enforce_ban(self, ban: Ban) -> list[str]:
        """Disconnect whoever ``ban`` covers; return the names of the users among them."""
        now = time.time()
        gone = []
        for conn in list(self.conns.values()):
            if conn.state is JOINED:
                if ban.kind == "name":
                    hit = conn.name.casefold() == ban.target.casefold()
                else:
                    hit = self.bans.match_address(conn.peer_host, now) is ban
                if hit:
                    gone.append(conn.name)
                    reason = f" ({ban.reason})" if ban.reason else ""
                    self.drop(
                        conn,
                        "banned",
                        notice=f"you were banned by an admin{ban.describe()}",
                        announce=f"{conn.name} was banned{reason}",
                    )
            elif (
                conn.state is HANDSHAKE
                and ban.kind == "address"
                and self.bans.match_address(conn.peer_host, now) is ban
            ):
                self.reject(conn, "banned", address_ban_notice(ban))
        return gone

    # systemd.

    def status_line(self) -> str:
        """One line for STATUS=: users online, connections, a failed reload."""
        users = len(self.room)
        line = (
            f"{users} user{'' if users == 1 else 's'} online, "
            f"{len(self.conns)} connection{'' if len(self.conns) == 1 else 's'}"
        )
        if self._reload_error:
            line += f"; reload failed, old config kept: {self._reload_error}"
        return line

    def users_changed(self) -> None:
        """Send STATUS= soon: at most once per STATUS_INTERVAL, however busy the room."""
        if self.notifier.sock is not None and not self._status_scheduled and not self._stopping:
            self._status_scheduled = True
            self.call_at(time.monotonic() + STATUS_INTERVAL, self._send_status)

    def _send_status(self, _: Any = None) -> None:
        self._status_scheduled = False
        if not self._stopping:
            self.notifier.notify(f"STATUS={self.status_line()}")

    def _watchdog(self, interval: float) -> None:
        # A timer of the loop: when the loop is stuck, the pings stop and systemd acts.
        self.notifier.notify("WATCHDOG=1")
        self.call_at(time.monotonic() + interval, self._watchdog, interval)

    def _configure_logging(self, cfg: Config | None = None) -> None:
        settings = (cfg or self.config).log
        log.configure(settings, source=self.config_path or "<defaults>")
        self._log_messages = log.LEVELS[settings.level] <= log.LEVELS["info"]


def address_ban_notice(ban: Ban) -> str:
    return f"connection refused: your address is banned{ban.describe()}"


def online_line(room: Room, me: Connection, max_bytes: int = commands.WHO_MAX_BYTES) -> str:
    """Who else is online, for a welcome: names up to about ``max_bytes``, then a count.

    Only the names shown are visited, so a join into a room of 10,000 costs
    no more than one into a room of 1,000, and no welcome is larger than /who;
    in a join storm the list of the first names is the room's cached one.
    """
    others = len(room) - (me in room)
    if not others:
        return "nobody else is online"
    text, ids, count, stop = room.first_names(max_bytes)
    if id(me) not in ids and id(me) != stop:
        # The usual case, a newcomer in a full room: the room's cached list
        # of the first names is the answer (me, if a member, comes after it).
        return f"online: {text} and {others - count} more" if count < others else f"online: {text}"
    shown: list[str] = []
    size = 0
    for member in room:
        if member is me:
            continue
        size += len(member.name.encode()) + 2
        if size > max_bytes:
            return f"online: {', '.join(shown)} and {others - len(shown)} more"
        shown.append(member.name)
    return f"online: {', '.join(shown)}"


def _ignore_signal(signum: int, frame: Any) -> None:
    pass


def _ignore_timer(arg: Any) -> None:
    pass


def is_exempt(host: str, networks: tuple[configmod.Network, ...]) -> bool:
    """Whether the peer address ``host`` is in one of ``networks``."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return any(ip in net or (mapped is not None and mapped in net) for net in networks)


def raise_nofile_limit() -> int:
    """Raise the open-file soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if want > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    return soft


def bind_all(addresses: tuple[Address, ...]) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for addr in addresses:
            socks.append(bind(addr))
    except StartupError:
        for s in socks:
            s.close()
        raise
    return socks


def bind(addr: Address) -> socket.socket:
    try:
        infos = socket.getaddrinfo(
            addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        raise StartupError(f"cannot listen on {addr}: {e.strerror}") from None
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {addr}: {(e.strerror or str(e)).lower()}") from None
    return sock


def sock_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return str(Address(host, port))
