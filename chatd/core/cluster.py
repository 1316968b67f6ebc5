"""One room over several nodes, without I/O: the events the nodes exchange, their order,
who is on the other nodes, and what each event does to this node's room.

The events travel through a shared, ordered log (the server's Redis backplane): each
is a small JSON object with a type ``t`` and the node it came from, ``node``; the log
gives each a sequence number, and every node applies every event in that order, its
own included, so every node shows the same sequence.  `Sequencer` turns what arrives
(out of order, twice, with gaps) into that sequence; `Cluster.apply()` carries out one
event on this node's room.

The events:

- ``m``: a message (``n`` the sender, ``x`` the text, ``k`` message or action);
- ``p``: a private message (``n`` from, ``to``, ``x``);
- ``s``: a server notice (``x``; ``ex`` a name it is not for: a joiner, say);
- ``join`` / ``leave``: a user of ``node`` came or went (``n``, ``peer``, ``since``;
  a leave has its notice ``x``);
- ``kick``: the node serving ``n`` kicks it (``why``, ``by``);
- ``ban`` / ``unban``: every node applies the ban (``ban``) or lifts it (``kind``, ``target``).

A message carries ``mid``, unique per node, so that one a node delivered on its own
while its link was down is not delivered twice when the log has it after all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from chatd.core.bans import Ban, StateError
from chatd.core.names import and_more, names_line
from chatd.core.states import HANDSHAKE
from chatd.wire import notices
from chatd.wire.chat import action_sender, private_sender, sent_sender

if TYPE_CHECKING:
    from chatd.core.chat import Chat, Member

Event = dict[str, Any]


class Backplane(Protocol):
    """What the chat needs of the link to the other nodes (the server's)."""

    node: str

    @property
    def live(self) -> bool:
        """True while events go through the shared log; False: this node alone."""

    def emit(self, event: Event) -> None:
        """Send ``event`` to every node (this one included) in the shared order."""

    def claim(self, m: Member, name: str) -> None:
        """Take ``name`` for ``m`` cluster-wide; answered by `Chat.claimed()`."""

    def release(self, m: Member, text: str | None = None) -> None:
        """``m`` left (``text`` the notice of its leaving, if it had joined): its name is
        free."""

    def ban(self, ban: Ban) -> None:
        """A ban made here: for every node."""

    def unban(self, ban: Ban) -> None:
        """A ban lifted here: on every node."""

    def kick(self, user: RemoteUser, reason: str, by: int) -> None:
        """Have the node serving ``user`` kick it."""

    def status(self) -> dict[str, Any]:
        """The link, for chatctl stats."""

    @property
    def nodes(self) -> list[dict[str, Any]]:
        """The live nodes as last listed: name, lease left, users, link."""


@dataclass(frozen=True)
class RemoteUser:
    name: str
    node: str
    peer: str
    since: float


class Sequencer:
    """Events by their sequence number in, the gapless sequence out.

    ``feed()`` takes an event as it arrived and returns what can be applied now;
    when a gap opens it returns nothing and ``gap`` says which numbers to fetch
    (from the log's history) and ``fill()`` them.  Numbers at or below ``last`` were
    applied already and are ignored.
    """

    __slots__ = ("held", "last")

    def __init__(self, last: int = 0) -> None:
        self.last = last
        self.held: dict[int, Event] = {}  # arrived past a gap

    def feed(self, seq: int, event: Event) -> list[tuple[int, Event]]:
        if seq <= self.last:
            return []
        self.held[seq] = event
        return self._ready()

    @property
    def gap(self) -> tuple[int, int] | None:
        """(first, last) sequence numbers missing before what is held, or None."""
        if not self.held:
            return None
        return self.last + 1, min(self.held) - 1

    def fill(
        self, found: Iterable[tuple[int, Event]], upto: int
    ) -> tuple[list[tuple[int, Event]], int]:
        """The history for the gap, up to ``upto``: what can be applied now, and how many
        numbers of the gap the history no longer had (missed for good, skipped)."""
        held = self.held
        for seq, found_event in found:
            if self.last < seq <= upto:
                held.setdefault(seq, found_event)
        ready: list[tuple[int, Event]] = []
        missed = 0
        for seq in range(self.last + 1, upto + 1):
            event = held.pop(seq, None)
            if event is None:
                missed += 1
            else:
                ready.append((seq, event))
        self.last = max(self.last, upto)
        ready.extend(self._ready())
        return ready, missed

    def _ready(self) -> list[tuple[int, Event]]:
        out = []
        held = self.held
        while self.last + 1 in held:
            self.last += 1
            out.append((self.last, held.pop(self.last)))
        return out


class Cluster:
    """Carries out the log's events on this node's room."""

    __slots__ = ("chat", "delivered", "node", "previous", "users")

    def __init__(self, chat: Chat, node: str) -> None:
        self.chat = chat
        self.node = node
        self.users: dict[str, RemoteUser] = {}  # the other nodes' users, by casefolded name
        self.previous: dict[str, RemoteUser] = {}  # as they were before the last snapshot
        # mids of our messages delivered here while the link was down (see `apply`).
        self.delivered: set[str] = set()

    def snapshot(self, users: Iterable[RemoteUser]) -> None:
        """The other nodes' users as the log had them when the link came up."""
        self.previous = self.users
        self.users = {u.name.casefold(): u for u in users if u.node != self.node}

    def forget_remote(self) -> None:
        self.users = {}

    def apply(self, event: Event, *, roster: bool = True) -> None:
        """Carry out one event of the log; ``roster=False`` for an event older than the
        snapshot of the users (its join or leave is in the snapshot already)."""
        t = event.get("t")
        node = event.get("node")
        mine = node == self.node
        chat = self.chat
        room = chat.room
        if t == "m":
            if mine and event.get("mid") in self.delivered:
                self.delivered.discard(event["mid"])
                return
            if mine and event.get("replay"):
                return  # said while the link was down: our users saw it then
            name = event["n"]
            sender = room.get(name) if mine else None
            action = event.get("k") == "action"
            room.broadcast(action_sender(name) if action else name, event["x"], exclude=sender)
            if not action and chat.history.keeping:  # every node keeps the room's history
                chat.history.add(name, event["x"], chat.host.wall())
        elif t == "p":
            if mine and event.get("mid") in self.delivered:
                self.delivered.discard(event["mid"])
                return
            to = room.get(event["to"])
            if to is not None:
                room.send_to(to, private_sender(event["n"]), event["x"])
            if mine:
                sender = room.get(event["n"])
                if sender is not None:
                    room.send_to(sender, sent_sender(event["n"], event["to"]), event["x"])
        elif t == "s":
            ex = room.get(event["ex"]) if mine and event.get("ex") else None
            room.notice(event["x"], exclude=ex)
        elif t == "join":
            key = event["n"].casefold()
            # ``again``: a user its node claimed anew after losing its link; news only
            # to a node that had seen it leave.
            known = self.users.get(key) or self.previous.get(key)
            again = event.get("again") and (mine or (known is not None and known.node == node))
            if roster and not mine:
                user = RemoteUser(event["n"], node or "", event.get("peer", ""), event["since"])
                self.users[key] = user
            if not again:
                joiner = room.get(event["n"]) if mine else None
                run = (notices.JOINED_MANY, "", event["n"])
                room.notice(notices.JOINED(name=event["n"]), exclude=joiner, run=run)
        elif t == "leave":
            if roster and not mine:
                key = event["n"].casefold()
                held = self.users.get(key)
                if held is not None and held.node == node:
                    del self.users[key]
                self.previous.pop(key, None)  # seen leaving: back, it is news
            if not (mine and event.get("replay")):
                room.notice(event["x"])
        elif t == "kick":
            if event.get("on") == self.node:
                m = room.get(event["n"])
                if m is not None:
                    chat.kick(m, event.get("why", ""), event.get("by", -1))
        elif t == "ban":
            if not mine:
                self._ban(Ban(**event["ban"]))
        elif t == "unban" and not mine and chat.bans.remove(event["kind"], event["target"]):
            self._save()

    def _ban(self, ban: Ban) -> None:
        chat = self.chat
        chat.bans.add(ban)
        chat.moderation.watch_expiry(ban)
        self._save()
        chat.moderation.enforce(ban)

    def _save(self) -> None:
        try:
            self.chat.host.save_bans(self.chat.bans)
        except StateError as e:
            self.chat.log.error("state_not_saved", error=str(e))

    def missed(self, count: int | None) -> None:
        """The log no longer had ``count`` events (None: an unknown number) this node
        should have had: tell its users."""
        if count is None:
            text = notices.CLUSTER_HISTORY_LOST()
        else:
            text = notices.CLUSTER_MISSED(count=count)
        self.chat.room.notice(text)

    def names(self, local: Iterable[Member]) -> list[str]:
        """Everyone's names: this node's users, then the others'."""
        return [m.name for m in local] + [u.name for u in self.users.values()]

    # What the chat hands over when it has a backplane.

    def claimed(self, m: Member, name: str, other: str | None) -> None:
        """The cluster's answer to a claim of ``name`` for ``m``: ``other`` is the user
        who has it (or one like it), None if it is ``m``'s now."""
        chat = self.chat
        if m.state is not HANDSHAKE or m.name != name:  # gone meanwhile
            if other is None and chat.backplane is not None:
                chat.backplane.release(m)
            return
        if other is None:
            chat._join(m, name)
        elif other.casefold() == name.casefold():
            chat.reject(m, "name taken", notices.NAME_TAKEN(name=name), name=name)
        else:
            notice = notices.NAME_LOOKALIKE(name=name, other=other)
            chat.reject(m, "name taken", notice, name=name, like=other)

    def online_line(self, m: Member, limit: int) -> str:
        """The welcome's list of who else is online, on every node."""
        names = [n for n in self.names(self.chat.room) if n != m.name]
        if not names:
            return "nobody else is online"
        text, count = names_line(names, limit)
        return "online: " + and_more(text, count, len(names))

    def emit_message(self, m: Member, text: str, kind: str, to: Member | str | None) -> None:
        """A message through the other nodes' log (delivered here when it comes back), or,
        with the link down, here at once and kept for them (the backplane replays it)."""
        chat = self.chat
        assert chat.backplane is not None
        to_name = to if isinstance(to, str) or to is None else to.name
        if to_name is not None:
            event = {"t": "p", "n": m.name, "to": to_name, "x": text}
        else:
            event = {"t": "m", "n": m.name, "x": text, "k": kind}
        if not chat.backplane.live and to is None:
            chat.room.post(m, text, as_name=action_sender(m.name) if kind == "action" else None)
            if kind == "message" and chat.history.keeping:
                chat.history.add(m.name, text, chat.host.wall())
        chat.backplane.emit(event)
        if to_name is not None:
            chat.accepted(m, text, kind=kind, to=to_name)
        elif kind == "message":
            chat.accepted(m, text)
        else:
            chat.accepted(m, text, kind=kind)
