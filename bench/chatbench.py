"""chatd's benchmark: a load generator and the four scenarios of issue 7.

    python bench/chatbench.py            # every scenario, several rounds (`make bench`)
    python bench/chatbench.py --quick    # one round of each (`make bench-quick`)

The daemon runs as a subprocess pinned with taskset to one core; this process
(and, for the latency scenario, one helper process it forks) is pinned to the
other.  Receivers only count bytes: during a measurement every delivery has the
same known size.  A few probe clients parse frames, to hold each sender to its
window and to timestamp messages for latency.  Everything talks to 127.0.0.1;
every loop is bounded in count and in time.

Scenarios:
  a  fan-out: 100 and 1,000 receivers, 10 senders with 64-byte messages, each
     sender at most --window messages ahead of what the probes received
  b  latency: 1,000 receivers, 100 and 200 messages/s offered, send-to-receipt time
     at probes that joined first, in the middle and last (the old way: last alone),
     beside the floor: receivers x the measured cost of one send()
  c  capacity: clients in steps of 1,000 up to 10,000, one broadcast after each;
     RSS per client from an idle chatd (the old way) and per member from 1,000 to 10,000
  d  join storm: 2,000 clients connect and register, 10 and 100 in flight; each one
     joins the room, whose members are told, and counts as joined at its welcome;
     the notice bytes the members received per join
  m  memory: what one idle member holds, by tracemalloc (bench/member_memory.py)
  e  restart: with 1,000 and 10,000 connected, the longest wait a client sees (SIGUSR2)
  f  history on vs off: scenario a's fan-out at 100 and 1,000 receivers, rounds
     alternating between a chatd keeping no history (keep_messages 0) and one
     keeping it in its SQLite file (the default); the ratio of the two
  g  join storm with replay_on_join 20: 20 messages said first, so each of the
     2,000 newcomers (100 in flight) is replayed 20; and the same with no history
  h  history write lag: 10 senders offer 10,000 messages/s (--lag-rate) for
     --lag-seconds to 10 receivers; the writer's lag (p99 and max over its batches,
     each measured at its oldest message) from `stats`, and whether it kept up
  i  cluster (bench/clusterbench.py): 2 chatd nodes and a redis-server, all on the
     daemon's core, receivers split across the nodes, 10 senders on node A:
     deliveries/s and CPU per message against one node alone (100 and 1,000
     receivers), and latency from node A to probes on node B at 100 messages/s

The daemon runs with its default configuration (log level info, JSON message
events with text; the history kept in a file in a temporary directory) but for
a port of 0, a max_clients of 11,000, 127.0.0.1 exempt from flood control and
the per-address limits, and max_handshakes 20,000; its control socket is in the
temporary directory too; its stdout is read and discarded by a thread of this
process, as journald would read it.
Results: a table on stdout and a JSON file under bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import multiprocessing
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HL = 10  # header length
TEXT_BYTES = 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
RECV_BUF = memoryview(bytearray(1 << 20))
SINK_NAP = 0.005  # seconds the latency scenario's receivers sleep between drains


def frame(text: str | bytes) -> bytes:
    payload = text.encode() if isinstance(text, str) else text
    return b"%-*d" % (HL, len(payload)) + payload


def message_text(seq: int, stamp_ns: int = 0) -> bytes:
    """A 64-byte message: sequence number and send time, padded."""
    head = b"%010d %020d " % (seq, stamp_ns)
    return head + b"x" * (TEXT_BYTES - len(head))


class BenchError(Exception):
    pass


# The daemon.


class Daemon:
    """chatd as a subprocess on an ephemeral port, pinned to ``cpu``."""

    profile_dir: Path | None = None  # --profile: where py-spy writes
    profiler: subprocess.Popen[bytes] | None = None
    root: Path = ROOT  # --chatd-root: the checkout whose chatd runs (an A/B comparison)

    def __init__(self, workdir: Path, cpu: int | None, extra: dict[str, Any] | None = None) -> None:
        self.control = str(workdir / "admin.sock")
        cfg: dict[str, Any] = {
            "listen": ["127.0.0.1:0"],
            "control": {"socket": self.control},
            "state_file": str(workdir / "state.json"),
            "history": {"file": str(workdir / "history.sqlite3")},
            "max_clients": 11000,
            # Every client comes from 127.0.0.1: flood control (on by default,
            # 10 messages/s) would measure the limit, not the relay.
            "flood": {"exempt": ["127.0.0.1"]},
            # And from one address: the per-address limits would measure themselves.
            "address_exempt": ["127.0.0.1"],
            "max_handshakes": 20000,
            "log": {"format": "json"},
        }
        cfg.update(extra or {})
        path = workdir / "chatd.yaml"
        path.write_text(json.dumps(cfg))  # JSON is YAML
        cmd = [sys.executable, "-m", "chatd", "--config", str(path)]
        if cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(cpu), *cmd]
        env = {**os.environ, "PYTHONPATH": str(self.root)}
        env.pop("PYTHONUNBUFFERED", None)
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=self.root
        )
        self.pid = self.proc.pid  # taskset execs the daemon: same pid
        self.log_bytes = 0
        assert self.proc.stdout
        deadline = time.monotonic() + 15
        line = b""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "startup":
                    self.port = int(event["listen"][0].rsplit(":", 1)[1])
                    break
        else:
            self.kill()
            raise BenchError("chatd did not start in 15 s")
        if not line:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise BenchError(f"chatd did not start: {err.strip()[-500:]}")
        self._drain = threading.Thread(target=self._discard, daemon=True)
        self._drain.start()

    def _discard(self) -> None:
        assert self.proc.stdout
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 1 << 20)
            except OSError:
                return
            if not data:
                return
            self.log_bytes += len(data)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def request(self, cmd: str) -> Any:
        """One control request; its result."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.control)
            s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        reply = json.loads(data)
        if not reply.get("ok"):
            raise BenchError(f"{cmd}: {reply}")
        return reply["result"]

    def profile(self, tag: str) -> None:
        """With --profile, sample the daemon with py-spy until profile_stop()."""
        if self.profile_dir is None or self.profiler is not None:
            return
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out = self.profile_dir / f"{tag}.txt"
        cmd = [spy, "record", "--pid", str(self.pid), "--rate", "250", "--format", "raw"]
        self.profiler = subprocess.Popen(
            [*cmd, "--nonblocking", "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)  # let it attach

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise BenchError("no VmRSS for chatd")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._drain.join(5)
        self.profile_stop()

    def profile_stop(self) -> None:
        """End the sampling started by profile(); py-spy writes its file on SIGINT."""
        if self.profiler is None:
            return
        if self.profiler.poll() is None:
            self.profiler.send_signal(signal.SIGINT)
        try:
            self.profiler.wait(30)
        except subprocess.TimeoutExpired:
            self.profiler.kill()
            self.profiler.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuMeter:
    """CPU use of the daemon and of the generator's processes over an interval."""

    def __init__(self, daemon: Daemon, gen_pids: list[int]) -> None:
        self.daemon = daemon
        self.gen_pids = gen_pids
        self.t0 = time.monotonic()
        self.d0 = daemon.cpu_seconds()
        self.g0 = sum(cpu_seconds(p) for p in gen_pids)
        self.m0 = machine_busy()

    def read(self) -> dict[str, float]:
        dt = time.monotonic() - self.t0
        d = (self.daemon.cpu_seconds() - self.d0) / dt
        g = (sum(cpu_seconds(p) for p in self.gen_pids) - self.g0) / dt
        m = (machine_busy() - self.m0) / dt
        return {
            "daemon_cpu": round(d, 3),
            "generator_cpu": round(g, 3),
            # Every other process's CPU (other work on a shared machine).
            "other_cpu": round(max(0.0, m - d - g), 3),
        }


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = map(int, fields)
    # Interrupt time is left out: on loopback much of it is this benchmark's.
    return (user + nice + system + steal) / CLK_TCK


def saturated(cpu: dict[str, float]) -> str:
    d, g = cpu["daemon_cpu"], cpu["generator_cpu"]
    if d >= 0.9 and d >= g:
        return "daemon"
    if g >= 0.9:
        return "generator"
    return "neither"


HISTORY_OFF = {"history": {"keep_messages": 0, "file": ""}}  # a chatd keeping no history


@contextlib.contextmanager
def session(
    args: argparse.Namespace, extra: dict[str, Any] | None = None
) -> Iterator[tuple[Daemon, Generator]]:
    """A fresh chatd and a generator connected to it; both stopped at the end."""
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp), args.daemon_cpu, extra)
        gen = Generator(daemon.port)
        try:
            yield daemon, gen
        finally:
            gen.close()
            daemon.stop()


