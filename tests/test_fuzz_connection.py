"""Fuzz target: the raw byte stream of one connection, against the real daemon.

Hypothesis builds streams from valid frames, commands, bad headers, huge
lengths, invalid UTF-8 and plain garbage, cut into arbitrary pieces, and ends
each with a close, a reset or nothing.  After every stream the daemon must be
alive, have logged no internal error, accept a new client and let two
bystanders chat both ways within a second.  The fuzzer connects from
127.0.0.2 so flood control applies to it but not to the bystanders (exempt
127.0.0.1).  The default suite runs a few dozen streams; `make fuzz` runs
thousands (CHATD_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Bystanders, Daemon, frame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("CHATD_FUZZ_EXAMPLES", "0")) or 40
FUZZ_HOST = "127.0.0.2"
NAME = b"\0NAME\0"  # replaced by a fresh valid name frame when sent


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Bystanders]]:
    try:
        with socket.create_connection(("127.0.0.1", 9), timeout=1, source_address=(FUZZ_HOST, 0)):
            pass
    except ConnectionRefusedError:
        pass  # reachable: nothing listens on port 9, as expected
    except OSError as e:
        pytest.skip(f"cannot connect from {FUZZ_HOST}: {e}")
    daemon = Daemon(
        Path(tmp_path_factory.mktemp("fuzz")),
        {
            "handshake_timeout": 1,
            "shutdown_grace": 0.5,
            "max_message_bytes": 2000,
            "flood": {"rate": 20, "burst": 3, "max_dropped": 4, "exempt": ["127.0.0.3"]},
            "log": {"messages": False},
        },
    )
    by = Bystanders(daemon)
    yield daemon, by
    for sock in KEPT:
        sock.close()
    KEPT.clear()
    rc = daemon.stop()
    seen = Counter(
        f"{e['event']}: {e['reason']}" if "reason" in e else e["event"] for e in daemon.events
    )
    print("\nfuzz: what the daemon logged:", dict(sorted(seen.items())))
    assert rc == 0
    assert "Traceback" not in daemon.stderr, daemon.stderr
    assert not daemon.find("internal_error")


def header(n: int) -> bytes:
    return f"{n:<10}".encode()[:10]


COMMANDS = ["/who", "/help", "/me", "/msg", "/quit", "//", "/", "/nick", "/msg bystander-a"]

pieces = st.one_of(
    st.just(NAME),
    st.text(max_size=40).map(frame),  # messages, control characters included
    st.tuples(st.sampled_from(COMMANDS), st.text(max_size=20)).map(
        lambda c: frame(f"{c[0]} {c[1]}")
    ),
    st.binary(max_size=40).map(frame),  # any payload, invalid UTF-8 included
    st.integers(0, 10**10).map(header),  # a header alone: a stall, a huge length
    st.binary(min_size=10, max_size=10),  # any header
    st.sampled_from([b"", b" " * 10, b"-1        ", b"+1        ", b"1_0       ", b"0x10      "]),
    st.binary(max_size=200),  # garbage
)
# Half the streams start with a good name, to reach the joined state's code.
streams = st.tuples(st.booleans(), st.lists(pieces, min_size=1, max_size=30)).map(
    lambda t: [NAME, *t[1]] if t[0] else t[1]
)
cuts = st.lists(st.integers(1, 64), max_size=20)
endings = st.sampled_from(["close", "reset", "keep"])

_names = itertools.count()


def send_stream(port: int, data: bytes, cut: list[int]) -> socket.socket:
    """Connect from FUZZ_HOST and send ``data`` in pieces of the sizes in ``cut``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(FUZZ_HOST, 0))
    pos = 0
    with contextlib.suppress(OSError):  # the daemon may close on us mid-stream
        for size in [*cut, len(data)]:
            if pos >= len(data):
                break
            sock.sendall(data[pos : pos + size])
            pos += size
    return sock


KEPT: list[socket.socket] = []  # connections left open, closed with the daemon


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=streams, cut=cuts, ending=endings)
def test_any_byte_stream(
    target: tuple[Daemon, Bystanders], stream: list[bytes], cut: list[int], ending: str
) -> None:
    daemon, by = target
    data = b"".join(frame(f"fz{next(_names)}") if p == NAME else p for p in stream)
    sock = send_stream(daemon.port, data, cut)
    try:
        by.check()
        assert daemon.proc.poll() is None, "chatd died"
        assert not daemon.find("internal_error"), daemon.find("internal_error")
    finally:
        if ending == "keep":
            KEPT.append(sock)
        else:
            if ending == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
