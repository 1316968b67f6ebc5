"""The rules a connection goes through, from its first byte to its last: admission, the
name, messages and commands, flood control, idle users, bans, leaving.

`Chat` decides; the server around it moves the bytes.  The server calls in when
something arrives (`admit`, `name_received`, `message_received`, `drop`...), and the
chat calls back out through the `Host` interface for everything that is not its own
business: the time, timers, closing a connection, saving the bans.  A member is the
server's connection object, seen through the `Member` protocol below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import structlog

from chatd.core import commands
from chatd.core.addresses import IPNetwork, in_networks
from chatd.core.admission import Admission
from chatd.core.bans import Bans
from chatd.core.cluster import Backplane, Cluster
from chatd.core.history import History, HistorySettings
from chatd.core.moderation import Moderation
from chatd.core.names import list_bytes, name_problem, script_problem
from chatd.core.room import Room
from chatd.core.states import GONE, HANDSHAKE, JOINED
from chatd.core.stats import Stats
from chatd.wire import notices
from chatd.wire.chat import (
    NOTICE_SENDER,
    action_sender,
    private_sender,
    sent_sender,
    text_problem,
)
from chatd.wire.tokenbucket import TokenBucket

__all__ = ["GONE", "HANDSHAKE", "JOINED", "Chat", "Host", "Member", "Settings"]

NOTICE_INTERVAL = 0.025  # seconds: notices alone are broadcast at most this often
# ... and after a flush that took long (a large room), they wait this many times as
# long as it took: fanning out notices takes at most a fifth of the loop.
NOTICE_SHARE = 4
NOTICE_INTERVAL_MAX = 0.25  # seconds: the longest a notice alone waits


class Member(Protocol):
    """What the chat needs of a connection; the server's connection class has it."""

    name: str
    state: str
    peer: str  # "HOST:PORT", for logs and chatctl list
    peer_host: str
    address: str  # what it counts against (its address, an IPv6 one's /64)
    since: float  # wall-clock time of the connect
    accepted: float  # monotonic time of the connect
    last_active: float  # monotonic time of the last read
    messages: int  # messages relayed
    bucket: TokenBucket | None  # flood control, None when it does not apply
    dropped: int  # messages dropped in the current flood
    warned_at: int  # ``messages`` when last told to slow down
    queued: int  # bytes waiting to be sent to it

    def deliver(self, data: bytes) -> None: ...


class FloodSettings(Protocol):
    @property
    def rate(self) -> float: ...
    @property
    def burst(self) -> int: ...
    @property
    def max_dropped(self) -> int: ...
    @property
    def exempt(self) -> tuple[IPNetwork, ...]: ...


class LogSettings(Protocol):
    @property
    def messages(self) -> bool: ...


class Settings(Protocol):
    """The settings the chat reads (the server's Config has them, and more)."""

    @property
    def header_length(self) -> int: ...
    @property
    def max_name_bytes(self) -> int: ...
    @property
    def max_clients(self) -> int: ...
    @property
    def max_per_address(self) -> int: ...
    @property
    def max_handshakes(self) -> int: ...
    @property
    def max_handshakes_per_address(self) -> int: ...
    @property
    def address_exempt(self) -> tuple[IPNetwork, ...]: ...
    @property
    def handshake_timeout(self) -> float: ...
    @property
    def idle_timeout(self) -> float: ...
    @property
    def flood(self) -> FloodSettings: ...
    @property
    def log(self) -> LogSettings: ...
    @property
    def history(self) -> HistorySettings: ...


