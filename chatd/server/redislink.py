"""The Redis side of the backplane: one helper thread that talks to Redis with redis-py,
so that the event loop never waits for it.

The loop hands the thread batches of operations (`send()`); the thread runs each
batch as one pipeline, one round trip however many messages the pass accepted, and
hands back what happened (`post`, which appends to a queue and writes a byte to the
loop's socketpair).  The thread alone touches redis-py's sockets: it waits in
select() on its pub/sub socket and its own wake-up socketpair, but only once
``get_message(timeout=0)`` has said that nothing is buffered, since redis-py reads
ahead into its own buffer.

The keys of room R share the hash tag ``{R}`` (one Redis Cluster slot):

    chatd:{R}:seq      the last sequence number      chatd:{R}:log    the stream (history)
    chatd:{R}:names    name key -> owner TAB name    chatd:{R}:users  casefolded name -> JSON
    chatd:{R}:nodes    node -> JSON                  chatd:{R}:lease:NODE  a node's lease
    chatd:{R}:bans     ban key -> JSON               chatd:{R}:epoch  the run of this Redis
    chatd:{R}:events   the pub/sub channel

The Lua scripts make each step atomic: EMIT numbers events (INCR), keeps them in
the stream (XADD, its ID the number, trimmed to ``history``) and publishes them;
CLAIM takes a name and all its look-alike keys or names who has one; REAP ends a
node whose lease ran out, its users' leaves emitted once, by whichever node saw it
first.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from chatd.core.cluster import Sequencer

Post = Callable[[list[tuple[Any, ...]]], None]

_EMIT_FN = """
local lines = {}
local function emit(payload)
  local seq = redis.call('INCR', KEYS[1])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], seq .. '-0', 'e', payload)
  lines[#lines + 1] = seq .. ' ' .. payload
  return seq
end
local function publish()
  if #lines > 0 then redis.call('PUBLISH', ARGV[2], table.concat(lines, '\\n')) end
end
"""

# KEYS seq log; ARGV history channel payload...
EMIT = (
    _EMIT_FN
    + """
local seq = 0
for i = 3, #ARGV do seq = emit(ARGV[i]) end
publish()
return seq
"""
)

# KEYS names users; ARGV owner name casefolded info key... -> "" new, "=" ours, or a name
CLAIM = """
local mine = ARGV[1] .. '\\t' .. ARGV[2]
local ours = true
for i = 5, #ARGV do
  local held = redis.call('HGET', KEYS[1], ARGV[i])
  if held and held ~= mine then
    local tab = string.find(held, '\\t', 1, true)
    return string.sub(held, tab + 1)
  end
  if not held then ours = false end
end
for i = 5, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], mine) end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
if ours then return '=' end
return ''
"""

# KEYS names users; ARGV owner name casefolded key...
RELEASE = """
local mine = ARGV[1] .. '\\t' .. ARGV[2]
for i = 4, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == mine then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
local u = redis.call('HGET', KEYS[2], ARGV[3])
if u and cjson.decode(u)['owner'] == ARGV[1] then redis.call('HDEL', KEYS[2], ARGV[3]) end
return 1
"""

# KEYS lease nodes epoch; ARGV token lease_ms node info epoch take_over
# -> {"dup", pttl} or {"ok", epoch}
REGISTER = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] and ARGV[6] ~= '1' then
  return {'dup', redis.call('PTTL', KEYS[1]), held, redis.call('HGET', KEYS[2], ARGV[3]) or ''}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('SET', KEYS[3], ARGV[5], 'NX')
return {'ok', redis.call('GET', KEYS[3])}
"""

# KEYS lease nodes; ARGV token lease_ms node info -> 1, or 0 when the lease is not ours
REFRESH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

# KEYS seq log lease nodes names users; ARGV history channel node force why silent
# -> how many users left, or -1 when the node is alive
REAP = (
    _EMIT_FN
    + """
if ARGV[4] ~= '1' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
redis.call('HDEL', KEYS[4], ARGV[3])
local gone = 0
local all = redis.call('HGETALL', KEYS[6])
for i = 1, #all, 2 do
  local u = cjson.decode(all[i + 1])
  if u['node'] == ARGV[3] then
    redis.call('HDEL', KEYS[6], all[i])
    local mine = u['owner'] .. '\\t' .. u['name']
    for _, k in ipairs(u['keys']) do
      if redis.call('HGET', KEYS[5], k) == mine then redis.call('HDEL', KEYS[5], k) end
    end
    local text = u['name'] .. ' left (server ' .. ARGV[3] .. ' ' .. ARGV[5] .. ')'
    if ARGV[6] ~= '1' then
      emit(cjson.encode({t = 'leave', n = u['name'], node = ARGV[3], x = text, lost = true}))
    end
    gone = gone + 1
  end
end
publish()
return gone
"""
)


