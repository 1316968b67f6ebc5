"""The cluster's pure parts: its config keys, and the order of the shared log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fakes import NOTICE_SENDER, Room

from chatd.core.bans import Ban
from chatd.core.cluster import Cluster, RemoteUser, Sequencer
from chatd.server import config
from chatd.server.config import ConfigError


def load(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "chatd.yaml"
    p.write_text(text)
    return config.load(p)


def test_cluster_is_off_by_default() -> None:
    c = config.defaults().cluster
    assert (c.redis, c.node, c.lease, c.history, c.room, c.required) == (
        "",
        "",
        10.0,
        10000,
        "chatd",
        False,
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost",
        "rediss://redis.lan:6380/2",
        "redis://:secret@10.0.0.1:6379/0",
        "redis://[::1]:6379",
        "unix:///run/redis/redis-server.sock",
    ],
)
def test_redis_urls(tmp_path: Path, url: str) -> None:
    assert load(tmp_path, f"cluster:\n  redis: '{url}'\n").cluster.redis == url


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("redis: http://x", "cluster.redis: expected a URL such as redis://"),
        (
            "redis: 'redis://:pw@host:99999'",
            "expected a port 1-65535 in the URL, got 'redis://:***@host:99999'",
        ),
        ("redis: 'redis://h/x'", "expected a database number"),
        ("redis: 'unix://rel/path'", "expected unix:///ABSOLUTE/PATH"),
        ("node: 'a b'", "cluster.node: expected a name of letters"),
        ("room: ''", "cluster.room: expected a name"),
        ("lease: 0", "cluster.lease: expected seconds from 1 to 3600"),
        ("history: true", "cluster.history: expected an integer"),
        ("required: 1", "cluster.required: expected true or false"),
        ("password_file: rel", "cluster.password_file: expected an absolute path"),
        ("sentinel: x", "cluster.sentinel: unknown setting"),
    ],
)
def test_bad_cluster_settings(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, f"cluster:\n  {text}\n")
    assert error in str(e.value)
    assert "pw" not in str(e.value)


def test_password_is_redacted() -> None:
    assert config.redacted_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert config.redacted_url("rediss://u:pw@h") == "rediss://u:***@h"
    assert config.redacted_url("redis://h:1/0") == "redis://h:1/0"


def ev(n: int) -> dict[str, object]:
    return {"t": "m", "x": str(n)}


def test_sequencer_in_order_and_twice() -> None:
    s = Sequencer(0)
    assert s.feed(1, ev(1)) == [(1, ev(1))]
    assert s.feed(1, ev(1)) == []
    assert s.feed(2, ev(2)) == [(2, ev(2))]
    assert s.gap is None


def test_sequencer_gap_filled_from_history() -> None:
    s = Sequencer(1)
    assert s.feed(4, ev(4)) == []
    assert s.gap == (2, 3)
    ready, missed = s.fill([(2, ev(2)), (3, ev(3))], 3)
    assert [n for n, _ in ready] == [2, 3, 4]
    assert missed == 0
    assert s.last == 4


def test_sequencer_gap_past_history_counts_the_missed() -> None:
    s = Sequencer(10)
    s.feed(20, ev(20))
    ready, missed = s.fill([(18, ev(18)), (19, ev(19))], 19)
    assert [n for n, _ in ready] == [18, 19, 20]
    assert missed == 7


# The chat with a backplane, the shared log played by a list (no Redis).


class FakeBackplane:
    node = "a"

    def __init__(self) -> None:
        self.live = True
        self.log: list[dict[str, object]] = []
        self.claims: list[tuple[object, str]] = []
        self.released: list[str] = []
        self.nodes: list[dict[str, object]] = []

    def emit(self, event: dict[str, object]) -> None:
        self.log.append({**event, "node": self.node})

    def claim(self, m: object, name: str) -> None:
        self.claims.append((m, name))

    def release(self, m: object, text: str | None = None) -> None:
        self.released.append(m.name)  # type: ignore[attr-defined]

    def ban(self, ban: Ban) -> None:
        self.emit({"t": "ban", "ban": ban.to_json()})

    def unban(self, ban: Ban) -> None:
        self.emit({"t": "unban", "kind": ban.kind, "target": ban.target})

    def kick(self, user: RemoteUser, reason: str, by: int) -> None:
        self.emit({"t": "kick", "n": user.name, "on": user.node, "why": reason, "by": by})

    def status(self) -> dict[str, object]:
        return {"node": self.node, "link": "up" if self.live else "down"}


class ClusterRoom(Room):
    def __init__(self) -> None:
        super().__init__()
        self.bp = FakeBackplane()
        self.chat.backplane = self.bp
        self.chat.cluster = Cluster(self.chat, "a")

    def join(self, name: str, addr: str = "10.0.0.1") -> object:
        m = self.connect(addr)
        self.chat.name_received(m, name)
        if self.bp.live:
            assert self.bp.claims[-1] == (m, name)
            assert self.chat.cluster is not None
            self.chat.cluster.claimed(m, name, None)
        self.deliver()
        return m

    def deliver(self) -> None:
        """The log's events come back, in order, as they would from Redis."""
        cluster = self.chat.cluster
        assert cluster is not None
        log, self.bp.log = self.bp.log, []
        for event in log:
            cluster.apply(event)
        self.flush()