class Host(Protocol):
    """What the chat needs of the server around it."""

    def now(self) -> float:
        """Monotonic seconds."""

    def wall(self) -> float:
        """Seconds since the epoch."""

    def call_at(self, when: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Call ``fn(arg)`` at monotonic time ``when`` (or soon after)."""

    def close(self, member: Member, last: bytes | None) -> None:
        """End ``member``'s connection: at once, or once ``last`` (a notice) is sent."""

    def members(self) -> Iterable[Member]:
        """Every connection, whatever its state."""

    def users_changed(self) -> None:
        """The number of users changed (for the service manager's status line)."""

    def save_bans(self, bans: Bans) -> None:
        """Keep ``bans`` across restarts; raises StateError."""


HotLog = Callable[..., None]


def _structlog_hot(event: str, **fields: Any) -> None:
    structlog.get_logger("chatd").info(event, **fields)


class Chat:
    def __init__(self, settings: Settings, host: Host, *, hot: HotLog = _structlog_hot) -> None:
        self.settings = settings
        self.host = host
        self.hot = hot  # logs an event per message (the server's fast JSON writer)
        self.log_messages = True  # whether message events are wanted at all (the level)
        self.log: Any = structlog.get_logger("chatd")
        self.room: Room[Member] = Room(settings.header_length)
        self.bans = Bans()
        self.moderation = Moderation(self)
        self.history = History(settings.history, settings.header_length)  # what was said
        self.stats = Stats()
        self.stopping = False
        self.admission = Admission(settings)
        self._notices_due = 0.0  # notices alone wait until then (see flush)
        # Notices are queued, waiting for _notices_due.  Equivalent mutants: before the
        # first flush _notices_due is 0, so next_flush() answers 0 whatever this says.
        self.holding = False  # pragma: no mutate
        self._idle_sweep_id = 0  # the current idle sweep; older ones stop
        # With several nodes (cluster.redis): the link to them, and what their events
        # do here.  None for a single node, which works as if they did not exist.
        self.backplane: Backplane | None = None
        self.cluster: Cluster | None = None

    @property
    def live(self) -> bool:
        """True while this node's events go through the other nodes' shared log."""
        return self.backplane is not None and self.backplane.live

    def announce(self, text: str, *, exclude: Member | None = None) -> None:
        """A notice for everyone (but ``exclude``), on every node."""
        if self.backplane is not None and self.backplane.live:
            event = {"t": "s", "x": text}
            if exclude is not None:
                event["ex"] = exclude.name
            self.backplane.emit(event)
        else:
            self.room.notice(text, exclude=exclude)

    def member_log(self, m: Member) -> Any:
        """A logger bound to ``m``'s address and name (made when needed, not kept)."""
        if m.name:
            return self.log.bind(peer=m.peer, user=m.name)
        return self.log.bind(peer=m.peer)

    # Coming in.

    def admit(self, m: Member) -> bool:
        """A new connection: give it a place, or refuse it with the reason; True if admitted."""
        self.stats.connections += 1
        refusal = self.admission.enter(m, self.host.now())
        if refusal is not None and refusal[0] == "server full":
            self.reject(m, *refusal)
            return False
        if self.bans.has_address_bans:
            ban = self.bans.match_address(m.peer_host, self.host.wall())
            if ban is not None:
                self.reject(m, "banned", notices.ADDRESS_BANNED(terms=ban.terms()), ban=ban.target)
                return False
        if refusal is not None:
            self.reject(m, *refusal)
            return False
        self.host.call_at(m.accepted + self.settings.handshake_timeout, self._handshake_expired, m)
        return True

    def readmit(self, m: Member, bucket: tuple[float, float] | None) -> None:
        """A connection the chatd before this one had (a restart), as it was: counted
        in, a member again in the order it joined, without the checks or the notices
        of a first arrival (``m.state`` and ``m.name`` are already its own)."""
        joined = m.state is JOINED
        self.admission.readmit(m, joined, bucket)
        if joined:
            self.room.join(m)
        else:
            due = m.accepted + self.settings.handshake_timeout
            self.host.call_at(due, self._handshake_expired, m)

    def name_received(self, m: Member, name: str) -> None:
        cfg = self.settings
        problem = name_problem(name, cfg.max_name_bytes)
        if problem:
            self.reject(m, "bad name", notices.NAME_INVALID(problem=problem), name=name)
            return
        if self.bans:
            ban = self.bans.match_name(name, self.host.wall())
            if ban is not None:
                notice = notices.NAME_BANNED(name=name, terms=ban.terms())
                self.reject(m, "banned", notice, name=name)
                return
        room = self.room
        if room.name_taken(name):
            self.reject(m, "name taken", notices.NAME_TAKEN(name=name), name=name)
            return
        other = room.lookalike(name)
        if other is not None:
            notice = notices.NAME_LOOKALIKE(name=name, other=other.name)
            self.reject(m, "name taken", notice, name=name, like=other.name)
            return
        problem = script_problem(name)
        if problem:
            self.reject(m, "bad name", notices.NAME_INVALID(problem=problem), name=name)
            return
        if self.backplane is not None and self.backplane.live:
            # Unique across the nodes too: answered by claimed().
            m.name = name
            self.backplane.claim(m, name)
            return
        self._join(m, name)

    def _join(self, m: Member, name: str) -> None:
        cfg = self.settings
        room = self.room
        m.name = name
        m.state = JOINED
        self.admission.joined(m)
        room.join(m)
        self.stats.joins += 1
        self.stats.peak_users = max(self.stats.peak_users, len(room))
        self.host.users_changed()
        self.hot("join", peer=m.peer, user=name)
        before = len(f"welcome, {name}; online: ".encode())
        limit = list_bytes(cfg.header_length, before)
        if self.cluster is not None and self.cluster.users:
            online = self.cluster.online_line(m, limit)
        else:
            online = room.online_line(m, limit)
        room.send_to(m, NOTICE_SENDER, notices.WELCOME(name=name, online=online))
        replay = cfg.history.replay_on_join
        if replay and self.history.keeping:
            room.send_frames(m, self.history.replay(replay, self.host.wall()))
        if self.backplane is not None and self.backplane.live:
            self.backplane.emit({"t": "join", "n": name, "peer": m.peer, "since": m.since})
        else:
            room.notice(notices.JOINED(name=name), exclude=m, run=(notices.JOINED_MANY, "", name))

    def bad_name_frame(self, m: Member, problem: str) -> None:
        """The name frame broke the framing (too long, not UTF-8): refuse the name."""
        self.reject(m, "bad name", notices.NAME_INVALID(problem=problem))

    def _handshake_expired(self, m: Member) -> None:
        if m.state is not HANDSHAKE:
            return
        timeout = self.settings.handshake_timeout
        due = m.accepted + timeout
        if due > self.host.now():  # a reload raised the timeout since this timer was set
            self.host.call_at(due, self._handshake_expired, m)
            return
        self.reject(m, "handshake timeout", notices.HANDSHAKE_TIMEOUT(seconds=f"{timeout:g}"))

    # Messages.

    def message_received(self, m: Member, text: str) -> None:
        bucket = m.bucket
        if bucket is not None:
            now = m.last_active  # the time of this read
            if m.dropped and bucket.full(now):
                self._flood_over(m)
            if not bucket.take(now):
                self._flooding(m)
                return
        if not text:
            return
        problem = text_problem(text)
        if problem:
            reason = f"messages may not contain {problem}"
            self.member_log(m).info("message_refused", reason=reason)
            self.room.send_to(m, NOTICE_SENDER, notices.NOT_SENT(problem=reason))
            return
        if text[0] == "/":
            commands.run(self, m, text)
            return
        self.relay(m, text)

    def relay(self, m: Member, text: str, kind: str = "message", to: Member | None = None) -> None:
        """A message accepted from ``m``, on its way: to the room, or to ``to`` alone (a
        private message, whose sender gets its copy), counted and logged.

        Every message a user says passes here once, in the order the room gets it.
        """
        room = self.room
        backplane = self.backplane
        if backplane is not None and (backplane.live or to is None):
            assert self.cluster is not None
            self.cluster.emit_message(m, text, kind, to)
            return
        if to is not None:
            room.send_to(to, private_sender(m.name), text)
            room.send_to(m, sent_sender(m.name, to.name), text)  # it went
            self.accepted(m, text, kind=kind, to=to.name)
            return
        room.post(m, text, as_name=action_sender(m.name) if kind == "action" else None)
        if kind == "message":
            history = self.history
            if history.keeping:  # the room's history: ordinary messages alone
                history.add(m.name, text, self.host.wall())
            self.accepted(m, text)
        else:
            self.accepted(m, text, kind=kind)

    def accepted(self, m: Member, text: str, **fields: Any) -> None:
        """Count and log a message that was relayed (``fields``: kind, to)."""
        m.messages += 1
        self.stats.messages += 1
        if self.log_messages:
            size = len(text.encode())
            if self.settings.log.messages:
                self.hot("message", peer=m.peer, user=m.name, bytes=size, text=text, **fields)
            else:
                self.hot("message", peer=m.peer, user=m.name, bytes=size, **fields)

    def flush(self) -> None:
        """Hand out what this pass posted; hold back notices that come too often.

        Join and leave notices go out at once, unless the last broadcast was less
        than NOTICE_INTERVAL ago, or NOTICE_SHARE times as long as it took when that
        is longer (at most NOTICE_INTERVAL_MAX): then they wait for it (a join storm
        costs one send per member per interval, not per pass, and no more than a
        fifth of the loop) while each newcomer's welcome goes at once.  Members'
        messages never wait.
        """
        room = self.room
        if not room.pending:
            return
        now = self.host.now()
        if room.notices_only and not self.stopping and now < self._notices_due:
            room.flush_direct()
            self.holding = room.pending
            return
        room.flush()
        self.holding = False
        # From the end of this flush, which to a large room takes a while.
        end = self.host.now()
        wait = min(max(NOTICE_INTERVAL, NOTICE_SHARE * (end - now)), NOTICE_INTERVAL_MAX)
        self._notices_due = end + wait

    def next_flush(self) -> float | None:
        """When flush() has something to do: 0 for now, a monotonic time, or None."""
        room = self.room
        if not room.pending:
            return None
        return self._notices_due if self.holding and room.notices_only else 0.0

    # Flood control (the bucket is the address's: admission.py).

    def _flooding(self, m: Member) -> None:
        """``m`` sent a message with no token left: drop it, with a logged reason."""
        m.dropped += 1
        self.stats.flood_dropped += 1
        flood = self.settings.flood
        if flood.max_dropped and m.dropped >= flood.max_dropped:
            self.drop(m, "flooding", notice=notices.FLOODING(count=m.dropped))
            return
        if m.warned_at != m.messages:
            # Told once per run of dropped messages, so a flood cannot make the
            # daemon write as much as it reads.
            m.warned_at = m.messages
            self.member_log(m).warning(
                "flood", dropped=m.dropped, rate=flood.rate, burst=flood.burst
            )
            notice = notices.SLOW_DOWN(rate=f"{flood.rate:g}", burst=flood.burst)
            self.room.send_to(m, NOTICE_SENDER, notice)

    def _flood_over(self, m: Member) -> None:
        """The bucket filled up again: the flood is over."""
        self.member_log(m).info("flood_end", dropped=m.dropped)
        m.dropped = 0
        m.warned_at = -1

    # Idle users.

    def start_idle_sweep(self) -> None:
        """(Re)start the periodic sweep for idle users; stops any earlier one."""
        self._idle_sweep_id += 1
        if self.settings.idle_timeout:
            self._next_idle_sweep(self._idle_sweep_id)

    def _next_idle_sweep(self, sweep_id: int) -> None:
        # One timer for everyone, every tenth of the timeout (at most 30 s): a
        # user is disconnected between 1 and 1.1 timeouts after its last word.
        every = min(max(self.settings.idle_timeout / 10, 0.05), 30.0)
        self.host.call_at(self.host.now() + every, self._idle_sweep, sweep_id)

    def _idle_sweep(self, sweep_id: int) -> None:
        if sweep_id != self._idle_sweep_id:
            return
        timeout = self.settings.idle_timeout
        now = self.host.now()
        idle = [m for m in self.room if now - m.last_active > timeout]
        for m in idle:
            self.drop(m, "idle", notice=notices.IDLE(seconds=f"{timeout:g}"))
        self._next_idle_sweep(sweep_id)

    # Going out.

    def reject(self, m: Member, reason: str, notice: str, **fields: Any) -> None:
        """Refuse a connection before it joined: tell it why, then close."""
        self.stats.reject(reason)
        self.member_log(m).info("rejected", reason=reason, **fields)
        self._gone(m, notice)

    def protocol_error(self, m: Member, error: str) -> None:
        self.drop(m, "protocol error", notice=notices.PROTOCOL_ERROR(error=error), error=error)

    def slow_consumer(self, m: Member, queued: int) -> None:
        self.stats.evictions += 1
        self.drop(m, "slow consumer", queued=queued)

    def drop(
        self,
        m: Member,
        reason: str,
        *,
        notice: str | None = None,
        announce: str | None = None,
        **fields: Any,
    ) -> None:
        """Take ``m`` out of the room for ``reason``, log it, and have it closed.

        With ``notice``, the connection is told why and closed once that is sent.
        The room is told "NAME left (REASON)", or ``announce`` instead.
        """
        if m.state is GONE:
            return
        if m.state is JOINED:
            self.room.leave(m)
            self.stats.leave(reason)
            self.host.users_changed()
            if m.dropped:
                fields["flood_dropped"] = m.dropped
            level = "warning" if reason in ("slow consumer", "internal error") else "info"
            getattr(self.member_log(m), level)("leave", reason=reason, **fields)
            text = announce or notices.LEFT(name=m.name, reason=reason)
            if self.backplane is not None:
                self.backplane.release(m, text)
            if self.backplane is not None and self.backplane.live:
                self.backplane.emit({"t": "leave", "n": m.name, "x": text})
            elif announce is not None and not self.stopping:
                self.room.notice(announce)
            elif not self.stopping:  # leaves in a row for one reason: one notice
                run = (notices.LEFT_MANY, reason, m.name)
                self.room.notice(notices.LEFT(name=m.name, reason=reason), run=run)
        else:
            self.member_log(m).debug("disconnect", reason=reason, **fields)
        self._gone(m, notice)

    def _gone(self, m: Member, notice: str | None) -> None:
        self.admission.leave(m, handshaking=m.state is HANDSHAKE)
        m.state = GONE
        self.host.close(m, None if notice is None else self.room.frame(NOTICE_SENDER, notice))

    def stop(self) -> None:
        """Shutting down: what this pass accepted goes out first, then everyone is told."""
        self.stopping = True
        # Once everyone has left the room, nobody would be there to receive it.
        self.flush()
        for m in list(self.host.members()):
            self.drop(m, "shutdown", notice=notices.SHUTDOWN())

    # Settings.

    def reconfigure(self, settings: Settings) -> None:
        """Switch to new settings (a reload); members' buckets and timers follow."""
        old = self.settings
        self.settings = settings
        self.admission.reconfigure(settings)
        self.history.configure(settings.history)
        flood = settings.flood
        for m in self.host.members():
            if m.state is GONE:
                continue
            limited = flood.rate > 0 and not in_networks(m.peer_host, flood.exempt)
            if limited is (m.bucket is None):
                self.admission.rebucket(m, self.host.now())
            if m.state is HANDSHAKE and settings.handshake_timeout < old.handshake_timeout:
                # Its timer is set for the old, later time.
                due = m.accepted + settings.handshake_timeout
                self.host.call_at(due, self._handshake_expired, m)
        if settings.idle_timeout != old.idle_timeout:
            self.start_idle_sweep()

    # Admin actions (core/admin.py turns requests into these).

    def kick(self, m: Member, reason: str, by: int) -> None:
        name = m.name
        why = f": {reason}" if reason else ""
        self.drop(
            m,
            "kicked",
            notice=notices.KICKED(why=why),
            announce=notices.USER_KICKED(name=name, reason=notices.parenthesized(reason)),
            by_uid=by,
        )
        self.stats.kicks += 1

    def say(self, text: str) -> int:
        """A server notice to everyone; returns how many users it reaches."""
        self.announce(text)
        if self.cluster is not None and self.live:
            return len(self.room) + len(self.cluster.users)
        return len(self.room)
