"""What one idle room member holds in chatd, by tracemalloc (scenario m of chatbench).

    python bench/member_memory.py [--members 1000] [--more 1000] [--json]

chatd runs in this process (a real `Server` on 127.0.0.1:0, stepped by hand) with
tracemalloc on; a forked child connects ``--members`` clients, which join the room
and stay idle, then ``--more``.  The allocations that appeared between the two
snapshots, divided by ``--more``, are what one member costs; each is put under the
part of chatd that made it (the innermost frame in chatd/, and the library line
that allocated).  The kernel's socket buffers are not Python memory: not here.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import socket
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

HL = 10
FRAMES = 30  # traceback depth kept by tracemalloc

# (file suffix, function or "", label), checked innermost frame first: what the
# allocation is, in words.  The first that matches a frame names the allocation.
LABELS = (
    ("socket.py", "accept", "socket object (accept)"),
    ("selectors.py", "register", "selector key and its maps (register)"),
    ("selectors.py", "modify", "selector key and its maps (register)"),
    ("chatd/wire/framing.py", "", "frame decoder"),
    ("chatd/server/connection.py", "__init__", "Connection (peer strings, counters)"),
    ("chatd/server/server.py", "adopt", "Connection object and server.conns entry"),
    ("chatd/core/room.py", "join", "room: members and look-alike keys"),
    ("chatd/core/names.py", "name_keys", "room: look-alike keys (skeletons)"),
    ("chatd/core/admission.py", "", "admission counters"),
    ("chatd/wire/tokenbucket.py", "", "flood bucket"),
    ("chatd/server/outbox.py", "", "outbox queue"),
    ("chatd/server/connection.py", "readable", "name and frames read"),
    ("chatd/core/chat.py", "name_received", "name and welcome"),
    ("structlog", "", "bound logger"),
)


def label(tb: tracemalloc.Traceback) -> str:
    for frame in reversed(tb):  # innermost first
        for suffix, func, name in LABELS:
            if frame.filename.endswith(suffix) and (not func or _func(frame) == func):
                return name
    inner = tb[-1]
    return f"other ({Path(inner.filename).name}:{inner.lineno})"


_SOURCE: dict[str, list[str]] = {}


def _func(frame: tracemalloc.Frame) -> str:
    """The name of the function ``frame`` is in (tracemalloc keeps file and line only)."""
    lines = _SOURCE.get(frame.filename)
    if lines is None:
        try:
            lines = Path(frame.filename).read_text().splitlines()
        except OSError:
            lines = []
        _SOURCE[frame.filename] = lines
    for i in range(min(frame.lineno, len(lines)) - 1, -1, -1):
        text = lines[i].lstrip()
        if text.startswith(("def ", "async def ")):
            return text.split("def ", 1)[1].split("(", 1)[0]
    return ""


def breakdown(stats: list[tracemalloc.StatisticDiff], members: int) -> list[dict[str, Any]]:
    """Bytes and blocks per member, by label, largest first (pure: for tests)."""
    rows: dict[str, list[float]] = {}
    for s in stats:
        if s.size_diff <= 0:
            continue
        row = rows.setdefault(label(s.traceback), [0.0, 0.0])
        row[0] += s.size_diff
        row[1] += s.count_diff
    out = [
        {"what": k, "bytes": round(v[0] / members), "blocks": round(v[1] / members, 1)}
        for k, v in rows.items()
    ]
    out.sort(key=lambda r: -r["bytes"])
    return out


def _clients(port: int, counts: list[int], go: int, done: int) -> None:
    """The forked child: join counts[0] idle members, wait for a byte on ``go``, and so
    on; what chatd sends them is read and dropped (else they would be slow consumers)."""
    import select

    ep = select.epoll()
    ep.register(go, select.EPOLLIN)
    socks: dict[int, socket.socket] = {}

    def drain(timeout: float) -> bool:
        """Read what came; True if a byte arrived on ``go``."""
        woke = False
        for fd, _ in ep.poll(timeout):
            if fd == go:
                os.read(go, 1)
                woke = True
            else:
                try:
                    socks[fd].recv(1 << 16)
                except OSError:
                    pass
        return woke

    n = 0
    try:
        for i, count in enumerate(counts):
            if i:
                while not drain(0.05):
                    pass
            for _ in range(count):
                s = socket.create_connection(("127.0.0.1", port))
                name = f"m{n:05d}".encode()
                s.sendall(b"%-*d" % (HL, len(name)) + name)
                s.setblocking(False)
                socks[s.fileno()] = s
                ep.register(s.fileno(), select.EPOLLIN)
                n += 1
                drain(0)
            os.write(done, b"x")
        deadline = time.monotonic() + 600
        while not drain(0.05) and time.monotonic() < deadline:  # the end
            pass
    finally:
        for s in socks.values():
            s.close()
        os._exit(0)


def _nothing(_: Any) -> None:
    pass


def measure(members: int, more: int) -> dict[str, Any]:
    from chatd.server import config as configmod
    from chatd.server.server import Server

    tmp = tempfile.mkdtemp(prefix="chatd-mem-")
    raw = {
        "listen": ["127.0.0.1:0"],
        "max_clients": members + more + 100,
        "flood": {"exempt": ["127.0.0.1"]},
        "address_exempt": ["127.0.0.1"],
        "max_handshakes": 20000,
        "log": {"format": "json", "file": os.devnull},
        "control": {"socket": ""},
        "state_file": str(Path(tmp) / "state.json"),
    }
    with contextlib.suppress(ImportError):  # a chatd that keeps a history: in tmp
        from chatd.server.config import HistoryConfig  # noqa: F401

        raw["history"] = {"file": str(Path(tmp) / "history.sqlite")}
    server = Server(configmod.build(raw, "<member_memory>"))
    server.open(signals=False)
    port = server.listeners[0].sock.getsockname()[1]
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _clients(port, [members, more], go_r, done_w)
    os.set_blocking(done_r, False)
    room = server.chat.room

    def step() -> None:  # a pass that waits 50 ms at most
        server.loop.call_at(time.monotonic() + 0.05, _nothing)
        server.step()

    def serve_until(count: int, limit: float = 120.0) -> None:
        deadline = time.monotonic() + limit
        while len(room) < count and time.monotonic() < deadline:
            step()
        quiet = time.monotonic() + 0.3  # the held notices go out, queues empty
        while time.monotonic() < quiet:
            step()
        if len(room) < count:
            raise RuntimeError(f"only {len(room)} of {count} members joined")

    try:
        tracemalloc.start(FRAMES)
        serve_until(members)
        gc.collect()
        before = tracemalloc.take_snapshot()
        os.write(go_w, b"x")
        serve_until(members + more)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        stats = after.compare_to(before, "traceback")
        rows = breakdown(stats, more)
        total = sum(s.size_diff for s in stats) / more
        return {
            "members": members,
            "more": more,
            "python_bytes_per_member": round(total),
            "breakdown": rows,
        }
    finally:
        os.write(go_w, b"x")
        os.waitpid(pid, 0)
        server.stop("bench")
        server.close_all()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--members", type=int, default=1000, help="members before (default 1000)")
    p.add_argument("--more", type=int, default=1000, help="members added (default 1000)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = p.parse_args(argv)
    res = measure(args.members, args.more)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"Python memory per idle member: {res['python_bytes_per_member']} bytes")
    for row in res["breakdown"]:
        print(f"{row['bytes']:6d} B {row['blocks']:5.1f} blocks  {row['what']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
