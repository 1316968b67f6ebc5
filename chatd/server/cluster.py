"""The loop's side of the backplane (cluster.redis): the chat's `Backplane`, fed by the
helper thread of chatd.server.redislink over a socketpair registered in the selector.

What the chat emits during a pass is collected and handed to the thread once, at the
end of the pass (`send`), as one batch: one Redis round trip per pass.  What comes back
(the shared log's events in their order, answers to name claims, the link's ups and
downs, the nodes' listing) is read by `ready()` when the socketpair says so.

The link's states: ``down`` (this node alone: messages are delivered here at once
and kept, in order, to be published when the link returns), ``joining`` (Redis
answers again: this node's users are claimed anew, those whose names another node
gave away meanwhile are disconnected with the reason), and ``up`` (every event goes
through the log and is delivered when it comes back, so every node shows one order).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import socket
import time
from typing import TYPE_CHECKING, Any

from chatd.core.bans import Ban
from chatd.core.chat import Chat, Member
from chatd.core.cluster import Cluster, Event, RemoteUser
from chatd.core.names import name_keys
from chatd.core.states import GONE, JOINED
from chatd.server.config import ClusterConfig, redacted_url
from chatd.server.connection import Connection
from chatd.server.errors import StartupError
from chatd.server.loop import READ
from chatd.server.redislink import Duplicate, RedisLink
from chatd.wire import notices

if TYPE_CHECKING:
    from chatd.server.server import Server

OUTBOX_MAX = 100_000  # events kept for the others while the link is down, at most


class ClusterStartError(StartupError):
    """The cluster cannot be joined at start; chatd exits with status 2."""

    status = 2


def read_password(cfg: ClusterConfig) -> str | None:
    if not cfg.password_file:
        return None
    try:
        with open(cfg.password_file, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise ClusterStartError(f"cluster.password_file: {cfg.password_file}: {why}") from None


class Link:
    """The chat's Backplane over Redis."""

    def __init__(self, server: Server, cfg: ClusterConfig) -> None:
        self.server = server
        self.cfg = cfg
        self.node = cfg.node or socket.gethostname().split(".")[0]
        self.log: Any = server.log.bind(node=self.node)
        self.state = "down"
        self.error: str | None = None
        self.ops: list[tuple[Any, ...]] = []  # for the thread at the end of this pass
        self.outbox: list[Event] = []  # emitted while the link was down, in order
        self.claims: dict[int, tuple[Member, str]] = {}  # claim id -> who, which name
        self.claiming: set[int] = set()  # id() of connections waiting for their name
        self.registered: dict[int, str] = {}  # id(member) of users the cluster knows -> owner
        self.nodes: list[dict[str, Any]] = []
        self.nodes_at = 0.0
        self.told_down = False
        self.outbox_dropped = 0  # events past OUTBOX_MAX this outage, not kept for the others
        self.ups = self.downs = 0
        self.pending_releases: list[tuple[Any, ...]] = []
        self.rejoin: set[int] = set()  # claims of our users after the link came back
        self._info_at = 0.0
        self._mids = itertools.count(1)
        self._cids = itertools.count(1)
        self._results: collections.deque[tuple[Any, ...]] = collections.deque()
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self.thread = RedisLink(
            cfg.redis,
            read_password(cfg),
            self.node,
            cfg.room,
            cfg.lease,
            cfg.history,
            self._post,
        )
        self.run = self.thread.token  # this run of this node, in the owners of its names

    @classmethod
    def attach(cls, server: Server) -> Link | None:
        """The link of ``server``'s chat to the other nodes, or None without cluster.redis."""
        if not server.config.cluster.redis:
            return None
        link = cls(server, server.config.cluster)
        server.chat.backplane = link
        server.chat.cluster = Cluster(server.chat, link.node)
        return link

    def status_suffix(self) -> str:
        """What STATUS= adds about the link."""
        if self.live:
            return ""
        return "; link to the other servers down, serving this server's users only"

    @property
    def chat(self) -> Chat:
        return self.server.chat

    @property
    def live(self) -> bool:
        return self.state == "up"

    # Start and stop.

    def open(self, take_over: bool = False) -> None:
        """Check Redis once before serving: a live node of the same name is an error
        (unless this chatd takes over from the one before, ``take_over``); so is no
        answer with cluster.required.  Then start the thread."""
        where = redacted_url(self.cfg.redis)
        self.thread.taking_over = self.thread.quietly = take_over
        try:
            self.thread.connect()
            self.thread.register()
            self.state = "joining"  # Redis answers: up once the thread says so
        except Duplicate as e:
            self.thread.close_redis()
            raise ClusterStartError(f"cluster.node: {e}") from None
        except Exception as e:
            self.thread.close_redis()
            if self.cfg.required:
                raise ClusterStartError(
                    f"cluster.redis: {where}: {type(e).__name__}: {e} (cluster.required is true)"
                ) from None
            self.error = str(e)
            self.log.warning("cluster_link_down", redis=where, error=str(e), starting="alone")
            self.told_down = True  # nobody to tell yet
        self.server.loop.register(self._r, READ, self)
        self.thread.start()

    def close(self) -> None:
        self.thread.handed_over = self.server.handed_over
        self.send()
        if self.thread.is_alive():
            self.thread.stop()
        self.server.loop.unregister(self._r)
        self._r.close()
        self._w.close()

    # The Backplane.

    def emit(self, event: Event) -> None:
        event["node"] = self.node
        if event["t"] in ("m", "p"):
            event["mid"] = f"{self.run}:{next(self._mids)}"
        if self.live:
            self.ops.append(("emit", json.dumps(event, separators=(",", ":"))))
        elif len(self.outbox) < OUTBOX_MAX:
            event["replay"] = True
            self.outbox.append(event)
        else:  # delivered here, never to reach the others: said once an outage
            if not self.outbox_dropped:
                self.log.warning("cluster_outbox_full", kept=OUTBOX_MAX, kind=event["t"])
            self.outbox_dropped += 1

    def claim(self, m: Member, name: str) -> None:
        cid = next(self._cids)
        self.claims[cid] = (m, name)
        if m.state is not JOINED:
            self.claiming.add(id(m))
        self.ops.append(self._claim_op(cid, m, name))

    def _claim_op(self, cid: int, m: Member, name: str) -> tuple[Any, ...]:
        owner = f"{self.node}/{self.run}/{getattr(m, 'serial', id(m))}"
        keys = sorted(name_keys(name) | {name.casefold()})
        info = {
            "name": name,
            "node": self.node,
            "peer": m.peer,
            "since": m.since,
            "owner": owner,
            "keys": keys,
        }
        return ("claim", cid, owner, name, name.casefold(), keys, json.dumps(info))

    def release(self, m: Member, text: str | None = None) -> None:
        owner = self.registered.pop(id(m), None)
        if owner is None:
            return
        keys = sorted(name_keys(m.name) | {m.name.casefold()})
        op = ("release", owner, m.name, m.name.casefold(), keys)
        if self.live:
            self.ops.append(op)
        else:
            self.pending_releases.append(op)
            if text is not None:  # the others knew it: they are told when the link is back
                self.outbox.append(
                    {"t": "leave", "n": m.name, "x": text, "node": self.node, "replay": True}
                )

    def ban(self, ban: Ban) -> None:
        """A ban made here: kept in Redis for every node, and applied by them now."""
        if self.live:
            self.ops.append(("ban", ban.key, json.dumps(ban.to_json())))
        self.emit({"t": "ban", "ban": ban.to_json()})

    def unban(self, ban: Ban) -> None:
        if self.live:
            self.ops.append(("unban", ban.key))
        self.emit({"t": "unban", "kind": ban.kind, "target": ban.target})

    def kick(self, user: RemoteUser, reason: str, by: int) -> None:
        """Ask the node serving ``user`` to kick it."""
        self.emit({"t": "kick", "n": user.name, "on": user.node, "why": reason, "by": by})

    # Batches to the thread, once per pass.

    def send(self) -> None:
        now = time.monotonic()
        if now - self._info_at >= 1.0:
            self._info_at = now
            self.publish_info()
        if self.ops:
            ops, self.ops = self.ops, []
            self.thread.send(ops)

    # What the thread says.

    def _post(self, items: list[tuple[Any, ...]]) -> None:  # in the thread
        self._results.extend(items)
        with contextlib.suppress(BlockingIOError, OSError):
            self._w.send(b"x")

    def ready(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            self._r.recv(4096)
        results = self._results
        while results:
            item = results.popleft()
            kind = item[0]
            if kind == "ev":
                self._event(item[2], item[3])
            elif kind == "claimed":
                self._claimed(item[1], item[2])
            elif kind == "up":
                self._up(item[1], item[2], item[3])
            elif kind == "down":
                self._down(item[1], item[2])
            elif kind == "unsent":
                self._unsent(item[1])
            elif kind == "missed":
                assert self.chat.cluster is not None
                self.chat.cluster.missed(item[1])
            elif kind == "nodes":
                self.nodes = item[1]
                self.nodes_at = time.time()
            elif kind == "log":
                self.log.info(item[1], **item[2])

    def _event(self, event: Event, roster: bool) -> None:
        cluster = self.chat.cluster
        assert cluster is not None
        mine = event.get("node") == self.node
        if mine and event.get("lost"):
            # Our own users, ended by another node while we were cut off: they are
            # still here, and claimed again when the link is back.
            return
        mid = event.get("mid")
        if mine and mid in cluster.delivered and not event.get("replay"):
            # Delivered here when the link failed under it, yet it reached the log:
            # the others have it, so it is not published again.
            self.outbox = [e for e in self.outbox if e.get("mid") != mid]
        cluster.apply(event, roster=roster)

    def _claimed(self, cid: int, holder: str) -> None:
        m, name = self.claims.pop(cid, (None, ""))
        if cid in self.rejoin:
            self.rejoin.discard(cid)
            if not self.rejoin:
                self._joined()
        if m is None:
            return
        if holder in ("", "="):
            self.registered[id(m)] = f"{self.node}/{self.run}/{getattr(m, 'serial', id(m))}"
        if m.state is JOINED:  # a user claimed again when the link came back
            if holder not in ("", "="):
                self.registered.pop(id(m), None)
                self._drop_taken(m)
            elif holder == "":
                event = {"t": "join", "n": m.name, "peer": m.peer, "since": m.since}
                self.emit({**event, "again": True})
            return
        self._answered(m, name, None if holder in ("", "=") else holder)

    def _answered(self, m: Member, name: str, other: str | None) -> None:
        """A connection's claim is answered: it joins (and what it sent after its name
        is taken now) or it is refused."""
        self.claiming.discard(id(m))
        self._cluster().claimed(m, name, other)
        if m.state is JOINED and isinstance(m, Connection):
            m.decoder.max_payload = self.server.config.max_message_bytes
            m.consume()

    def _drop_taken(self, m: Member) -> None:
        name = m.name
        self.outbox = [e for e in self.outbox if e.get("n") != name]
        self.chat.drop(m, "name taken in the cluster", notice=notices.NAME_TAKEN_CLUSTER(name=name))

    def _up(self, users: list[dict[str, Any]], bans: list[str], first: bool) -> None:
        chat = self.chat
        cluster = chat.cluster
        assert cluster is not None
        cluster.snapshot(
            RemoteUser(u["name"], u["node"], u.get("peer", ""), u.get("since", 0.0)) for u in users
        )
        _merge_bans(self, bans)
        self.state = "joining"
        self.ups += 1
        self.error = None
        self.log.info(
            "cluster_link_up",
            redis=redacted_url(self.cfg.redis),
            users=len(chat.room),
            others=len(cluster.users),
            replay=len(self.outbox),
            not_kept=self.outbox_dropped,
        )
        self.outbox_dropped = 0
        # Our users, claimed anew (answers in _claimed); then what they did meanwhile.
        self.registered.clear()
        self.rejoin = set()
        for m in list(chat.room):
            cid = next(self._cids)
            self.claims[cid] = (m, m.name)
            self.rejoin.add(cid)
            self.ops.append(self._claim_op(cid, m, m.name))
        if self.told_down and not first:
            chat.room.notice(notices.CLUSTER_UP())
        self.told_down = False
        if not self.rejoin:
            self._joined()

    def _joined(self) -> None:
        """Every user of ours is claimed again (or gone): the link is up, and what this
        node's users did while it was down goes to the others, in order."""
        self.state = "up"
        self.ops.extend(self.pending_releases)
        self.pending_releases = []
        outbox, self.outbox = self.outbox, []
        for event in outbox:
            self.ops.append(("emit", json.dumps(event, separators=(",", ":"))))
        for m in list(self.chat.room):  # joined while the link was coming back
            if id(m) not in self.registered and not any(c[0] is m for c in self.claims.values()):
                self.claim(m, m.name)
        self.server.users_changed()

    def _down(self, error: str | None, unsent: list[tuple[Any, ...]]) -> None:
        was = self.state
        self.state = "down"
        self.rejoin = set()
        self.error = error
        if was != "down" or not self.downs:
            self.downs += 1
            self.log.warning(
                "cluster_link_down",
                redis=redacted_url(self.cfg.redis),
                error=error,
                unsent=len(unsent),
            )
        self._unsent(unsent)
        self.claims_failed()
        if not self.told_down:
            self.told_down = True
            self.chat.room.notice(notices.CLUSTER_DOWN())
        self.server.users_changed()

    def claims_failed(self) -> None:
        """Claims the link took with it: names checked here alone, as on a single node."""
        claims, self.claims = self.claims, {}
        for m, name in claims.values():
            if m.state is not GONE and m.state is not JOINED:
                self._answered(m, name, None)

    def _unsent(self, ops: list[tuple[Any, ...]]) -> None:
        """Operations the link failed to carry out: their events are delivered here now
        (and kept for the others); a claim is answered as on a single node."""
        cluster = self.chat.cluster
        assert cluster is not None
        for op in ops:
            if op[0] == "emit":
                event = json.loads(op[1])
                if event.get("t") == "kick":
                    continue
                cluster.apply(event, roster=False)  # what it does here, as it was meant
                if "mid" in event:
                    cluster.delivered.add(event["mid"])
                event["replay"] = True
                self.outbox.append(event)
            elif op[0] == "release":
                self.pending_releases.append(op)

    def _cluster(self) -> Cluster:
        assert self.chat.cluster is not None
        return self.chat.cluster

    # For chatctl and STATUS=.

    def status(self) -> dict[str, Any]:
        cluster = self.chat.cluster
        return {
            "node": self.node,
            "room": self.cfg.room,
            "redis": redacted_url(self.cfg.redis),
            "link": self.state,
            "error": self.error,
            "nodes": len(self.nodes) if self.live else 1,
            "users": len(self.chat.room) + (len(cluster.users) if cluster and self.live else 0),
            "replay_waiting": len(self.outbox),
        }

    def publish_info(self) -> None:
        chat = self.chat
        self.thread.info = {
            "users": len(chat.room),
            "messages": chat.stats.messages,
            "started": chat.stats.started,
            "link": self.state,
        }


def _merge_bans(link: Link, bans: list[str]) -> None:
    """The bans in Redis and ours, when the link comes up: the newer of each wins
    here, and ours that Redis lacks go there."""
    chat = link.chat
    theirs = {}
    for text in bans:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            ban = Ban(**json.loads(text))
            theirs[ban.key] = ban
    changed = False
    for key, ban in theirs.items():
        current = chat.bans._by_key.get(key)
        if current is None or current.created < ban.created:
            chat.bans.add(ban)
            chat.moderation.watch_expiry(ban)
            chat.moderation.enforce(ban)
            changed = True
    now = chat.host.wall()
    mine = [(b.key, json.dumps(b.to_json())) for b in chat.bans.active(now) if b.key not in theirs]
    if mine:
        link.ops.append(("bans_merge", mine))
    if changed:
        assert chat.cluster is not None
        chat.cluster._save()