# The load generator: non-blocking clients on one epoll.

JOINING, COUNT, PROBE, DEAD = range(4)


class Conn:
    __slots__ = ("buf", "name", "nbytes", "out", "per_sender", "sent", "sock", "state", "want")

    def __init__(self, sock: socket.socket, name: str, want: int) -> None:
        self.sock = sock
        self.name = name
        self.state = JOINING
        self.want = want  # the state after the welcome
        self.buf = bytearray()
        self.nbytes = 0  # bytes received after the welcome
        self.out = b""  # unsent bytes
        self.sent = 0  # messages sent (senders)
        self.per_sender: dict[bytes, int] = {}  # probes: messages received per sender


def split_frames(buf: bytearray) -> Iterator[bytes]:
    """Consume and yield the complete frames at the front of ``buf``."""
    pos = 0
    while len(buf) - pos >= HL:
        n = int(buf[pos : pos + HL])
        if len(buf) - pos - HL < n:
            break
        yield bytes(buf[pos + HL : pos + HL + n])
        pos += HL + n
    del buf[:pos]


class Generator:
    def __init__(self, port: int) -> None:
        self.addr = ("127.0.0.1", port)
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.joining = 0
        self.joined: list[Conn] = []
        self.failed: dict[str, int] = {}
        self.latencies: list[int] = []  # ns, probes in latency mode
        self.probe_latencies: dict[str, list[int]] = {}  # the same, by probe name
        self.stamped = False  # probes read send times from the text

    def close(self) -> None:
        for c in self.conns.values():
            c.sock.close()
        self.conns.clear()
        self.ep.close()

    def fail(self, c: Conn, why: str) -> None:
        self.failed[why] = self.failed.get(why, 0) + 1
        if c.state == JOINING:
            self.joining -= 1
        c.state = DEAD
        with contextlib.suppress(OSError, KeyError):
            self.ep.unregister(c.sock.fileno())
        fd = c.sock.fileno()
        self.conns.pop(fd, None)
        c.sock.close()

    def connect(self, name: str, want: int, port: int | None = None) -> Conn:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Conn(s, name, want)
        self.joining += 1
        self.conns[s.fileno()] = c
        rc = s.connect_ex(self.addr if port is None else ("127.0.0.1", port))
        if rc not in (0, errno.EINPROGRESS):
            self.fail(c, errno.errorcode.get(rc, str(rc)))
            return c
        self.ep.register(s.fileno(), EPOLLOUT)
        return c

    def join_many(
        self, names: list[str], want: int, in_flight: int, limit: float, port: int | None = None
    ) -> tuple[float, list[Conn]]:
        """Connect and register ``names``, at most ``in_flight`` at once.

        Returns the seconds taken and the connections that joined.
        """
        start = time.monotonic()
        deadline = start + limit
        todo = list(reversed(names))
        before = len(self.joined)
        while (todo or self.joining) and time.monotonic() < deadline:
            while todo and self.joining < in_flight:
                self.connect(todo.pop(), want, port)
            self.poll(0.05)
        if todo or self.joining:
            raise BenchError(
                f"{len(todo) + self.joining} of {len(names)} clients not joined in {limit:g} s"
            )
        return time.monotonic() - start, self.joined[before:]

    def poll(self, timeout: float) -> None:
        conns = self.conns
        buf = RECV_BUF
        for fd, ev in self.ep.poll(timeout, 4096):
            c = conns.get(fd)
            if c is None:
                continue
            st = c.state
            if st == COUNT:
                try:
                    n = c.sock.recv_into(buf)
                except BlockingIOError:
                    continue
                except OSError as e:
                    self.fail(c, errno.errorcode.get(e.errno or 0, "error"))
                    continue
                if n == 0:
                    self.fail(c, "closed by chatd")
                c.nbytes += n
            elif st == PROBE:
                self._probe(c)
            elif ev & EPOLLOUT:
                self._connected(c)
            else:
                self._welcome(c)

    def _read(self, c: Conn) -> bytes | None:
        try:
            data = c.sock.recv(1 << 20)
        except BlockingIOError:
            return b""
        except OSError as e:
            self.fail(c, errno.errorcode.get(e.errno or 0, "error"))
            return None
        if not data:
            self.fail(c, "closed by chatd" if c.state != JOINING else "closed before welcome")
            return None
        return data

    def _connected(self, c: Conn) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(c, errno.errorcode.get(err, str(err)))
            return
        try:
            c.sock.send(frame(c.name))
        except OSError as e:
            self.fail(c, errno.errorcode.get(e.errno or 0, "error"))
            return
        self.ep.modify(c.sock.fileno(), EPOLLIN)

    def _welcome(self, c: Conn) -> None:
        data = self._read(c)
        if not data:
            return
        c.buf += data
        frames = list(split_frames(c.buf))
        # Frames come in pairs; put back a lone sender frame.
        if len(frames) % 2:
            c.buf[:0] = frame(frames.pop())
        for i in range(0, len(frames), 2):
            sender, text = frames[i], frames[i + 1]
            if c.state == JOINING and sender == b"chatd":
                if text.startswith(b"welcome, "):
                    self.joining -= 1
                    c.state = c.want
                    self.joined.append(c)
                    if c.state == COUNT:  # what came with the welcome counts as received
                        c.nbytes += sum(HL + len(f) for f in frames[i + 2 :]) + len(c.buf)
                        c.buf.clear()
                        return
                elif text.startswith(b"name rejected") or text.startswith(b"the server is full"):
                    self.fail(c, text.decode()[:40])
                    return

    def _probe(self, c: Conn) -> None:
        data = self._read(c)
        if not data:
            return
        c.nbytes += len(data)
        c.buf += data
        frames = list(split_frames(c.buf))
        if len(frames) % 2:
            c.buf[:0] = frame(frames.pop())
        counts = c.per_sender
        now = time.monotonic_ns() if self.stamped else 0
        mine = self.probe_latencies.setdefault(c.name, []) if self.stamped else []
        for i in range(0, len(frames), 2):
            sender = frames[i]
            counts[sender] = counts.get(sender, 0) + 1
            if self.stamped and sender != b"chatd":
                took = now - int(frames[i + 1][11:31])
                self.latencies.append(took)
                mine.append(took)

    def settle(self, quiet: float = 0.3, limit: float = 60.0) -> None:
        """Read until nothing arrives for ``quiet`` seconds (notices, welcomes)."""
        deadline = time.monotonic() + limit
        last = time.monotonic()
        total = self.received()
        while time.monotonic() < deadline:
            self.poll(0.05)
            now_total = self.received()
            if now_total != total:
                total, last = now_total, time.monotonic()
            elif time.monotonic() - last >= quiet:
                return
        raise BenchError(f"traffic did not settle in {limit:g} s")

    def received(self) -> int:
        return sum(c.nbytes for c in self.joined)

    def reset_counts(self) -> None:
        for c in self.joined:
            c.nbytes = 0
            c.per_sender.clear()
            c.buf.clear()