def test_a_message_is_delivered_when_it_comes_back_from_the_log() -> None:
    r = ClusterRoom()
    alice, bob = r.join("alice"), r.join("bob")
    alice.take(), bob.take()  # type: ignore[attr-defined]
    r.say(alice, "hi")  # type: ignore[arg-type]
    r.flush()
    assert bob.take() == []  # type: ignore[attr-defined]
    assert r.bp.log[-1]["t"] == "m"
    r.deliver()
    assert bob.take() == [("alice", "hi")]  # type: ignore[attr-defined]
    assert alice.take() == []  # type: ignore[attr-defined]


def test_other_nodes_users_in_who_welcome_and_msg() -> None:
    r = ClusterRoom()
    cluster = r.chat.cluster
    assert cluster is not None
    cluster.apply({"t": "join", "n": "carol", "node": "b", "peer": "10.0.0.9:1", "since": 1.0})
    alice = r.join("alice")
    assert alice.notices()[0] == "welcome, alice; online: carol"  # type: ignore[attr-defined]
    r.say(alice, "/who")  # type: ignore[arg-type]
    r.flush()
    assert alice.notices()[-1] == "online (2): alice, carol"  # type: ignore[attr-defined]
    r.say(alice, "/msg CAROL psst")  # type: ignore[arg-type]
    assert r.bp.log[-1] == {"t": "p", "n": "alice", "to": "carol", "x": "psst", "node": "a"}
    r.deliver()
    assert alice.take()[-1] == ("alice -> carol (private)", "psst")  # type: ignore[attr-defined]
    cluster.apply({"t": "leave", "n": "carol", "node": "b", "x": "carol left (server b lost)"})
    r.flush()
    assert alice.notices()[-1] == "carol left (server b lost)"  # type: ignore[attr-defined]
    assert cluster.users == {}


def test_a_claim_refused_by_the_cluster() -> None:
    r = ClusterRoom()
    m = r.connect()
    r.chat.name_received(m, "alice")
    assert r.chat.cluster is not None
    r.chat.cluster.claimed(m, "alice", "Alice")
    assert m.closed is not None
    r2 = ClusterRoom()
    m2 = r2.connect()
    r2.chat.name_received(m2, "a1ice")
    assert r2.chat.cluster is not None
    r2.chat.cluster.claimed(m2, "a1ice", "alice")
    assert b"looks like 'alice'" in (m2.closed or b"")


def test_link_down_delivers_here_and_keeps_it_for_the_others() -> None:
    r = ClusterRoom()
    alice, bob = r.join("alice"), r.join("bob")
    alice.take(), bob.take()  # type: ignore[attr-defined]
    r.bp.live = False
    r.say(alice, "while down")  # type: ignore[arg-type]
    r.flush()
    assert bob.take() == [("alice", "while down")]  # type: ignore[attr-defined]
    # Replayed later (the backplane marks it), it is not shown here twice.
    event = {**r.bp.log[-1], "replay": True}
    assert r.chat.cluster is not None
    r.chat.cluster.apply(event)
    r.flush()
    assert bob.take() == []  # type: ignore[attr-defined]
    # A message delivered here when the link failed under it, found in the log after all.
    r.chat.cluster.delivered.add("a:1")
    r.chat.cluster.apply(
        {"t": "m", "n": "alice", "x": "dup", "k": "message", "node": "a", "mid": "a:1"}
    )
    r.flush()
    assert bob.take() == []  # type: ignore[attr-defined]
    assert r.chat.cluster.delivered == set()


