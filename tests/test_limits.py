"""Limits over real sockets: flood control, connections per address, idle timeout."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import yaml
from crowd import Crowd
from helpers import CROWD, NOTICE, Bystanders, Client, Daemon, frame


def burst(n: int, prefix: str = "m") -> bytes:
    """``n`` numbered message frames in one piece (one read for the daemon)."""
    return b"".join(frame(f"{prefix}{i}") for i in range(n))


def received(client: Client, sender: str, wait: float = 0.3) -> list[str]:
    """Every text from ``sender`` until nothing arrives for ``wait`` seconds."""
    texts = []
    while True:
        try:
            s, text = client.recv(wait)
        except TimeoutError:
            return texts
        if s == sender:
            texts.append(text)


def reload(daemon: Daemon, settings: dict[str, Any]) -> None:
    cfg = {**daemon.config, **settings}
    daemon.config_path.write_text(yaml.safe_dump(cfg))
    seen = len(daemon.find("reload"))
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while len(daemon.find("reload")) <= seen:
        assert time.monotonic() < deadline, "no reload event"
        time.sleep(0.02)


SLOW_DOWN = (
    "slow down: your messages are not being sent (the limit is {rate} a second, {burst} at once)"
)


def test_flood_over_the_burst_is_dropped_and_only_the_sender_is_told(
    start: Callable[..., Daemon],
) -> None:
    daemon = start({"flood": {"rate": 10, "burst": 5, "max_dropped": 0}})
    by = Bystanders(daemon)
    alice = daemon.client("alice")
    mallory = daemon.client("mallory")
    alice.expect(NOTICE, "mallory joined")
    mallory.send_raw(burst(20))
    # Only the burst goes through; the sender is told once, nobody else hears of it.
    assert mallory.recv() == (NOTICE, SLOW_DOWN.format(rate=10, burst=5))
    mallory.expect_nothing()
    assert received(alice, "mallory") == ["m0", "m1", "m2", "m3", "m4"]
    alice.expect_nothing(0.1)
    flood = daemon.wait_for("flood", user="mallory")
    assert flood["level"] == "warning" and flood["dropped"] == 1
    # A token accrues every 0.1 s.
    time.sleep(0.15)
    mallory.send("one more")
    alice.expect("mallory", "one more")
    # Once the bucket is full again the flood is over and its count logged.
    time.sleep(0.6)
    mallory.send("calm again")
    alice.expect("mallory", "calm again")
    assert daemon.wait_for("flood_end", user="mallory")["dropped"] == 15
    assert daemon.result("stats")["flood_dropped"] == 15
    by.check()


def test_a_new_run_of_dropped_messages_is_told_again(start: Callable[..., Daemon]) -> None:
    daemon = start({"flood": {"rate": 10, "burst": 2, "max_dropped": 0}})
    alice = daemon.client("alice")
    mallory = daemon.client("mallory")
    alice.expect(NOTICE, "mallory joined")
    mallory.send_raw(burst(5, "a"))
    assert mallory.recv()[1].startswith("slow down")
    time.sleep(0.15)  # one token: one message through, then drops again
    mallory.send_raw(burst(5, "b"))
    assert mallory.recv()[1].startswith("slow down")
    mallory.expect_nothing()
    assert received(alice, "mallory") == ["a0", "a1", "b0"]


def test_a_sender_that_keeps_flooding_is_disconnected(start: Callable[..., Daemon]) -> None:
    daemon = start({"flood": {"rate": 1, "burst": 2, "max_dropped": 10}})
    by = Bystanders(daemon)
    mallory = daemon.client("mallory")
    by.a.expect(NOTICE, "mallory joined")
    mallory.send_raw(burst(30))
    got = mallory.expect_closed()
    assert got[-1] == (NOTICE, "disconnected for flooding: 10 messages over the limit")
    # Told to slow down first, unless the whole flood came in one read.
    assert set(got[:-1]) <= {(NOTICE, SLOW_DOWN.format(rate=1, burst=2))}, got
    assert by.a.recv() == ("mallory", "m0")
    assert by.a.recv() == ("mallory", "m1")
    assert by.a.recv() == (NOTICE, "mallory left (flooding)")
    left = daemon.wait_for("leave", user="mallory", reason="flooding")
    assert left["flood_dropped"] == 10
    by.check()


def test_exempt_addresses_are_not_limited(start: Callable[..., Daemon]) -> None:
    daemon = start({"flood": {"rate": 1, "burst": 1, "exempt": ["10.0.0.0/8", "127.0.0.0/8"]}})
    alice = daemon.client("alice")
    script = daemon.client("script")
    alice.expect(NOTICE, "script joined")
    script.send_raw(burst(100))
    assert received(alice, "script") == [f"m{i}" for i in range(100)]
    script.expect_nothing(0.1)
    assert not daemon.find("flood")


def test_flood_settings_are_reloaded(start: Callable[..., Daemon]) -> None:
    daemon = start({"flood": {"rate": 1, "burst": 1, "max_dropped": 0}})
    alice = daemon.client("alice")
    bob = daemon.client("bob")
    alice.expect(NOTICE, "bob joined")
    bob.send_raw(burst(5, "a"))
    assert received(alice, "bob") == ["a0"]
    # Exempt now: the connected user is no longer limited.
    reload(daemon, {"flood": {"rate": 1, "burst": 1, "exempt": ["127.0.0.1"]}})
    bob.send_raw(burst(5, "b"))
    assert received(alice, "bob") == [f"b{i}" for i in range(5)]
    # A bigger burst applies to whoever joins next (and refills the others).
    reload(daemon, {"flood": {"rate": 1, "burst": 3}})
    carol = daemon.client("carol")
    carol.send_raw(burst(5, "c"))
    assert received(alice, "carol") == ["c0", "c1", "c2"]
    # Off.
    reload(daemon, {"flood": {"rate": 0}})
    carol.send_raw(burst(50, "d"))
    assert received(alice, "carol") == [f"d{i}" for i in range(50)]


def test_max_per_address(start: Callable[..., Daemon]) -> None:
    daemon = start({"max_per_address": 2, "address_exempt": ["127.0.0.3"]})
    by = Bystanders(daemon)  # from an address of their own
    one = daemon.client("one")
    two = daemon.client("two")
    over = Client(daemon.port)
    assert over.expect_closed() == [
        (NOTICE, "too many connections from 127.0.0.1, try again later")
    ]
    daemon.wait_for("rejected", reason="too many from address")
    # Rejected and refused connections do not hold a place.
    for _ in range(3):
        Client(daemon.port).expect_closed()
    two.close()
    daemon.wait_for("leave", user="two")
    again = daemon.client("again")  # takes the free place
    assert one and again
    by.check()
    # Raised by a reload.
    reload(daemon, {"max_per_address": 0})
    extra = [daemon.client(f"extra{i}") for i in range(3)]
    assert len(extra) == 3


def test_idle_users_are_disconnected(start: Callable[..., Daemon]) -> None:
    daemon = start({"idle_timeout": 0.5})
    silent = daemon.client("silent")
    talker = daemon.client("talker")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5:
        talker.send("still here")
        time.sleep(0.1)
    got = silent.expect_closed()
    assert got[-1] == (NOTICE, "disconnected: nothing sent for 0.5 seconds"), got
    assert talker.recv() == (NOTICE, "silent left (idle)")
    daemon.wait_for("leave", user="silent", reason="idle")
    talker.send("and now?")  # the talker was never idle
    assert daemon.wait_for("message", text="and now?")


def test_idle_timeout_is_off_by_default_and_reloadable(daemon: Daemon) -> None:
    silent = daemon.client("silent")
    watcher = daemon.client("watcher")
    silent.expect(NOTICE, "watcher joined")
    time.sleep(0.6)
    silent.expect_nothing(0.1)
    reload(daemon, {"idle_timeout": 0.3})
    assert silent.expect_closed()[-1] == (NOTICE, "disconnected: nothing sent for 0.3 seconds")
    assert watcher.expect_closed()[-1][1].startswith("disconnected: nothing sent")
    # And off again: a new silent user stays.
    reload(daemon, {"idle_timeout": 0})
    stays = daemon.client("stays")
    time.sleep(0.6)
    stays.expect_nothing(0.1)


def test_handshake_timeout_is_reloaded_for_pending_connections_too(
    start: Callable[..., Daemon],
) -> None:
    d = start({"handshake_timeout": 60})
    pending = Client(d.port)  # connected, no name yet
    deadline = time.monotonic() + 5
    while d.result("stats")["connections"] < 1:  # accepted under the old timeout
        assert time.monotonic() < deadline
        time.sleep(0.02)
    reload(d, {"handshake_timeout": 0.3})
    assert pending.expect_closed(timeout=5) == [(NOTICE, "timed out: no name within 0.3 seconds")]
    # Raised again: a connection accepted under 0.3 s gets the new 2 s.
    late = Client(d.port)
    deadline = time.monotonic() + 5
    while d.result("stats")["connections"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    reload(d, {"handshake_timeout": 2})
    late.expect_nothing(0.6)
    late.send("late")
    assert late.recv()[1].startswith("welcome, late")


def test_the_welcome_in_a_big_room_is_bounded(start: Callable[..., Daemon]) -> None:
    daemon = start(CROWD)
    crowd = Crowd(daemon.port, prefix="a-rather-long-user-name-")
    try:
        crowd.join(150)
        newcomer = Client(daemon.port)
        newcomer.send("newcomer")
        sender, text = newcomer.recv()
        assert sender == NOTICE
        assert text.startswith("welcome, newcomer; online: a-rather-long-user-name-0, ")
        assert len(text.encode()) < 4100
        shown = text.split(": ", 1)[1].split(" and ")[0].split(", ")
        assert text.endswith(f" and {150 - len(shown)} more")
        assert 100 < len(shown) < 150
    finally:
        crowd.close()


def test_one_address_cannot_take_every_slot_with_connections_that_never_join(
    start: Callable[..., Daemon],
) -> None:
    daemon = start({"handshake_timeout": 30})
    hogs = []
    for _ in range(200):  # a script from one address, never sending a name
        hogs.append(Client(daemon.port))
    deadline = time.monotonic() + 20
    while len(daemon.find("rejected", reason="too many from address")) < 192:
        assert time.monotonic() < deadline, "the hogs were not refused"
        time.sleep(0.05)
    for i in range(10):  # real users, on other addresses, get in at once
        user = Client(daemon.port, source=f"127.0.1.{i + 1}")
        user.join(f"user{i}")
    assert len(daemon.find("rejected", reason="too many from address")) == 192  # 8 wait
    assert len(hogs) == 200


def test_more_connections_from_one_address_do_not_send_more(start: Callable[..., Daemon]) -> None:
    daemon = start({"flood": {"rate": 0.1, "burst": 4, "max_dropped": 0}})
    alice, bob = daemon.client("alice"), daemon.client("bob")  # both on 127.0.0.1
    watcher = daemon.client("watcher", source="127.0.0.2")
    for i in range(3):
        alice.send(f"a{i}")
        bob.send(f"b{i}")
    got = []
    while len(got) < 5:
        try:
            sender, text = watcher.recv(timeout=1.0)
        except TimeoutError:
            break
        if sender != NOTICE:
            got.append(text)
    assert len(got) == 4, got  # the address's burst of 4, shared, then nothing
    assert len(daemon.find("flood")) >= 1