# Scenario a: fan-out throughput.


def fanout(
    args: argparse.Namespace, receivers: int, rounds: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    senders_n, probes_n = 10, 2
    with session(args, extra) as (daemon, gen):
        names = [f"r{i:05d}" for i in range(receivers - probes_n)]
        gen.join_many(names, COUNT, 100, 120)
        _, probes = gen.join_many([f"p{i:05d}" for i in range(probes_n)], PROBE, 100, 30)
        _, senders = gen.join_many([f"s{i:05d}" for i in range(senders_n)], COUNT, 100, 30)
        gen.settle()
        gen.reset_counts()
        delivery = len(frame("s00000") + frame(message_text(0)))
        payload = frame(message_text(0))
        sender_keys = [s.name.encode() for s in senders]
        measured = [c for c in gen.joined if c not in senders]
        window = args.window

        def pump(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for s, key in zip(senders, sender_keys, strict=True):
                    if s.state == DEAD:
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
                    raise BenchError(f"clients lost: {gen.failed}")

        pump(args.warmup)
        daemon.profile(f"fanout_{receivers}")
        results = []
        for _ in range(rounds):
            b0 = sum(c.nbytes for c in measured)
            m0 = min(sum(p.per_sender.values()) for p in probes)
            meter = CpuMeter(daemon, [os.getpid()])
            t0 = time.monotonic()
            pump(args.seconds)
            dt = time.monotonic() - t0
            cpu = meter.read()
            b1 = sum(c.nbytes for c in measured)
            m1 = min(sum(p.per_sender.values()) for p in probes)
            deliveries, accepted = (b1 - b0) / delivery, m1 - m0
            busy = cpu["daemon_cpu"] * dt
            results.append(
                {
                    "deliveries_per_s": round(deliveries / dt),
                    "accepted_per_s": round(accepted / dt),
                    # chatd's CPU per unit of work: steadier than rates when
                    # other processes share the cores.
                    "chatd_cpu_us_per_message": round(busy / max(accepted, 1) * 1e6, 2),
                    "chatd_cpu_ns_per_delivery": round(busy / max(deliveries, 1) * 1e9, 1),
                    **cpu,
                    "saturated": saturated(cpu),
                }
            )
        daemon.profile_stop()
        return summarize(results) | {
            "receivers": receivers,
            "senders": senders_n,
            "window": window,
            "delivery_bytes": delivery,
        }


# Scenario b: latency at a fixed offered rate.


def _sink(port: int, halves: list[list[str]], ready: Any, go: Any, stop: Any, out: Any) -> None:
    """Forked helper: join ``halves`` as byte-counting receivers, one half per ``go``
    (``ready`` is set after each), and read until told to stop."""
    gen = Generator(port)
    try:
        for i, names in enumerate(halves):
            if i and not go.wait(180):
                raise BenchError("not told to go on")
            gen.join_many(names, COUNT, 100, 120)
            ready.set()
        deadline = time.monotonic() + 600
        while not stop.is_set() and time.monotonic() < deadline:
            # Drain every few ms rather than on every wake-up: each recv then
            # takes several messages, so this process stays light and leaves
            # the core to the probes, which timestamp as soon as they can.
            time.sleep(SINK_NAP)
            gen.poll(0)
        out.put({"failed": gen.failed, "bytes": gen.received()})
    except Exception as e:
        out.put({"error": str(e)})
    finally:
        gen.close()


PROBE_PLACES = ("first", "middle", "last")  # where in the join order the probes join
PROBES_PER_PLACE = 2


def percentiles(lat_ns: list[int]) -> dict[str, float]:
    """p50, p99 and max of latencies in ns, in ms (an empty list: zeros)."""
    lat = sorted(lat_ns)
    if not lat:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    return {
        "p50_ms": round(lat[len(lat) // 2] / 1e6, 3),
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6, 3),
        "max_ms": round(lat[-1] / 1e6, 3),
    }


def send_cost_us(sockets: int = 200, reps: int = 20) -> float:
    """The time of one send() of a 74-byte frame pair on loopback TCP, in us: the median
    over ``reps`` passes of a bare Python loop over ``sockets`` connections (nobody
    reading, as a receiver that is slower than the loop)."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(sockets)
        clients = [socket.create_connection(lst.getsockname()) for _ in range(sockets)]
        servers = [lst.accept()[0] for _ in range(sockets)]
        try:
            for s in servers:
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data = frame("s00000") + frame(message_text(0))
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for s in servers:
                    s.send(data)
                times.append((time.perf_counter() - t0) / sockets)
            return round(statistics.median(times) * 1e6, 2)
        finally:
            for s in clients + servers:
                s.close()


def latency(args: argparse.Namespace, rate: float, rounds: int) -> dict[str, Any]:
    """Latency at ``rate`` messages/s: probes joined first, in the middle and last (the
    room serves members in join order, so the last wait longest); per place and pooled."""
    receivers, senders_n = args.latency_receivers, 10
    probes_n = PROBES_PER_PLACE * len(PROBE_PLACES)
    ctx = multiprocessing.get_context("fork")
    send_us = send_cost_us()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp), args.daemon_cpu)
        ready, go, stop, out = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
        names = [f"r{i:05d}" for i in range(receivers - probes_n)]
        halves = [names[: len(names) // 2], names[len(names) // 2 :]]
        places = {
            place: [f"p{k}{i}" for i in range(PROBES_PER_PLACE)] for k, place in enumerate("fml")
        }
        gen = Generator(daemon.port)
        gen.stamped = True
        gen.join_many(places["f"], PROBE, 100, 30)
        sink = ctx.Process(target=_sink, args=(daemon.port, halves, ready, go, stop, out))
        sink.start()
        try:
            if not ready.wait(180):
                raise BenchError("the receivers did not join in time")
            ready.clear()
            gen.join_many(places["m"], PROBE, 100, 30)
            go.set()
            if not ready.wait(180):
                raise BenchError("the receivers did not join in time")
            gen.join_many(places["l"], PROBE, 100, 30)
            _, senders = gen.join_many([f"s{i:05d}" for i in range(senders_n)], COUNT, 100, 30)
            gen.settle()
            gen.reset_counts()
            seq = 0

            def offer(seconds: float) -> None:
                nonlocal seq
                start = time.monotonic()
                end = start + seconds
                while True:
                    now = time.monotonic()
                    if now >= end:
                        break
                    due = start + seq_in_round[0] / rate
                    if now >= due:
                        s = senders[seq % senders_n]
                        s.sock.send(frame(message_text(seq, time.monotonic_ns())))
                        seq += 1
                        seq_in_round[0] += 1
                        continue
                    gen.poll(min(due - now, 0.01))
                    if gen.failed:
                        raise BenchError(f"clients lost: {gen.failed}")

            seq_in_round = [0]
            offer(args.warmup)
            daemon.profile(f"latency_{rate:g}")
            results = []
            for _ in range(rounds):
                gen.latencies.clear()
                gen.probe_latencies.clear()
                seq_in_round[0] = 0
                meter = CpuMeter(daemon, [os.getpid(), sink.pid or 0])
                offer(args.seconds + 1)
                cpu = meter.read()
                # Let the last messages arrive.
                end = time.monotonic() + 0.5
                while time.monotonic() < end:
                    gen.poll(0.01)
                if not gen.latencies:
                    raise BenchError("no message reached a probe")
                row: dict[str, Any] = percentiles(gen.latencies)
                for k, place in zip("fml", PROBE_PLACES, strict=True):
                    pooled = [x for n in places[k] for x in gen.probe_latencies.get(n, [])]
                    for key, value in percentiles(pooled).items():
                        row[f"{key}_{place}"] = value
                    for n in places[k]:  # each probe of the place: p99
                        row[f"p99_ms_{n}"] = percentiles(gen.probe_latencies.get(n, []))["p99_ms"]
                results.append(
                    row | {"samples": len(gen.latencies), **cpu, "saturated": saturated(cpu)}
                )
            daemon.profile_stop()
            return summarize(results) | {
                "receivers": receivers,
                "probes": probes_n,
                "offered_per_s": rate,
                "send_us": send_us,
                "floor_ms": floor_ms(receivers, send_us),
            }
        finally:
            stop.set()
            go.set()
            with contextlib.suppress(Exception):
                sink_result = out.get(timeout=10)
                if sink_result.get("failed") or sink_result.get("error"):
                    print(f"  receivers: {sink_result}", file=sys.stderr)
            sink.join(10)
            if sink.is_alive():
                sink.kill()
            gen.close()
            daemon.stop()


def floor_ms(receivers: int, send_us: float) -> float:
    """The wait of the last member of a room for a message: one send() per receiver."""
    return round(receivers * send_us / 1000, 2)


# Scenario c: capacity.


def capacity(args: argparse.Namespace, rounds: int) -> dict[str, Any]:
    top = args.capacity
    results = []
    for _ in range(rounds):
        with session(args) as (daemon, gen):
            time.sleep(0.2)
            rss0 = daemon.rss_kib()
            daemon.profile("capacity")
            _, (caster,) = gen.join_many(["caster"], COUNT, 1, 10)
            steps: list[dict[str, Any]] = []
            clients = 1
            stopped = ""
            try:
                while clients < top:
                    clients = _capacity_step(args, daemon, gen, caster, clients, steps)
            except BenchError as e:
                stopped = f"stopped after {clients} clients: {e}"
                print(f"    {stopped}", file=sys.stderr)
            daemon.profile_stop()
            if not steps:
                raise BenchError(stopped)
            rss_top = steps[-1]["rss_mib"] * 1024
            clients = steps[-1]["clients"]
            results.append(
                {
                    "clients": clients,
                    "rss_mib": steps[-1]["rss_mib"],
                    "idle_rss_mib": round(rss0 / 1024, 1),
                    # The old way: from chatd with nobody connected, its start-up included.
                    "per_client_kib": round((rss_top - rss0) / (clients - 1), 2),
                    # The issue's: between the first step (1,000) and the last (10,000).
                    "per_member_kib": per_member_kib(steps),
                    "first_step_clients": steps[0]["clients"],
                    "connect_s_total": round(sum(s["connect_s"] for s in steps), 3),
                    "steps": steps,
                    **({"stopped": stopped} if stopped else {}),
                }
            )
    return summarize(results)


def per_member_kib(steps: list[dict[str, Any]]) -> float:
    """RSS per member added between the first step and the last, in KiB (0: one step)."""
    first, last = steps[0], steps[-1]
    if last["clients"] <= first["clients"]:
        return 0.0
    kib = (last["rss_mib"] - first["rss_mib"]) * 1024
    return round(kib / (last["clients"] - first["clients"]), 2)


def _capacity_step(
    args: argparse.Namespace,
    daemon: Daemon,
    gen: Generator,
    caster: Conn,
    clients: int,
    steps: list[dict[str, Any]],
) -> int:
    """Add up to --step clients, measure, broadcast once; return the new count."""
    batch = [f"c{i:05d}" for i in range(clients, min(args.capacity, clients + args.step))]
    took, _ = gen.join_many(batch, COUNT, 100, args.step_limit)
    clients += len(batch)
    gen.settle(limit=args.step_limit)
    rss = daemon.rss_kib()
    gen.reset_counts()
    t0 = time.monotonic()
    caster.sock.send(frame(message_text(clients)))
    want = (clients - 1) * len(frame("caster") + frame(message_text(0)))
    deadline = t0 + 30
    while gen.received() < want and time.monotonic() < deadline:
        gen.poll(0.05)
    if gen.received() < want:
        raise BenchError(f"the broadcast did not reach all {clients} clients")
    steps.append(
        {
            "clients": clients,
            "connect_s": round(took, 3),
            "broadcast_ms": round((time.monotonic() - t0) * 1000, 1),
            "rss_mib": round(rss / 1024, 3),
        }
    )
    print(f"    {steps[-1]}", file=sys.stderr)
    return clients


# Scenario e: restart without dropping anyone (chatd --daemon, SIGUSR2).


RESTART_PROBE_INTERVAL = 0.02  # seconds between the probe's messages


class Detached:
    """``chatd --daemon`` pinned to ``cpu``, found by its pidfile."""

    def __init__(self, workdir: Path, cpu: int | None) -> None:
        self.log = workdir / "chatd.log"
        self.pidfile = workdir / "chatd.pid"
        cfg = {
            "listen": ["127.0.0.1:0"],
            "max_clients": 11000,
            "flood": {"exempt": ["127.0.0.1"]},
            "address_exempt": ["127.0.0.1"],
            "max_handshakes": 20000,
            "log": {"format": "json", "file": str(self.log), "messages": False},
            "control": {"socket": str(workdir / "admin.sock")},
            "state_file": str(workdir / "state.json"),
        }
        path = workdir / "chatd.yaml"
        path.write_text(json.dumps(cfg))
        cmd = [sys.executable, "-m", "chatd", "--config", str(path), "--daemon"]
        cmd += ["--pidfile", str(self.pidfile)] + (["--allow-root"] if os.geteuid() == 0 else [])
        if cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(cpu), *cmd]
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if done.returncode:
            raise BenchError(f"chatd --daemon did not start: {done.stderr.strip()[-300:]}")
        self.pid = int(self.pidfile.read_text())
        self.port = int(self.event("startup")["listen"][0].rsplit(":", 1)[1])

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                e = json.loads(line)
                if e.get("event") == name:
                    found.append(e)
        return found

    def event(self, name: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := self.events(name):
                return found[-1]
            time.sleep(0.05)
        raise BenchError(f"no {name} event in {timeout:g} s")

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pidfile.read_text())
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)


def restart_gap(args: argparse.Namespace, clients: int, rounds: int) -> dict[str, Any]:
    """With ``clients`` connected, how long one sees no message across a restart."""
    results = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            daemon = Detached(Path(tmp), args.daemon_cpu)
            gen = Generator(daemon.port)
            try:
                gen.join_many([f"r{i:05d}" for i in range(clients)], COUNT, 100, args.step_limit)
                results.append(_restart_round(daemon, gen))
            finally:
                gen.close()
                daemon.stop()
    return summarize(results) | {"clients": clients}


def _restart_round(daemon: Detached, gen: Generator) -> dict[str, Any]:
    sender = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    receiver = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    sender.sendall(frame("probe-s"))
    receiver.sendall(frame("probe-r"))
    arrivals: list[tuple[int, float]] = []
    stop = threading.Event()

    def receive() -> None:
        buf = bytearray()
        receiver.settimeout(0.2)
        while not stop.is_set() or len(buf):
            try:
                data = receiver.recv(1 << 16)
            except TimeoutError:
                if stop.is_set():
                    return
                continue
            if not data:
                return
            buf += data
            for sender_name, text in _pairs(buf):
                if sender_name == b"probe-s":
                    arrivals.append((int(text[:10]), time.monotonic()))

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    time.sleep(0.3)
    seq = 0

    def send_for(seconds: float) -> None:
        """One message each RESTART_PROBE_INTERVAL (so the room keeps up: 50 a second
        to 10,000 is half a million deliveries a second), the crowd read meanwhile."""
        nonlocal seq
        end = time.monotonic() + seconds
        while (now := time.monotonic()) < end:
            sender.sendall(frame(message_text(seq)))
            seq += 1
            due = now + RESTART_PROBE_INTERVAL
            while (left := due - time.monotonic()) > 0:
                gen.poll(left)

    send_for(1.0)
    failed_before = sum(gen.failed.values())
    old = daemon.pid
    handovers = len(daemon.events("handover"))
    os.kill(old, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while len(daemon.events("handover")) == handovers and time.monotonic() < deadline:
        send_for(0.05)
    send_for(1.0)
    time.sleep(0.5)
    stop.set()
    reader.join(10)
    sender.close()
    receiver.close()
    daemon.pid = int(daemon.pidfile.read_text())
    seqs = [s for s, _ in arrivals]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(arrivals)]
    if daemon.pid == old:
        raise BenchError("the restart did not happen")
    passed = daemon.events("handover")[-1]
    return {
        "handover_ms": passed.get("ms", -1.0),  # the old chatd's pause, as it logs it
        "handover_parts_ms": {k: v for k, v in passed.items() if k.endswith("_ms") and k != "ms"},
        "adopt_ms": daemon.events("handover_taken")[-1].get("ms", -1.0),
        "gap_ms": round(max(gaps) * 1000, 1) if gaps else -1.0,
        "sent": seq,
        "received": len(arrivals),
        "lost_or_reordered": int(seqs != list(range(seq))),
        "crowd_dropped": sum(gen.failed.values()) - failed_before,
    }


def _pairs(buf: bytearray) -> Iterator[tuple[bytes, bytes]]:
    """Whole (sender, text) pairs taken from the front of ``buf``."""
    while True:
        if len(buf) < HL:
            return
        n1 = int(buf[:HL])
        if len(buf) < HL + n1 + HL:
            return
        n2 = int(buf[HL + n1 : HL + n1 + HL])
        end = HL + n1 + HL + n2
        if len(buf) < end:
            return
        pair = (bytes(buf[HL : HL + n1]), bytes(buf[HL + n1 + HL : end]))
        del buf[:end]
        yield pair


# Scenario d: join storm.


def join_storm(
    args: argparse.Namespace,
    in_flight: int,
    rounds: int,
    extra: dict[str, Any] | None = None,
    said: int = 0,
) -> dict[str, Any]:
    """``said``: messages said before the storm (so that each newcomer gets a replay)."""
    results = []
    for _ in range(rounds):
        with session(args, extra) as (daemon, gen):
            if said:
                _, (talker,) = gen.join_many(["talker"], COUNT, 1, 10)
                talker.sock.sendall(b"".join(frame(message_text(i)) for i in range(said)))
                wait_for_history(daemon, said)
            names = [f"j{i:05d}" for i in range(args.storm)]
            daemon.profile(f"storm_{in_flight}")
            meter = CpuMeter(daemon, [os.getpid()])
            try:
                took, joined = gen.join_many(names, COUNT, in_flight, args.step_limit)
            except BenchError:
                took, joined = args.step_limit, gen.joined
            cpu = meter.read()
            busy = cpu["daemon_cpu"] * (time.monotonic() - meter.t0)
            daemon.profile_stop()
            # The members were told of each join: what they got after their welcome.
            with contextlib.suppress(BenchError):
                gen.settle(limit=10)
            told = gen.received()
            refused = sum(gen.failed.values())
            results.append(
                {
                    "joins_per_s": round(len(joined) / took),
                    "chatd_cpu_us_per_join": round(busy / max(len(joined), 1) * 1e6, 1),
                    "notice_bytes_per_join": round(told / max(len(joined), 1)),
                    "joined": len(joined),
                    "refused_or_reset": refused,
                    "failures": dict(gen.failed),
                    **cpu,
                    "saturated": saturated(cpu),
                }
            )
    return summarize(results) | {"clients": args.storm, "in_flight": in_flight, "said": said}


def wait_for_history(daemon: Daemon, count: int, limit: float = 30.0) -> dict[str, Any]:
    """Wait until the history keeps ``count`` messages and none waits to be written."""
    deadline = time.monotonic() + limit
    while True:
        h: dict[str, Any] = daemon.request("stats")["history"]
        if h["messages"] >= count and not h["pending"]:
            return h
        if time.monotonic() > deadline:
            raise BenchError(f"the history did not reach {count} messages: {h}")
        time.sleep(0.05)


# Scenario e: fan-out with the history on and off.


def history_fanout(args: argparse.Namespace, receivers: int, rounds: int) -> dict[str, Any]:
    """Rounds alternate between off and on, so that both meet the same machine."""
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for _ in range(rounds):
        for mode, extra in (("off", HISTORY_OFF), ("on", None)):
            runs[mode].append(fanout(args, receivers, 1, extra)["rounds"][0])
    off, on = summarize(runs["off"]), summarize(runs["on"])
    return {
        "receivers": receivers,
        "off": off,
        "on": on,
        # With the history on, the share of the deliveries/s and of the messages a
        # CPU-second of chatd's relays, of what they are with it off.
        "deliveries_ratio": round(on["deliveries_per_s"] / max(off["deliveries_per_s"], 1), 3),
        "cpu_per_message_ratio": round(
            on["chatd_cpu_us_per_message"] / max(off["chatd_cpu_us_per_message"], 1e-9), 3
        ),
        "rounds": runs["off"] + runs["on"],
    }


# Scenario g: the history's write lag at a high rate.


def write_lag(args: argparse.Namespace, rounds: int) -> dict[str, Any]:
    rate, seconds, senders_n, receivers = args.lag_rate, args.lag_seconds, 10, 10
    results = []
    for _ in range(rounds):
        with session(args) as (daemon, gen):
            gen.join_many([f"r{i:05d}" for i in range(receivers)], COUNT, 100, 30)
            _, senders = gen.join_many([f"s{i:05d}" for i in range(senders_n)], COUNT, 100, 30)
            gen.settle()
            tick = 0.01  # each sender sends its share every tick, in one send()
            per_tick = rate * tick / senders_n
            owed = 0.0
            sent = 0
            meter = CpuMeter(daemon, [os.getpid()])
            start = time.monotonic()
            next_tick = start
            while time.monotonic() < start + seconds:
                owed += per_tick
                n = int(owed)
                owed -= n
                if n:
                    for s in senders:
                        data = b"".join(frame(message_text(sent + i)) for i in range(n))
                        s.out += data
                        with contextlib.suppress(BlockingIOError):
                            s.out = s.out[s.sock.send(s.out) :]
                    sent += n * senders_n
                next_tick += tick
                while (now := time.monotonic()) < next_tick:
                    gen.poll(max(0.0, min(next_tick - now, tick)))
                if gen.failed:
                    raise BenchError(f"clients lost: {gen.failed}")
            took = time.monotonic() - start
            for s in senders:
                while s.out:
                    with contextlib.suppress(BlockingIOError):
                        s.out = s.out[s.sock.send(s.out) :]
                    gen.poll(0.001)
            cpu = meter.read()
            h = wait_for_history(daemon, min(sent, 100_000), limit=60)  # keep_messages
            results.append(
                {
                    "offered_per_s": round(sent / took),
                    "kept": h["messages"],
                    "write_lag_p99_ms": round((h["write_lag_p99"] or 0) * 1000, 1),
                    "write_lag_max_ms": round((h["write_lag_max"] or 0) * 1000, 1),
                    "complete": h["complete"],
                    **cpu,
                    "saturated": saturated(cpu),
                }
            )
    return summarize(results) | {
        "senders": senders_n,
        "receivers": receivers,
        "rate": rate,
        "complete": all(r["complete"] for r in results),
    }


# Scenario m: what one member holds (tracemalloc, bench/member_memory.py).


def member_memory(args: argparse.Namespace) -> dict[str, Any]:
    """bench/member_memory.py in a subprocess, with the chatd of --chatd-root."""
    n = max(args.capacity // 10, 10)
    cmd = [sys.executable, str(ROOT / "bench" / "member_memory.py"), "--json"]
    cmd += ["--members", str(n), "--more", str(n)]
    if args.daemon_cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(args.daemon_cpu), *cmd]
    env = {**os.environ, "PYTHONPATH": str(Daemon.root)}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Daemon.root, check=False
    )
    if proc.returncode:
        raise BenchError(f"member_memory failed: {proc.stderr.strip()[-300:]}")
    res: dict[str, Any] = json.loads(proc.stdout)
    return res


# Results.


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the numeric fields over rounds, and the rounds themselves."""
    out: dict[str, Any] = {}
    for key, value in rounds[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            vals = [r[key] for r in rounds]
            med = statistics.median(vals)
            out[key] = round(med, 3) if isinstance(med, float) else med
    if "refused_or_reset" in out:
        out["refused_or_reset_total"] = sum(r["refused_or_reset"] for r in rounds)
    stopped = [r["stopped"] for r in rounds if "stopped" in r]
    if stopped:
        out["stopped"] = stopped[0]
    if "saturated" in rounds[0]:
        sides = [r["saturated"] for r in rounds]
        out["saturated"] = max(set(sides), key=sides.count)
    out["rounds"] = rounds
    return out


def machine() -> dict[str, Any]:
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "commit": commit + ("-dirty" if dirty else ""),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def table(res: dict[str, Any]) -> str:
    rows = [("scenario", "figure", "median", "target", "saturated")]
    for key, r in res["scenarios"].items():
        if "rows" in r:  # a scenario that says itself how it reads (clusterbench)
            rows.extend(tuple(row) for row in r["rows"])
        elif key.startswith("fanout"):
            target = {100: 4_000_000, 1000: 2_500_000}.get(r["receivers"])
            rows.append(
                (
                    f"a fan-out {r['receivers']} receivers",
                    "deliveries/s",
                    f"{r['deliveries_per_s']:,}",
                    f">= {target:,}" if target else "",
                    _cpu(r),
                )
            )
            rows.append(("", "accepted msgs/s", f"{r['accepted_per_s']:,}", "", ""))
            rows.append(
                (
                    "",
                    "chatd CPU per msg / delivery",
                    f"{r['chatd_cpu_us_per_message']} us / {r['chatd_cpu_ns_per_delivery']} ns",
                    "",
                    "",
                )
            )
        elif key.startswith("latency"):
            rate = r["offered_per_s"]
            target = {100: "p99 <= 8", 200: "p99 <= 10"}.get(int(rate), "")
            rows.append(
                (
                    f"b latency {r['receivers']:,} receivers {rate:g} msg/s",
                    "p50 / p99 / max ms, pooled",
                    f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} / {r['max_ms']:.2f}",
                    target if r["receivers"] == 1000 else "",
                    _cpu(r),
                )
            )
            for place in PROBE_PLACES:
                rows.append(
                    (
                        "",
                        f"probes joined {place}" + (" (the old way)" if place == "last" else ""),
                        f"{r[f'p50_ms_{place}']:.2f} / {r[f'p99_ms_{place}']:.2f} / "
                        f"{r[f'max_ms_{place}']:.2f}",
                        "",
                        "",
                    )
                )
            rows.append(
                (
                    "",
                    "floor: receivers x send()",
                    f"{r['floor_ms']:.2f} ms ({r['receivers']:,} x {r['send_us']} us)",
                    "",
                    "",
                )
            )
        elif key == "capacity":
            rows.append(
                (
                    f"c capacity {int(r['clients']):,} clients",
                    "RSS MiB / KiB per client",
                    f"{r['rss_mib']} / {r['per_client_kib']}",
                    "10,000 clients",
                    "",
                )
            )
            rows.append(
                (
                    "",
                    f"KiB per member, {int(r['first_step_clients']):,} to {int(r['clients']):,}",
                    f"{r['per_member_kib']}",
                    "<= 2.0",
                    "",
                )
            )
            rows.append(("", "connect s (all steps)", f"{r['connect_s_total']}", "", ""))
            if "stopped" in r:
                rows.append(("", "", r["stopped"][:60], "", ""))
        elif key.startswith("history_fanout"):
            target = ">= 0.9" if r["receivers"] in (100, 1000) else ""
            rows.append(
                (
                    f"f history on/off, {r['receivers']:,} receivers",
                    "deliveries/s on / off",
                    f"{r['on']['deliveries_per_s']:,} / {r['off']['deliveries_per_s']:,} "
                    f"= {r['deliveries_ratio']}",
                    target,
                    f"on: {_cpu(r['on'])}",
                )
            )
            rows.append(
                (
                    "",
                    "chatd CPU per msg on / off",
                    f"{r['on']['chatd_cpu_us_per_message']} / "
                    f"{r['off']['chatd_cpu_us_per_message']} us",
                    "",
                    f"off: {_cpu(r['off'])}",
                )
            )
        elif key == "write_lag":
            rows.append(
                (
                    f"h history write lag, {r['rate']:,} msg/s",
                    "p99 / max ms (offered/s)",
                    f"{r['write_lag_p99_ms']} / {r['write_lag_max_ms']} ({r['offered_per_s']:,})",
                    "p99 < 200" if r["rate"] >= 10000 else "",
                    _cpu(r),
                )
            )
        elif key.startswith("storm"):
            target = ">= 10,000" + (", none refused" if r["in_flight"] == 100 else "")
            what = "d join storm"
            if key.startswith("storm_replay"):
                what = "g join storm, replay 20" if r["said"] else "g join storm, no history"
            rows.append(
                (
                    f"{what} {r['clients']:,}, {r['in_flight']} in flight",
                    "joins/s (refused/reset)",
                    f"{r['joins_per_s']:,} ({r['refused_or_reset_total']}), "
                    f"chatd {r['chatd_cpu_us_per_join']} us/join",
                    target,
                    _cpu(r),
                )
            )
            rows.append(
                ("", "notice bytes to members per join", f"{r['notice_bytes_per_join']:,}", "", "")
            )
        elif key == "memory":
            rows.append(
                (
                    "m one idle member (tracemalloc)",
                    "Python bytes per member",
                    f"{r['python_bytes_per_member']:,}",
                    "",
                    "",
                )
            )
            for part in r["breakdown"][:6]:
                rows.append(("", f"  {part['what']}", f"{part['bytes']} B", "", ""))
        elif key.startswith("restart"):
            rows.append(
                (
                    f"e restart, {r['clients']:,} connected",
                    "longest wait seen by a client",
                    f"{r['gap_ms']:,} ms, lost or reordered {r['lost_or_reordered']}, "
                    f"dropped {r['crowd_dropped']}",
                    "< 1,000 ms at 10,000" if r["clients"] >= 10000 else "",
                    "",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _cpu(r: dict[str, Any]) -> str:
    return (
        f"{r['saturated']} (chatd {r['daemon_cpu']:.0%}, gen {r['generator_cpu']:.0%}, "
        f"other {r['other_cpu']:.0%})"
    )


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one round of each scenario")
    p.add_argument("--rounds", type=int, default=5, help="rounds per scenario (default 5)")
    p.add_argument(
        "--scenarios", default="abcdefghim", help="which scenarios to run (default abcdefghim)"
    )
    p.add_argument("--seconds", type=float, default=2.0, help="seconds measured per round")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    p.add_argument("--window", type=int, default=32, help="messages a sender may have in flight")
    p.add_argument("--capacity", type=int, default=10000, help="clients in scenario c")
    p.add_argument("--storm", type=int, default=2000, help="clients in scenario d")
    p.add_argument("--restart", type=int, default=10000, help="clients in scenario e")
    p.add_argument(
        "--restart-small", type=int, default=1000, help="clients in the smaller run of scenario e"
    )
    p.add_argument(
        "--receivers",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[100, 1000],
        help="receiver counts in scenario a (default 100,1000)",
    )
    p.add_argument("--latency-receivers", type=int, default=1000, help="receivers in scenario b")
    p.add_argument(
        "--latency-rates",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[100.0, 200.0],
        help="messages/s offered in scenario b (default 100,200)",
    )
    p.add_argument(
        "--chatd-root",
        metavar="DIR",
        help="run the chatd of another checkout (an A/B comparison; default this one)",
    )
    p.add_argument("--step", type=int, default=1000, help="clients added per step in c")
    p.add_argument(
        "--lag-rate", type=int, default=10000, help="messages/s offered in g (default 10000)"
    )
    p.add_argument("--lag-seconds", type=float, default=5.0, help="seconds offered in g")
    p.add_argument("--step-limit", type=float, default=60.0, help="seconds allowed per step")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="sample chatd with py-spy (pip install -e '.[bench]') during each\n"
        "scenario's measurement; collapsed stacks go to DIR/<scenario>.txt",
    )
    p.add_argument("--out", help="JSON file (default bench/results/<time>-<commit>.json)")
    args = p.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    if args.chatd_root:
        Daemon.root = Path(args.chatd_root).resolve()
    if args.profile:
        Daemon.profile_dir = Path(args.profile)
        Daemon.profile_dir.mkdir(parents=True, exist_ok=True)
    cores = sorted(os.sched_getaffinity(0))
    args.daemon_cpu = cores[0] if len(cores) > 1 else None
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[1]})
    nofile = raise_nofile()
    if nofile < args.capacity + 100:
        print(f"warning: only {nofile} descriptors; capacity will fail", file=sys.stderr)
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "rounds": rounds,
        "pinning": (
            f"chatd on cpu {cores[0]} (taskset), generator on cpu {cores[1]}"
            if len(cores) > 1
            else "one core: no pinning"
        ),
        "chatd_config": "defaults (log level info, JSON, message text logged, history "
        "kept in a file in a temporary directory) except listen 127.0.0.1:0, "
        "max_clients 11000, flood.exempt and address_exempt [127.0.0.1], "
        "max_handshakes 20000, control socket in the temporary directory; "
        "history off where a scenario says so (keep_messages 0, file ''); "
        "stdout read and discarded",
        "note": "other work on this machine may share its cores: figures are medians over rounds",
        "chatd_root": str(Daemon.root),
        "scenarios": {},
    }
    plan: list[tuple[str, str, Callable[[], dict[str, Any]]]] = []
    if "a" in args.scenarios:
        for n in args.receivers:
            plan.append(("a", f"fanout_{n}", lambda n=n: fanout(args, n, rounds)))
    if "b" in args.scenarios:
        for rate in args.latency_rates:
            plan.append(("b", f"latency_{rate:g}", lambda rate=rate: latency(args, rate, rounds)))
    if "c" in args.scenarios:
        plan.append(("c", "capacity", lambda: capacity(args, 1 if args.quick else 2)))
    if "d" in args.scenarios:
        plan.append(("d", "storm_10", lambda: join_storm(args, 10, rounds)))
        plan.append(("d", "storm_100", lambda: join_storm(args, 100, rounds)))
    if "m" in args.scenarios:
        plan.append(("m", "memory", lambda: member_memory(args)))
    if "e" in args.scenarios:
        for n in (args.restart_small, args.restart):
            plan.append(
                ("e", f"restart_{n}", lambda n=n: restart_gap(args, n, 1 if args.quick else 3))
            )
    if "f" in args.scenarios:
        for n in args.receivers:
            plan.append(("f", f"history_fanout_{n}", lambda n=n: history_fanout(args, n, rounds)))
    if "g" in args.scenarios:
        plan.append(("g", "storm_replay_20", lambda: join_storm(args, 100, rounds, said=20)))
        plan.append(("g", "storm_replay_off", lambda: join_storm(args, 100, rounds, HISTORY_OFF)))
    if "h" in args.scenarios:
        plan.append(("h", "write_lag", lambda: write_lag(args, rounds)))
    if "i" in args.scenarios:
        import clusterbench  # beside this file

        me = sys.modules[__name__]
        for n in args.receivers:
            plan.append(
                ("i", f"cluster_fanout_{n}", lambda n=n: clusterbench.fanout(me, args, n, rounds))
            )
        plan.append(("i", "cluster_latency", lambda: clusterbench.latency(me, args, rounds)))
    failed = False
    for _letter, key, run in plan:
        print(f"== {key}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            res["scenarios"][key] = run()
        except BenchError as e:
            print(f"  {key} failed: {e}", file=sys.stderr)
            res["scenarios"][key] = {"error": str(e)}
            failed = True
            continue
        shown = {k: v for k, v in res["scenarios"][key].items() if k not in ("rounds", "steps")}
        print(f"  {time.monotonic() - t0:.1f} s: {shown}", file=sys.stderr, flush=True)
    out = Path(args.out) if args.out else None
    if out is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        out = RESULTS / f"{stamp}-{res['machine']['commit']}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    ok = {k: v for k, v in res["scenarios"].items() if "error" not in v}
    print(table({"scenarios": ok}))
    for key, v in res["scenarios"].items():
        if "error" in v:
            print(f"{key}: FAILED: {v['error']}")
    m = res["machine"]
    print(
        f"\n{res['date']}  {m['cpu_model']}, {m['cores']} cores, Python {m['python']}, "
        f"commit {m['commit']}; {res['pinning']}; rounds: {rounds} (medians)"
    )
    print(f"chatd config: {res['chatd_config']}")
    print(f"results: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