def test_kick_and_ban_events_from_other_nodes() -> None:
    r = ClusterRoom()
    alice, eve = r.join("alice"), r.join("eve")
    assert r.chat.cluster is not None
    r.chat.cluster.apply({"t": "kick", "n": "eve", "on": "a", "why": "spam", "by": 0, "node": "b"})
    assert eve.closed is not None and b"kicked by an admin: spam" in eve.closed  # type: ignore[attr-defined]
    ban = Ban("name", "mallory", "", 1.0, None, 0)
    r.chat.cluster.apply({"t": "ban", "ban": ban.to_json(), "node": "b"})
    assert r.chat.bans.match_name("mallory", 2.0) is not None
    r.chat.cluster.apply({"t": "unban", "kind": "name", "target": "mallory", "node": "b"})
    assert r.chat.bans.match_name("mallory", 2.0) is None
    assert alice is not None


def test_a_node_claimed_anew_is_not_announced_twice() -> None:
    r = ClusterRoom()
    alice = r.join("alice")
    alice.take()  # type: ignore[attr-defined]
    assert r.chat.cluster is not None
    carol = {"t": "join", "n": "carol", "node": "b", "peer": "", "since": 1.0}
    r.chat.cluster.apply(carol)
    r.chat.cluster.snapshot([])  # the link came back; Redis had lost its users
    r.chat.cluster.apply({**carol, "again": True})
    r.chat.cluster.apply({"t": "join", "n": "alice", "node": "a", "since": 1.0, "again": True})
    r.flush()
    assert alice.notices() == ["carol joined"]  # type: ignore[attr-defined]


def test_missed_notices() -> None:
    r = ClusterRoom()
    alice = r.join("alice")
    alice.take()  # type: ignore[attr-defined]
    assert r.chat.cluster is not None
    r.chat.cluster.missed(12)
    r.chat.cluster.missed(None)
    r.flush()
    got = alice.notices()  # type: ignore[attr-defined]
    assert got[0].startswith("you may have missed 12 messages")
    assert got[1].startswith("the shared history was lost")
    assert NOTICE_SENDER == "chatd"


def test_past_the_outbox_an_outage_s_messages_are_not_kept_and_that_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut off from Redis, a node keeps what its users say for the others, up to
    OUTBOX_MAX; past it the rest reaches this node alone, logged once, and counted
    in the cluster_link_up event of the link's return."""
    from structlog.testing import capture_logs

    from chatd.server import cluster as link_module
    from chatd.server.server import Server

    monkeypatch.setattr(link_module, "OUTBOX_MAX", 2)
    cfg = config.build(
        {
            "listen": ["127.0.0.1:0"],
            "control": {"socket": ""},
            "state_file": str(tmp_path / "state.json"),
            "cluster": {"redis": "redis://127.0.0.1:9/0", "node": "a"},
        },
        "<test>",
    )
    server = Server(cfg)
    try:
        link = server.link
        assert link is not None and not link.live  # never opened: the link is down
        with capture_logs() as logs:
            for i in range(5):
                link.emit({"t": "m", "n": "alice", "x": f"m{i}"})
        assert [e["x"] for e in link.outbox] == ["m0", "m1"]
        full = [e for e in logs if e["event"] == "cluster_outbox_full"]
        assert [(e["kept"], e["kind"]) for e in full] == [(2, "m")]
        assert link.outbox_dropped == 3
    finally:
        server.close_all()


# Cluster.apply, event by event (mutation testing: each branch and field checked).


def two_here() -> tuple[ClusterRoom, Cluster, Any, Any]:
    r = ClusterRoom()
    alice, bob = r.join("alice"), r.join("bob")
    alice.take(), bob.take()  # type: ignore[attr-defined]
    assert r.chat.cluster is not None
    return r, r.chat.cluster, alice, bob