class Duplicate(Exception):
    """A live node has this node's name."""


class Keys:
    def __init__(self, room: str, node: str) -> None:
        base = f"chatd:{{{room}}}:"
        self.seq = base + "seq"
        self.log = base + "log"
        self.names = base + "names"
        self.users = base + "users"
        self.nodes = base + "nodes"
        self.bans = base + "bans"
        self.epoch = base + "epoch"
        self.channel = base + "events"
        self.base = base
        self.lease = self.lease_of(node)

    def lease_of(self, node: str) -> str:
        return f"{self.base}lease:{node}"


# Events in one EMIT, whose one pub/sub message every node reads: far below Redis'
# output buffer limit for pub/sub clients (32 MiB by default), a replay of a long
# outage included.
EMIT_MAX = 256
EMIT_BYTES = 64 * 1024
SOCKET_TIMEOUT = 2.0  # seconds a Redis command may take before the link counts as down
BACKOFF = (0.2, 5.0)  # seconds between reconnects: from, doubling up to


def dead_predecessor(info_text: str) -> bool:
    """Whether the live-looking node of our name was a chatd on this host that no
    longer runs (killed: its lease has not run out yet)."""
    try:
        info = json.loads(info_text)
        pid = int(info["pid"])
    except (ValueError, KeyError, TypeError):
        return False
    if info.get("host") != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class RedisLink(threading.Thread):
    def __init__(
        self,
        url: str,
        password: str | None,
        node: str,
        room: str,
        lease: float,
        history: int,
        post: Post,
    ) -> None:
        super().__init__(name="chatd-redis", daemon=True)
        self.url = url
        self.password = password
        self.node = node
        self.keys = Keys(room, node)
        self.lease_ms = int(lease * 1000)
        self.history = history
        self.post = post
        self.token = f"{os.getpid()}-{uuid.uuid4().hex}"
        self.info: dict[str, Any] = {}  # set by the loop: what the nodes listing shows
        self.inbox: queue.SimpleQueue[list[tuple[Any, ...]]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._halt = threading.Event()
        self._inflight: list[tuple[Any, ...]] = []
        self.last: int | None = None  # the last sequence number handed to the loop
        self.epoch: str | None = None
        self._known_nodes: set[str] = set()
        self._first = True
        # A restart that keeps the connections (handover): this node's lease and users
        # are taken over from the chatd before, not refused, and not announced again.
        self.taking_over = False
        self.quietly = False  # taking over in a handover: the users stay, nobody is told
        self.handed_over = False  # the next chatd has this node: leave Redis as it is
        self.redis: Any = None
        self.s_emit: Any = None
        self.s_claim: Any = None
        self.s_release: Any = None
        self.s_register: Any = None
        self.s_refresh: Any = None
        self.s_reap: Any = None

    # From the loop.

    def send(self, ops: list[tuple[Any, ...]]) -> None:
        self.inbox.put(ops)
        self._wake()

    def stop(self, timeout: float = 3.0) -> None:
        self._halt.set()
        self._wake()
        self.join(timeout)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")

    # Talking to Redis.

    def connect(self) -> Any:
        r = redis.Redis.from_url(
            self.url,
            password=self.password,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            decode_responses=True,
            health_check_interval=0,
        )
        r.ping()
        self.redis = r
        self.s_emit = r.register_script(EMIT)
        self.s_claim = r.register_script(CLAIM)
        self.s_release = r.register_script(RELEASE)
        self.s_register = r.register_script(REGISTER)
        self.s_refresh = r.register_script(REFRESH)
        self.s_reap = r.register_script(REAP)
        return r

    def register(self) -> str:
        """Take this node's lease; raises Duplicate when a live node has the name.
        Returns the epoch of this Redis's data."""
        k = self.keys
        res = self.s_register(
            keys=[k.lease, k.nodes, k.epoch],
            args=[
                self.token,
                self.lease_ms,
                self.node,
                self._info(),
                uuid.uuid4().hex,
                "1" if self.taking_over and self._first else "0",
            ],
        )
        if res[0] == "dup" and dead_predecessor(str(res[3])):
            self.taking_over = True  # a chatd of this node on this host, killed: ours now
            return self.register()
        if res[0] == "dup":
            left = max(0, int(res[1])) / 1000
            raise Duplicate(
                f"a node called {self.node!r} is live in room {k.base.split('{')[1][:-2]!r} "
                f"(its lease runs out within {left:.0f} s unless it is alive)"
            )
        return str(res[1])

    def close_redis(self) -> None:
        r, self.redis = self.redis, None
        if r is not None:
            with contextlib.suppress(Exception):
                r.close()

    def _info(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), **self.info})

    def _reap(self, node: str, force: bool, why: str, silent: bool = False) -> int:
        k = self.keys
        return int(
            self.s_reap(
                keys=[k.seq, k.log, k.lease_of(node), k.nodes, k.names, k.users],
                args=[
                    self.history,
                    k.channel,
                    node,
                    "1" if force else "0",
                    why,
                    "1" if silent else "0",
                ],
            )
        )

    # The thread.

    def run(self) -> None:
        delay = BACKOFF[0]
        while not self._halt.is_set():
            began = time.monotonic()
            error = None
            try:
                self._session()
            except Duplicate as e:
                error = str(e)
            except (redis.RedisError, OSError, ValueError) as e:
                error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            self.close_redis()
            if self._halt.is_set():
                break
            unsent = self._inflight + self._drain_inbox()
            self._inflight = []
            self.post([("down", error, unsent)])
            if time.monotonic() - began > 10:
                delay = BACKOFF[0]  # it was up a while: retry soon
            self._sleep(delay)
            delay = min(delay * 2, BACKOFF[1])

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._halt.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            select.select([self._wake_r], [], [], left)
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)

    def _drain_inbox(self) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        while True:
            try:
                out.extend(self.inbox.get_nowait())
            except queue.Empty:
                return out

    def _session(self) -> None:
        if self.redis is None:
            self.connect()
        unsent = self._drain_inbox()  # handed over while the loop took the link as down
        if unsent:
            self.post([("unsent", unsent)])
        k = self.keys
        epoch = self.register()
        r = self.redis
        if self._first:
            # What a chatd of this name left behind: killed before it could say so, or
            # the chatd before this one, whose users are ours now (claimed anew, quietly).
            self._reap(self.node, True, "restarted", silent=self.quietly)
        ps = r.pubsub()
        ps.subscribe(k.channel)
        deadline = time.monotonic() + SOCKET_TIMEOUT
        while True:
            msg = ps.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if msg is not None and msg["type"] == "subscribe":
                break
            if time.monotonic() >= deadline:
                raise redis.TimeoutError("no answer to SUBSCRIBE")
        pipe = r.pipeline(transaction=True)
        pipe.hgetall(k.users)
        pipe.get(k.seq)
        pipe.hgetall(k.bans)
        users, seq_text, bans = pipe.execute()
        now_seq = int(seq_text or 0)
        out: list[tuple[Any, ...]] = []
        lost_history = self.epoch is not None and epoch != self.epoch
        self.epoch = epoch
        if self.last is None:  # the first time: what was said before is not ours to show
            self.last = now_seq
        elif lost_history or now_seq < self.last:
            # Redis lost its data (a restart without persistence): what the others
            # said before is gone, and the new log, from its start, is all new to us.
            out.append(("missed", None))
            out.append(("log", "resync", {"from_seq": self.last, "to_seq": now_seq, "lost": "all"}))
            self.last = 0
        seqr = Sequencer(self.last)
        if now_seq > self.last:
            first = self.last
            found = self._range(first + 1, now_seq)
            ready, missed = seqr.fill(found, now_seq)
            if missed:  # the history lost the oldest: told before what it still had
                out.append(("missed", missed))
            out.extend(("ev", s, e, False) for s, e in ready)
            out.append(
                (
                    "log",
                    "resync",
                    {"from_seq": first, "to_seq": now_seq, "events": len(ready), "missed": missed},
                )
            )
        self.last = seqr.last
        out.append(
            ("up", [json.loads(v) for v in users.values()], list(bans.values()), self._first)
        )
        self._first = False
        self.post(out)
        self._tick(r)
        next_tick = time.monotonic() + self.lease_ms / 3000
        sock = ps.connection._sock
        while not self._halt.is_set():
            out = []
            try:
                while True:
                    msg = ps.get_message(timeout=0)
                    if msg is None:
                        break
                    if msg["type"] == "message":
                        self._arrived(seqr, msg["data"], out)
                ops = self._drain_inbox()
                if ops:
                    self._inflight = ops
                    out.extend(self._execute(r, ops))
                    self._inflight = []
            finally:  # what arrived before a failure is the loop's all the same
                if out:
                    self.post(out)
            if time.monotonic() >= next_tick:
                self._tick(r)
                next_tick = time.monotonic() + self.lease_ms / 3000
            wait = max(0.0, next_tick - time.monotonic())
            readable, _, _ = select.select([sock, self._wake_r], [], [], wait)
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
        with contextlib.suppress(Exception):
            ps.close()
        with contextlib.suppress(Exception):  # the last pass's: the users' leaves
            ops = self._drain_inbox()
            if ops:
                self._execute(r, ops)
        if self.handed_over:
            return
        with contextlib.suppress(Exception):  # a clean stop: the others need not wait
            r.delete(k.lease)
            self._reap(self.node, True, "stopped")

    def _arrived(self, seqr: Sequencer, data: str, out: list[tuple[Any, ...]]) -> None:
        """A pub/sub message: one line per event, "SEQ JSON" (JSON has no raw newline)."""
        ready = []
        for line in data.split("\n"):
            head, _, payload = line.partition(" ")
            try:
                seq, event = int(head), json.loads(payload)
            except ValueError:
                continue  # not ours
            ready.extend(seqr.feed(seq, event))
        gap = seqr.gap
        if gap is not None:
            found = self._range(*gap)
            before = len(ready)
            filled, missed = seqr.fill(found, gap[1])
            if missed:  # after what came before the gap, before what the history had
                out.extend(("ev", s, e, True) for s, e in ready[:before])
                out.append(("missed", missed))
                ready = ready[before:]
            ready.extend(filled)
        out.extend(("ev", s, e, True) for s, e in ready)
        self.last = seqr.last

    def _range(self, first: int, last: int) -> list[tuple[int, Any]]:
        entries = self.redis.xrange(self.keys.log, f"{first}-0", f"{last}-0")
        found = []
        for entry_id, fields in entries:
            with contextlib.suppress(ValueError, KeyError):
                found.append((int(entry_id.split("-")[0]), json.loads(fields["e"])))
        return found

    def _execute(self, r: Any, ops: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        k = self.keys
        pipe = r.pipeline(transaction=False)
        plan: list[tuple[Any, ...]] = []
        emits: list[str] = []
        size = 0

        def flush_emits() -> None:
            nonlocal size
            size = 0
            if emits:
                self.s_emit(
                    keys=[k.seq, k.log], args=[self.history, k.channel, *emits], client=pipe
                )
                plan.append(("emit",))
                emits.clear()

        for op in ops:
            kind = op[0]
            if kind == "emit":
                emits.append(op[1])
                size += len(op[1])
                if len(emits) >= EMIT_MAX or size >= EMIT_BYTES:
                    flush_emits()  # one pub/sub message stays small for every reader
                continue
            flush_emits()
            if kind == "claim":
                _, cid, owner, name, cf, keys, info = op
                self.s_claim(
                    keys=[k.names, k.users], args=[owner, name, cf, info, *keys], client=pipe
                )
                plan.append(("claim", cid))
            elif kind == "release":
                _, owner, name, cf, keys = op
                self.s_release(keys=[k.names, k.users], args=[owner, name, cf, *keys], client=pipe)
                plan.append(("release",))
            elif kind == "ban":
                pipe.hset(k.bans, op[1], op[2])
                plan.append(("ban",))
            elif kind == "unban":
                pipe.hdel(k.bans, op[1])
                plan.append(("unban",))
            elif kind == "bans_merge":
                for key, value in op[1]:
                    pipe.hsetnx(k.bans, key, value)
                    plan.append(("ban",))
        flush_emits()
        results = pipe.execute()
        out: list[tuple[Any, ...]] = []
        for step, result in zip(plan, results, strict=True):
            if step[0] == "claim":
                out.append(("claimed", step[1], result))
        return out

    def _tick(self, r: Any) -> None:
        """Keep the lease; list the nodes; end those whose lease ran out."""
        k = self.keys
        if not self.s_refresh(
            keys=[k.lease, k.nodes], args=[self.token, self.lease_ms, self.node, self._info()]
        ):
            raise redis.ConnectionError("this node's lease ran out; registering again")
        nodes = r.hgetall(k.nodes)
        pipe = r.pipeline(transaction=False)
        names = sorted(nodes)
        for name in names:
            pipe.pttl(k.lease_of(name))
        ttls = pipe.execute()
        listing = []
        out: list[tuple[Any, ...]] = []
        alive = set()
        for name, ttl in zip(names, ttls, strict=True):
            if ttl == -2 and name != self.node:
                gone = self._reap(name, False, "lost")
                if gone >= 0:
                    out.append(("log", "node_lost", {"node": name, "users": gone}))
                continue
            alive.add(name)
            try:
                info = json.loads(nodes[name])
            except ValueError:
                info = {}
            listing.append({"node": name, "lease": round(max(0, ttl) / 1000, 3), **info})
        for name in sorted(alive - self._known_nodes - {self.node}):
            out.append(("log", "node_joined", {"node": name}))
        self._known_nodes = alive
        out.append(("nodes", listing))
        self.post(out)
