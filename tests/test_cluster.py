"""Several chatd nodes in one room over a real redis-server (no mocks)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers import NOTICE, Daemon


def test_messages_go_every_way(node: Callable[..., Daemon]) -> None:
    a, b = node("a"), node("b")
    a.wait_for("cluster_link_up")
    b.wait_for("cluster_link_up")
    alice = a.client("alice")
    bob = b.client("bob")
    alice.expect(NOTICE, "bob joined")
    alice.send("hello from a")
    assert bob.recv_text("alice") == "hello from a"  # perhaps after "alice joined"
    bob.send("hello from b")
    alice.expect("bob", "hello from b")
    alice.expect_nothing()
    bob.expect_nothing()
    # A clean stop: exit status 0, nothing on stderr, and the others see its users go.
    assert a.stop() == 0
    assert a.stderr == ""
    assert bob.recv_text(NOTICE) == "alice left (shutdown)"
    assert wait_gone(b, "alice", timeout=5) < 5


def up(*nodes: Daemon) -> None:
    for d in nodes:
        d.wait_for("cluster_link_up")


def wait_known(d: Daemon, name: str, timeout: float = 5.0) -> dict[str, Any]:
    """Wait until ``d`` lists ``name`` (a user of any node); return its entry."""
    deadline = time.monotonic() + timeout
    while True:
        users = {u["name"]: u for u in d.result("list")["users"]}
        if name in users:
            return users[name]
        assert time.monotonic() < deadline, f"{name} not listed: {users}"
        time.sleep(0.05)


def test_one_order_on_every_node_under_concurrent_senders(node: Callable[..., Daemon]) -> None:
    import threading

    nodes = [node("a"), node("b"), node("c")]
    up(*nodes)
    readers = [d.client(f"reader-{d.config['cluster']['node']}") for d in nodes]
    senders = [d.client(f"sender-{d.config['cluster']['node']}") for d in nodes]
    count = 40

    def say(c: Any) -> None:
        for i in range(count):
            c.send(f"{c.name} {i}")

    threads = [threading.Thread(target=say, args=(s,)) for s in senders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen = []
    for r in readers:
        got = []
        while len(got) < count * len(senders):
            sender, text = r.recv(10)
            if sender != NOTICE:
                got.append((sender, text))
        seen.append(got)
    assert seen[0] == seen[1] == seen[2]
    for s in senders:  # each sender's own messages in its order
        mine = [t for who, t in seen[0] if who == s.name]
        assert mine == [f"{s.name} {i}" for i in range(count)]


def test_names_are_unique_across_nodes(node: Callable[..., Daemon]) -> None:
    a, b = node("a"), node("b")
    up(a, b)
    alice = a.client("alice")
    wait_known(b, "alice")
    c = b.client()
    c.send("ALICE")
    assert c.expect_closed() == [(NOTICE, "name rejected: 'ALICE' is already taken")]
    c = b.client()
    c.send("a1ice")
    assert c.expect_closed() == [
        (NOTICE, "name rejected: 'a1ice' looks like 'alice', who is online")
    ]
    alice.close()  # the name is free again, on every node
    deadline = time.monotonic() + 5
    while "alice" in {u["name"] for u in b.result("list")["users"]}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    b.client("alice")


def test_a_name_race_between_two_nodes_has_one_winner(node: Callable[..., Daemon]) -> None:
    import threading

    a, b = node("a"), node("b")
    up(a, b)
    for round_ in range(5):
        name = f"racer{round_}"
        clients = [a.client(), b.client()]
        barrier = threading.Barrier(2)

        def go(c: Any, barrier: threading.Barrier, name: str) -> None:
            barrier.wait()
            c.send(name)

        threads = [threading.Thread(target=go, args=(c, barrier, name)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outcomes = [c.recv(5) for c in clients]
        welcomed = [o for o in outcomes if o[1].startswith(f"welcome, {name}")]
        refused = [o for o in outcomes if o[1] == f"name rejected: {name!r} is already taken"]
        assert len(welcomed) == 1 and len(refused) == 1, outcomes


def test_who_welcome_and_private_messages_cover_every_node(node: Callable[..., Daemon]) -> None:
    a, b = node("a"), node("b")
    up(a, b)
    alice = a.client("alice")
    wait_known(b, "alice")
    bob = b.client()
    bob.send("bob")
    assert bob.recv() == (NOTICE, "welcome, bob; online: alice")
    alice.expect(NOTICE, "bob joined")
    bob.send("/who")
    assert bob.recv() == (NOTICE, "online (2): bob, alice")
    bob.send("/msg ALICE psst")
    alice.expect("bob (private)", "psst")
    bob.expect("bob -> alice (private)", "psst")
    alice.send("/msg nobody x")
    alice.expect(NOTICE, "message not sent: nobody called 'nobody' is online")
    alice.send("/me waves")
    bob.expect("* alice", "waves")
    bob.close()
    alice.expect(NOTICE, "bob left (quit)")


def test_admin_list_kick_say_stats_and_nodes_across_nodes(node: Callable[..., Daemon]) -> None:
    a, b = node("a"), node("b")
    up(a, b)
    alice = a.client("alice")
    wait_known(b, "alice")
    bob = b.client("bob")
    assert alice.recv_text(NOTICE) == "bob joined"
    entry = wait_known(a, "bob")
    assert entry["node"] == "b" and entry["idle"] is None
    assert wait_known(a, "alice")["node"] == "a"
    r = a.ctl("list")
    assert r.returncode == 0 and "NODE" in r.stdout and " b " in r.stdout, r
    assert a.result("say", text="maintenance at noon") == {"recipients": 2}
    alice.expect(NOTICE, "maintenance at noon")
    bob.expect(NOTICE, "maintenance at noon")
    assert a.result("kick", name="bob", reason="spam") == {
        "kicked": "bob",
        "reason": "spam",
        "node": "b",
    }
    assert bob.expect_closed() == [(NOTICE, "you were kicked by an admin: spam")]
    alice.expect(NOTICE, "bob was kicked (spam)")
    stats = b.result("stats")["cluster"]
    assert stats["node"] == "b" and stats["link"] == "up"
    assert "redis://127.0.0.1:" in stats["redis"]
    nodes = b.result("nodes")
    assert nodes["node"] == "b"
    deadline = time.monotonic() + 5
    while {n["node"] for n in b.result("nodes")["nodes"]} != {"a", "b"}:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r = b.ctl("nodes")
    assert r.returncode == 0 and "b *" in r.stdout, r
    metrics = b.result("metrics")["text"].splitlines()
    for line in ("chatd_cluster_link_up 1.0", "chatd_cluster_nodes 2.0", "chatd_cluster_users 1.0"):
        assert line in metrics, line
    assert "chatd_cluster_replay_waiting 0.0" in metrics


def test_bans_reach_every_node_and_stay_in_redis(node: Callable[..., Daemon]) -> None:
    a, b = node("a"), node("b")
    up(a, b)
    eve = b.client("eve")
    wait_known(a, "eve")
    a.result("ban", target="eve", reason="spam")
    assert eve.expect_closed() == [(NOTICE, "you were banned by an admin: spam")]
    c = b.client()
    c.send("eve")
    assert c.expect_closed() == [(NOTICE, "name rejected: 'eve' is banned: spam")]
    assert [x["target"] for x in b.result("bans")["bans"]] == ["eve"]
    a.result("ban", target="127.0.0.1", reason="lan")
    deadline = time.monotonic() + 5
    while not any(x["target"] == "127.0.0.1/32" for x in b.result("bans")["bans"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    c = b.client()
    assert c.expect_closed() == [(NOTICE, "connection refused: your address is banned: lan")]
    # A node that joins later has the bans from Redis.
    c3 = node("c")
    up(c3)
    deadline = time.monotonic() + 5
    while len(c3.result("bans")["bans"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    b.result("unban", target="127.0.0.1")
    deadline = time.monotonic() + 5
    while len(a.result("bans")["bans"]) != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    a.client("carol")


def test_a_duplicate_node_name_refuses_to_start(node: Callable[..., Daemon], tmp_path: Any) -> None:
    from helpers import run_chatd_with

    a = node("a")
    up(a)
    r = run_chatd_with(
        tmp_path,
        {
            "control": {"socket": str(tmp_path / "dup.sock")},
            "state_file": str(tmp_path / "dup.json"),
            "cluster": {"redis": a.config["cluster"]["redis"], "node": "a"},
        },
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(
        "chatd: error: cluster.node: a node called 'a' is live in room 'chatd'"
    )


def test_required_cluster_without_redis_is_an_error(tmp_path: Any) -> None:
    from helpers import run_chatd_with
    from redis_helpers import free_port

    r = run_chatd_with(
        tmp_path,
        {
            "control": {"socket": str(tmp_path / "c.sock")},
            "state_file": str(tmp_path / "s.json"),
            "cluster": {
                "redis": f"redis://:hunter2@127.0.0.1:{free_port()}/0",
                "node": "a",
                "required": True,
            },
        },
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chatd: error: cluster.redis: redis://:***@"), r
    assert "hunter2" not in r.stderr + r.stdout


def wait_gone(d: Daemon, name: str, timeout: float) -> float:
    """Wait until ``d`` no longer lists ``name``; return how long it took."""
    began = time.monotonic()
    while name in {u["name"] for u in d.result("list")["users"]}:
        assert time.monotonic() - began < timeout, f"{name} still listed"
        time.sleep(0.05)
    return time.monotonic() - began


@pytest.mark.slow
def test_a_killed_node_s_users_leave_within_the_lease(node: Callable[..., Daemon]) -> None:
    import signal

    a, b = node("a"), node("b")
    up(a, b)
    alice = a.client("alice")
    wait_known(b, "alice")
    bob = b.client("bob")  # noqa: F841 (kept open until b is killed)
    assert alice.recv_text(NOTICE) == "bob joined"
    wait_known(a, "bob")
    b.stop(signal.SIGKILL)
    took = wait_gone(a, "bob", timeout=2 * 2 + 1)  # the lease (2 s), then one tick
    assert took <= 2 * 2 + 1
    assert alice.recv_text(NOTICE, timeout=5) == "bob left (server b lost)"
    alice.send("/who")
    assert alice.recv_text(NOTICE) == "online (1): alice"
    a.wait_for("node_lost", node="b", users=1)
    a.client("bob")  # the name is free


def until(c: Any, sender: str, text: str, timeout: float = 10) -> None:
    """Skip what arrives until ``text`` from ``sender``."""
    deadline = time.monotonic() + timeout
    while c.recv(max(0.0, deadline - time.monotonic())) != (sender, text):
        pass


def collect(c: Any, want: int, timeout: float = 10) -> list[tuple[str, str]]:
    """The next ``want`` messages from users (notices skipped)."""
    got: list[tuple[str, str]] = []
    while len(got) < want:
        sender, text = c.recv(timeout)
        if sender != NOTICE:
            got.append((sender, text))
    return got


def test_redis_killed_and_restarted_mid_chat(
    node: Callable[..., Daemon], redis_server: Any
) -> None:
    a, b = node("a"), node("b")
    up(a, b)
    alice = a.client("alice")
    wait_known(b, "alice")
    bob = b.client("bob")
    erin = b.client("erin")
    wait_known(a, "bob")
    alice.send("before")
    assert bob.recv_text("alice") == "before"
    assert erin.recv_text("alice") == "before"
    redis_server.kill()
    down = "the link to the other servers is down; messages reach this server only"
    until(alice, NOTICE, down)
    until(bob, NOTICE, down)
    a.wait_for("cluster_link_down")
    alice.send("during 1")
    bob.send("during 2")
    carol = a.client("carol")  # a user of a's alone, for now
    assert carol.name == "carol"
    alice.send("during 3")
    assert "link to the other servers down" in a.result("stats")["cluster"]["link"] or (
        a.result("stats")["cluster"]["link"] == "down"
    )
    redis_server.start()
    a.wait_for("cluster_link_up", timeout=15, replay=2)
    # b's users get what a's said meanwhile, once the link is back; and the other way.
    assert collect(bob, 2) == [("alice", "during 1"), ("alice", "during 3")]
    assert alice.recv_text("bob", timeout=10) == "during 2"
    until(carol, "bob", "during 2")
    until(erin, "alice", "during 3")
    # After the outage: one order again, on every node.
    for i in range(5):
        alice.send(f"after {i}")
        bob.send(f"after b {i}")
    seen_a, seen_b = collect(carol, 10), collect(erin, 10)
    assert seen_a == seen_b
    assert [m for m in seen_a if m[0] == "alice"] == [("alice", f"after {i}") for i in range(5)]
    # Told once of the outage, then that it is over; nobody "joined" again.
    carol.send("/who")
    got = []
    while True:
        sender, text = carol.recv()
        got.append(text)
        if text.startswith("online ("):
            break
    assert not [t for t in got if t.endswith(" joined")], got
    for c in (alice, bob):
        c.send("/who")
        texts = []
        while True:
            sender, text = c.recv()
            if sender == NOTICE:
                texts.append(text)
            if text.startswith("online ("):
                break
        assert down not in texts
    assert a.find("resync")


@pytest.mark.slow
def test_a_paused_redis_does_not_stall_the_loop(
    node: Callable[..., Daemon], redis_server: Any
) -> None:
    a, b = node("a", lease=6), node("b", lease=6)
    up(a, b)
    alice = a.client("alice")
    carol = a.client("carol")
    alice.recv_text(NOTICE)
    wait_known(b, "alice")
    redis_server.pause()
    try:
        t0 = time.monotonic()
        alice.send("/who")
        assert alice.recv_text(NOTICE, timeout=1).startswith("online (")
        assert time.monotonic() - t0 < 0.5  # the loop answers at once
        r = a.ctl("stats")
        assert r.returncode == 0
        alice.send("while paused")
        # Within the link's timeout (2 s) the message reaches a's users all the same.
        assert carol.recv_text("alice", timeout=5) == "while paused"
        assert time.monotonic() - t0 < 5
    finally:
        redis_server.resume()
    a.wait_for("cluster_link_up", timeout=15, replay=1)


@pytest.mark.slow
def test_a_node_restarted_after_kill_9_takes_its_name_back(node: Callable[..., Daemon]) -> None:
    import signal

    a, b = node("a", lease=30), node("b", lease=30)
    up(a, b)
    bob = b.client("bob")
    wait_known(a, "bob")
    alice = a.client("alice")
    assert bob.recv_text(NOTICE) == "alice joined"
    a.stop(signal.SIGKILL)
    a2 = node("a", lease=30)  # its lease has 30 s to run: the dead chatd's, on this host
    up(a2)
    assert bob.recv_text(NOTICE, timeout=5) == "alice left (server a restarted)"
    a2.client("alice")
    assert alice is not None


def test_a_name_and_messages_sent_at_once_wait_for_the_claim(node: Callable[..., Daemon]) -> None:
    """The tutorial's client sends its name and a message in one write: the message
    (longer than a name may be) waits until the cluster gave the name."""
    from helpers import frame

    a, b = node("a"), node("b")
    up(a, b)
    bob = b.client("bob")
    wait_known(a, "bob")
    c = a.client()
    long = "x" * 100
    c.send_raw(frame("alice") + frame(long) + frame("/who"))
    assert c.recv()[1].startswith("welcome, alice")
    assert bob.recv_text("alice") == long
    assert c.recv_text(NOTICE) == "online (2): alice, bob"


@pytest.mark.slow
def test_a_node_that_fell_behind_catches_up_and_counts_what_the_history_lost(
    node: Callable[..., Daemon], redis_server: Any, tmp_path: Any
) -> None:
    """Node b stops reading (SIGSTOP) until Redis drops its pub/sub connection (a small
    output buffer limit, which node a, reading, stays under); back, it fills the gap
    from the stream, and what the stream (history 100) no longer has is counted in a
    notice to its users."""
    import signal

    import redis

    r = redis.Redis(port=redis_server.port)
    r.config_set("client-output-buffer-limit", "pubsub 256kb 0 0")
    a = node("a", {"flood": {"rate": 0}}, lease=30, history=100)
    b = node("b", lease=30, history=100)
    up(a, b)
    reader = b.client("reader")
    wait_known(a, "reader")
    sender = a.client("sender")
    assert reader.recv_text(NOTICE) == "sender joined"
    b.signal(signal.SIGSTOP)
    total = 0

    def last_logged() -> str:
        entries = r.xrevrange("chatd:{chatd}:log", count=1)
        return entries[0][1][b"e"].decode() if entries else ""

    try:
        # Until Redis has dropped b's pub/sub connection (a's may go too, and come back).
        while len(r.client_list(_type="pubsub")) > 1 or not total:
            assert total < 40000, "Redis kept b's pub/sub connection"
            for i in range(total, total + 1000):
                sender.send(f"m{i:05d} " + "x" * 300)
            total += 1000
            deadline = time.monotonic() + 20
            while f'"x":"m{total - 1:05d} ' not in last_logged():
                assert time.monotonic() < deadline, last_logged()[:80]
                time.sleep(0.05)
    finally:
        b.signal(signal.SIGCONT)
    got: list[str] = []
    missed = 0
    last = f"m{total - 1:05d}"
    while not got or got[-1] != last:
        try:
            sender_name, text = reader.recv(20)
        except TimeoutError:
            raise AssertionError(f"{len(got)} got, {missed} missed; {b.find('resync')}") from None
        if sender_name == "sender":
            got.append(text[:6])
        elif text.startswith("you may have missed "):
            missed += int(text.split()[4])
    assert missed > 0
    assert got == sorted(got)  # in order, none twice
    assert len(set(got)) == len(got)
    assert len(got) + missed >= total  # each either delivered or counted as missed
    b.wait_for("resync")


def test_status_says_when_the_link_is_down(
    start: Callable[..., Daemon], redis_server: Any, tmp_path: Any
) -> None:
    from test_systemd import NotifySocket

    notify = NotifySocket(str(tmp_path / "notify.sock"))

    def status(want: str) -> None:
        deadline = time.monotonic() + 10
        while notify.wait_for("STATUS", timeout=10)["STATUS"] != want:
            assert time.monotonic() < deadline, notify.seen

    try:
        d = start(
            {"cluster": {"redis": redis_server.url, "node": "a", "lease": 2}},
            env={"NOTIFY_SOCKET": notify.address},
        )
        d.wait_for("cluster_link_up")
        alice = d.client("alice")
        status("1 user online, 1 connection")
        redis_server.kill()
        until(
            alice, NOTICE, "the link to the other servers is down; messages reach this server only"
        )
        status(
            "1 user online, 1 connection; link to the other servers down, serving this "
            "server's users only"
        )
        stats = d.result("stats")["cluster"]
        assert stats["link"] == "down" and stats["error"]
        alice.send("/msg bob are you there?")  # bob may be on a node cut off from here
        until(
            alice,
            NOTICE,
            "message not sent: nobody called 'bob' is on this server, and the link to the "
            "other servers is down",
        )
        redis_server.start()
        d.wait_for("cluster_link_up", timeout=15, users=1)
        status("1 user online, 1 connection")
        until(alice, NOTICE, "the link to the other servers is back")
    finally:
        notify.close()


@pytest.mark.slow
def test_a_restart_through_the_fd_store_keeps_the_node(
    node: Callable[..., Daemon], redis_server: Any, tmp_path: Any
) -> None:
    """systemctl restart of a node: its users stay, in the cluster too, and nobody sees
    them leave or join."""
    import yaml
    from helpers import Client
    from test_restart import Manager

    b = node("b")
    up(b)
    bob = b.client("bob")
    (tmp_path / "m").mkdir()
    manager = Manager(tmp_path / "m")
    try:
        cfg = yaml.safe_load(manager.config.read_text())
        cfg["cluster"] = {"redis": redis_server.url, "node": "a", "lease": 2}
        manager.config.write_text(yaml.safe_dump(cfg))
        manager.start(with_store=False)
        manager.wait_for("cluster_link_up")
        alice = Client(manager.port())
        alice.join("alice")
        assert bob.recv_text(NOTICE) == "alice joined"
        rc = manager.stop()
        assert rc == 0, manager.proc.stderr.read() if manager.proc and manager.proc.stderr else ""
        manager.start(with_store=True)
        assert manager.wait_for("handover_taken")["users"] == 1
        manager.wait_for("cluster_link_up")
        alice.send("after the restart")
        assert bob.recv_text("alice", timeout=10) == "after the restart"
        bob.send("/who")
        assert bob.recv_text(NOTICE) == "online (2): bob, alice"
        bob.send("still here")
        assert alice.recv_text("bob") == "still here"
        time.sleep(2 * 2)  # past the old chatd's lease: nothing of it is reaped
        bob.send("/who")
        assert bob.recv_text(NOTICE) == "online (2): bob, alice"
        assert not [e for e in b.find("node_lost")]
    finally:
        manager.close()