def test_messages_from_the_log_here_and_from_elsewhere() -> None:
    r, cluster, alice, bob = two_here()
    r.chat.history.ring.clear()
    cluster.apply({"t": "m", "n": "carol", "x": "from b", "node": "b", "mid": "b:1"})
    cluster.apply({"t": "m", "n": "carol", "x": "waves", "k": "action", "node": "b"})
    cluster.apply({"t": "m", "n": "alice", "x": "mine", "node": "a", "mid": "a:7"})
    cluster.apply({"t": "m", "n": "alice", "x": "old", "node": "a", "replay": True})
    # Another node's message marked as a replay is news here.
    cluster.apply({"t": "m", "n": "carol", "x": "late", "node": "b", "replay": True})
    r.flush()
    assert bob.take() == [  # type: ignore[attr-defined]
        ("carol", "from b"),
        ("* carol", "waves"),
        ("alice", "mine"),
        ("carol", "late"),
    ]
    assert alice.take() == [  # type: ignore[attr-defined]
        ("carol", "from b"),
        ("* carol", "waves"),
        ("carol", "late"),
    ]  # never her own
    # The room's history, on every node: messages, not actions or replays of ours.
    assert [(n, x) for _, _, n, x in r.chat.history.ring] == [
        ("carol", "from b"),
        ("alice", "mine"),
        ("carol", "late"),
    ]


def test_private_messages_from_the_log() -> None:
    r, cluster, alice, bob = two_here()
    cluster.apply({"t": "p", "n": "carol", "to": "bob", "x": "psst", "node": "b"})
    cluster.apply({"t": "p", "n": "alice", "to": "carol", "x": "hey", "node": "a"})
    cluster.apply({"t": "p", "n": "alice", "to": "bob", "x": "yo", "node": "a"})
    cluster.apply({"t": "p", "n": "carol", "to": "nobody", "x": "lost", "node": "b"})
    cluster.delivered.add("a:3")
    cluster.apply({"t": "p", "n": "alice", "to": "bob", "x": "twice", "node": "a", "mid": "a:3"})
    r.flush()
    assert bob.take() == [("carol (private)", "psst"), ("alice (private)", "yo")]  # type: ignore[attr-defined]
    assert alice.take() == [  # type: ignore[attr-defined]
        ("alice -> carol (private)", "hey"),
        ("alice -> bob (private)", "yo"),
    ]
    assert cluster.delivered == set()


def test_notices_joins_and_leaves_from_the_log() -> None:
    r, cluster, alice, bob = two_here()
    cluster.apply({"t": "s", "x": "maintenance", "node": "b", "ex": "alice"})
    cluster.apply({"t": "s", "x": "to all but bob", "node": "a", "ex": "bob"})
    r.flush()
    # "ex" counts only for a notice of this node's ("to all but bob" is not for bob).
    assert alice.notices() == ["maintenance", "to all but bob"]  # type: ignore[attr-defined]
    assert bob.notices() == ["maintenance"]  # type: ignore[attr-defined]
    join = {"t": "join", "n": "Carol", "node": "b", "peer": "10.0.0.9:5", "since": 3.0}
    cluster.apply(join)
    assert cluster.users == {"carol": RemoteUser("Carol", "b", "10.0.0.9:5", 3.0)}
    cluster.apply({"t": "join", "n": "dave", "node": "c", "since": 4.0}, roster=False)
    assert "dave" not in cluster.users  # in the snapshot already, if at all
    r.flush()
    assert bob.notices()[1:] == ["Carol and dave joined"]  # type: ignore[attr-defined]
    # A leave of another node's user only takes it off if that node had it.
    cluster.apply({"t": "leave", "n": "carol", "node": "c", "x": "carol left (quit)"})
    assert "carol" in cluster.users
    cluster.apply({"t": "leave", "n": "CAROL", "node": "b", "x": "Carol left (quit)"})
    assert cluster.users == {}
    cluster.apply({"t": "leave", "n": "alice", "node": "a", "x": "alice left (x)", "replay": True})
    r.flush()
    assert bob.notices()[2:] == ["carol left (quit)", "Carol left (quit)"]  # type: ignore[attr-defined]


