"""Scenario i of chatbench.py: two chatd nodes and a redis-server (the cluster).

Both nodes and redis-server are pinned to the daemon's core, the generator to the
other, as chatbench pins one chatd: the backplane's whole cost lands where one node's
did.  Receivers are split across the nodes, 10 senders and one probe on node A, two
probes on node B; each sender keeps at most --window messages ahead of what every
probe received.  The same load then runs on one chatd alone, for the comparison of
CPU per message.  The latency round offers 100 messages/s from node A and times
their arrival at probes on node B.

Called by chatbench.py with its own module (``cb``), whose Daemon, Generator and
helpers it uses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server(cb: Any, where: Path, cpu: int | None) -> Iterator[tuple[str, int]]:
    """A redis-server of its own: (URL, pid)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        raise cb.BenchError("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    cmd += ["--dir", str(where)]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), 1) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise cb.BenchError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def cluster(cb: Any, args: Any) -> Iterator[tuple[Any, Any, int, Any]]:
    """Redis and two nodes, a and b; and a generator. (node a, node b, redis pid, gen)"""
    with (
        tempfile.TemporaryDirectory() as tmp,
        redis_server(cb, Path(tmp), args.daemon_cpu) as (
            url,
            redis_pid,
        ),
    ):
        nodes = []
        try:
            for name in ("a", "b"):
                where = Path(tmp) / name
                where.mkdir()
                extra = {"cluster": {"redis": url, "node": name}}
                nodes.append(cb.Daemon(where, args.daemon_cpu, extra))
            time.sleep(0.5)  # the links come up
            gen = cb.Generator(nodes[0].port)
            try:
                yield nodes[0], nodes[1], redis_pid, gen
            finally:
                gen.close()
        finally:
            for d in nodes:
                d.stop()


def _pump(cb: Any, gen: Any, senders: list[Any], probes: list[Any], window: int) -> Any:
    payload = cb.frame(cb.message_text(0))
    keys = [s.name.encode() for s in senders]

    def pump(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for s, key in zip(senders, keys, strict=True):
                if s.state == cb.DEAD:
                    continue
                if s.out:
                    with contextlib.suppress(BlockingIOError):
                        s.out = s.out[s.sock.send(s.out) :]
                    continue
                seen = min(p.per_sender.get(key, 0) for p in probes)
                room = window - (s.sent - seen)
                if room > 0:
                    data = payload * room
                    s.sent += room
                    try:
                        n = s.sock.send(data)
                    except BlockingIOError:
                        n = 0
                    s.out = data[n:]
            gen.poll(0.01)
            if gen.failed:
                raise cb.BenchError(f"clients lost: {gen.failed}")

    return pump


def _round(
    cb: Any, pump: Any, seconds: float, measured: list[Any], probes: list[Any], pids: dict[str, int]
) -> dict[str, Any]:
    delivery = len(cb.frame("s00000") + cb.frame(cb.message_text(0)))
    b0 = sum(c.nbytes for c in measured)
    m0 = min(sum(p.per_sender.values()) for p in probes)
    c0 = {k: cb.cpu_seconds(p) for k, p in pids.items()}
    g0 = cb.cpu_seconds(os.getpid())
    t0 = time.monotonic()
    pump(seconds)
    dt = time.monotonic() - t0
    cpu = {f"{k}_cpu": round((cb.cpu_seconds(p) - c0[k]) / dt, 3) for k, p in pids.items()}
    gen_cpu = round((cb.cpu_seconds(os.getpid()) - g0) / dt, 3)
    deliveries = (sum(c.nbytes for c in measured) - b0) / delivery
    accepted = min(sum(p.per_sender.values()) for p in probes) - m0
    chatd = sum(v for k, v in cpu.items() if k.startswith("node") or k == "chatd_cpu") * dt
    core = sum(cpu.values())
    return {
        "deliveries_per_s": round(deliveries / dt),
        "accepted_per_s": round(accepted / dt),
        # every chatd's CPU (both nodes; Redis apart) per message and per delivery
        "chatd_cpu_us_per_message": round(chatd / max(accepted, 1) * 1e6, 2),
        "chatd_cpu_ns_per_delivery": round(chatd / max(deliveries, 1) * 1e9, 1),
        **cpu,
        "generator_cpu": gen_cpu,
        "saturated": "daemon core"
        if core >= 0.9
        else ("generator" if gen_cpu >= 0.9 else "neither"),
    }


def fanout(cb: Any, args: Any, receivers: int, rounds: int) -> dict[str, Any]:
    """Deliveries/s and CPU with the backplane, then the same on one chatd alone."""
    senders_n = 10
    with cluster(cb, args) as (a, b, redis_pid, gen):
        half = (receivers - 3) // 2
        gen.join_many([f"ra{i:05d}" for i in range(half)], cb.COUNT, 100, 120, a.port)
        gen.join_many(
            [f"rb{i:05d}" for i in range(receivers - 3 - half)], cb.COUNT, 100, 120, b.port
        )
        _, pa = gen.join_many(["pa0000"], cb.PROBE, 10, 30, a.port)
        _, pb = gen.join_many(["pb0000", "pb0001"], cb.PROBE, 10, 30, b.port)
        _, senders = gen.join_many(
            [f"s{i:05d}" for i in range(senders_n)], cb.COUNT, 100, 30, a.port
        )
        gen.settle()
        gen.reset_counts()
        probes = pa + pb
        measured = [c for c in gen.joined if c not in senders]
        pump = _pump(cb, gen, senders, probes, args.window)
        pump(args.warmup)
        pids = {"node_a": a.pid, "node_b": b.pid, "redis": redis_pid}
        results = [_round(cb, pump, args.seconds, measured, probes, pids) for _ in range(rounds)]
    with cb.session(args) as (daemon, gen):
        gen.join_many([f"r{i:05d}" for i in range(receivers - 3)], cb.COUNT, 100, 120)
        _, probes = gen.join_many(["p0000", "p0001", "p0002"], cb.PROBE, 10, 30)
        _, senders = gen.join_many([f"s{i:05d}" for i in range(senders_n)], cb.COUNT, 100, 30)
        gen.settle()
        gen.reset_counts()
        measured = [c for c in gen.joined if c not in senders]
        pump = _pump(cb, gen, senders, probes, args.window)
        pump(args.warmup)
        alone = [
            _round(cb, pump, args.seconds, measured, probes, {"chatd": daemon.pid})
            for _ in range(rounds)
        ]
    out = cb.summarize(results)
    single = cb.summarize(alone)
    ratio = out["chatd_cpu_ns_per_delivery"] / max(single["chatd_cpu_ns_per_delivery"], 1e-9)
    return out | {
        "receivers": receivers,
        "senders": senders_n,
        "single": single,
        "cpu_per_delivery_ratio": round(ratio, 3),
        "rows": [
            (
                f"i cluster {receivers:,} receivers (2 nodes)",
                "deliveries/s; accepted msgs/s",
                f"{out['deliveries_per_s']:,}; {out['accepted_per_s']:,}",
                ">= 20,000 msgs/s" if receivers == 100 else "",
                f"{out['saturated']} (a {out['node_a_cpu']}, b {out['node_b_cpu']}, "
                f"redis {out['redis_cpu']})",
            ),
            (
                "",
                "one node alone: deliveries/s; msgs/s",
                f"{single['deliveries_per_s']:,}; {single['accepted_per_s']:,}",
                "",
                single["saturated"],
            ),
            (
                "",
                "chatd CPU per delivery: cluster / alone",
                f"{out['chatd_cpu_ns_per_delivery']} / {single['chatd_cpu_ns_per_delivery']} ns "
                f"= {round(ratio, 2)}",
                "<= 1.25" if receivers == 1000 else "",
                "",
            ),
        ],
    }


def _latency_rounds(cb: Any, gen: Any, sender: Any, args: Any, rounds: int) -> list[Any]:
    rate = 100.0
    results = []
    seq = 0
    for _ in range(rounds):
        gen.latencies.clear()
        start = time.monotonic()
        sent = 0
        while time.monotonic() < start + args.seconds + 1:
            due = start + sent / rate
            now = time.monotonic()
            if now >= due:
                sender.sock.send(cb.frame(cb.message_text(seq, time.monotonic_ns())))
                seq += 1
                sent += 1
                continue
            gen.poll(min(due - now, 0.005))
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            gen.poll(0.01)
        lat = sorted(gen.latencies)
        if not lat:
            raise cb.BenchError("no message reached a probe")
        results.append(
            {
                "p50_ms": round(lat[len(lat) // 2] / 1e6, 3),
                "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6, 3),
                "max_ms": round(lat[-1] / 1e6, 3),
                "samples": len(lat),
            }
        )
    return results


def latency(cb: Any, args: Any, rounds: int) -> dict[str, Any]:
    """From a sender on node A to probes on node B, 100 messages/s, 1,000 receivers split
    across the nodes; then the same on one chatd alone."""
    receivers = args.latency_receivers
    with cluster(cb, args) as (a, b, _redis_pid, gen):
        half = (receivers - 5) // 2
        gen.join_many([f"ra{i:05d}" for i in range(half)], cb.COUNT, 100, 120, a.port)
        gen.join_many(
            [f"rb{i:05d}" for i in range(receivers - 5 - half)], cb.COUNT, 100, 120, b.port
        )
        gen.stamped = True
        gen.join_many([f"pb{i:04d}" for i in range(5)], cb.PROBE, 10, 30, b.port)
        _, senders = gen.join_many(["s00000"], cb.COUNT, 10, 30, a.port)
        gen.settle()
        gen.reset_counts()
        results = _latency_rounds(cb, gen, senders[0], args, rounds)
    with cb.session(args) as (_daemon, gen):
        gen.join_many([f"r{i:05d}" for i in range(receivers - 5)], cb.COUNT, 100, 120)
        gen.stamped = True
        gen.join_many([f"p{i:04d}" for i in range(5)], cb.PROBE, 10, 30)
        _, senders = gen.join_many(["s00000"], cb.COUNT, 10, 30)
        gen.settle()
        gen.reset_counts()
        alone = _latency_rounds(cb, gen, senders[0], args, rounds)
    out = cb.summarize(results)
    single = cb.summarize(alone)
    return out | {
        "receivers": receivers,
        "offered_per_s": 100.0,
        "single": single,
        "rows": [
            (
                f"i cluster latency A -> B, {receivers:,} receivers, 100 msg/s",
                "p50 / p99 / max ms",
                f"{out['p50_ms']:.2f} / {out['p99_ms']:.2f} / {out['max_ms']:.2f}",
                f"p99 <= {single['p99_ms'] + 5:.2f}",
                "",
            ),
            (
                "",
                "one node alone: p50 / p99 / max ms",
                f"{single['p50_ms']:.2f} / {single['p99_ms']:.2f} / {single['max_ms']:.2f}",
                "",
                "",
            ),
        ],
    }