def test_a_kick_for_another_node_or_nobody_does_nothing_here() -> None:
    r, cluster, alice, bob = two_here()
    cluster.apply({"t": "kick", "n": "bob", "on": "b", "why": "spam", "by": 0, "node": "b"})
    cluster.apply({"t": "kick", "n": "nobody", "on": "a", "why": "x", "by": 0, "node": "b"})
    assert bob.closed is None and alice.closed is None  # type: ignore[attr-defined]
    cluster.apply({"t": "kick", "n": "bob", "on": "a", "node": "b"})
    assert bob.closed is not None  # type: ignore[attr-defined]
    assert r.chat.stats.kicks == 1


def test_our_own_ban_events_are_not_applied_twice() -> None:
    r, cluster, _, bob = two_here()
    saved: list[int] = []
    r.host.save_bans = lambda bans: saved.append(len(bans))  # type: ignore[method-assign]
    ban = Ban("name", "bob", "spam", 1.0, None, 0)
    cluster.apply({"t": "ban", "ban": ban.to_json(), "node": "a"})
    assert r.chat.bans.match_name("bob", 2.0) is None and saved == []
    cluster.apply({"t": "ban", "ban": ban.to_json(), "node": "b"})
    assert r.chat.bans.match_name("bob", 2.0) is not None and saved == [1]
    assert bob.closed is not None  # type: ignore[attr-defined]  # enforced at once
    cluster.apply({"t": "unban", "kind": "name", "target": "bob", "node": "a"})
    assert r.chat.bans.match_name("bob", 2.0) is not None
    cluster.apply({"t": "unban", "kind": "name", "target": "nobody", "node": "b"})
    assert saved == [1]
    cluster.apply({"t": "unban", "kind": "name", "target": "bob", "node": "b"})
    assert r.chat.bans.match_name("bob", 2.0) is None and saved == [1, 0]


def test_what_a_user_says_goes_to_the_log_counted_and_logged() -> None:
    from structlog.testing import capture_logs

    r, _, alice, bob = two_here()
    with capture_logs() as logs:
        r.say(alice, "hi")  # type: ignore[arg-type]
        r.say(alice, "/me waves")  # type: ignore[arg-type]
        r.say(alice, "/msg bob psst")  # type: ignore[arg-type]
    assert [{k: e[k] for k in e if k != "node"} for e in r.bp.log] == [
        {"t": "m", "n": "alice", "x": "hi", "k": "message"},
        {"t": "m", "n": "alice", "x": "waves", "k": "action"},
        {"t": "p", "n": "alice", "to": "bob", "x": "psst"},
    ]
    said = [(e.get("kind"), e.get("to"), e["text"]) for e in logs if e["event"] == "message"]
    assert said == [(None, None, "hi"), ("action", None, "waves"), ("private", "bob", "psst")]
    assert alice.messages == 3 and r.chat.stats.messages == 3  # type: ignore[attr-defined]
    r.flush()
    assert bob.take() == []  # type: ignore[attr-defined]  # not before the log has it
    # With the link down: here at once (and in the history), kept for the others.
    r.bp.live = False
    r.chat.history.ring.clear()
    r.say(alice, "down")  # type: ignore[arg-type]
    r.say(alice, "/me shrugs")  # type: ignore[arg-type]
    r.flush()
    assert bob.take() == [("alice", "down"), ("* alice", "shrugs")]  # type: ignore[attr-defined]
    assert [x for _, _, _, x in r.chat.history.ring] == ["down"]
    assert [e["x"] for e in r.bp.log[3:]] == ["down", "shrugs"]


def test_the_cluster_s_answer_to_a_claim() -> None:
    r = ClusterRoom()
    m = r.connect()
    r.chat.name_received(m, "alice")
    assert r.chat.cluster is not None
    r.chat.cluster.claimed(m, "alice", None)
    assert m.state == "joined" and m.name == "alice"
    # An answer for a connection gone meanwhile gives the name back.
    gone = r.connect()
    r.chat.name_received(gone, "bob")
    r.chat.drop(gone, "closed")
    r.chat.cluster.claimed(gone, "bob", None)
    assert r.bp.released[-1] == "bob"
    # Taken there: the same name, or one like it.
    taken = r.connect()
    r.chat.name_received(taken, "carol")
    r.chat.cluster.claimed(taken, "carol", "CAROL")
    assert b"name rejected" in (taken.closed or b"") and b"looks like" not in (taken.closed or b"")
    assert r.chat.stats.rejected == {"name taken": 1}
