#!/usr/bin/python3
"""Chat clients for the system test, run inside the box (standard library only).

    chatcheck.py chat PORT            alice and bob join; bob's message reaches alice
    chatcheck.py too-long PORT BYTES  a message of BYTES bytes gets a protocol error
    chatcheck.py wait PORT SECONDS    connect (retrying until SECONDS), join, check welcome
    chatcheck.py hold PORT NAME SECONDS  join as NAME and stay for SECONDS
    chatcheck.py restarts PORT DIR    alice, bob and carol chat while the test restarts
                                      chatd: DIR/ready once joined, DIR/done ends it
    chatcheck.py goodbye PORT NOTICE  join, then expect NOTICE as the last word

Prints one line and exits 0 when all went as expected, 1 otherwise.
"""

from __future__ import annotations

import socket
import sys
import time

TIMEOUT = 10.0


def frame(text: str) -> bytes:
    data = text.encode()
    return f"{len(data):<10}".encode() + data


class Client:
    def __init__(self, port: int, retry_for: float = 0.0, source: str = "") -> None:
        deadline = time.monotonic() + retry_for
        while True:
            try:
                self.sock = socket.create_connection(
                    ("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0)
                )
                break
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
        self.buf = b""

    def _take(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> tuple[str, str] | None:
        pair = []
        for _ in range(2):
            header = self._take(10)
            if header is None:
                return None
            payload = self._take(int(header))
            if payload is None:
                return None
            pair.append(payload.decode())
        return pair[0], pair[1]

    def join(self, name: str) -> str:
        self.sock.sendall(frame(name))
        got = self.recv()
        if not got or not got[1].startswith(f"welcome, {name}"):
            fail(f"{name} was not welcomed: {got}")
        return got[1]

    def until(self, sender: str) -> str:
        while True:
            got = self.recv()
            if got is None:
                fail(f"closed while waiting for {sender}")
            if got[0] == sender:
                return got[1]


def fail(why: str) -> None:
    print(f"FAIL: {why}")
    sys.exit(1)


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "chat":
        alice = Client(port)
        alice.join("alice")
        bob = Client(port)
        bob.join("bob")
        bob.sock.sendall(frame("hello from bob"))
        text = alice.until("bob")
        if text != "hello from bob":
            fail(f"alice got {text!r}")
        print("ok: alice got bob's message")
    elif mode == "too-long":
        size = int(sys.argv[3])
        alice = Client(port)
        alice.join("alice")
        alice.sock.sendall(frame("x" * size))
        notices = []
        while (got := alice.recv()) is not None:
            notices.append(got[1])
        if not any(n.startswith("protocol error: frame of") for n in notices):
            fail(f"a {size}-byte message was not refused: {notices}")
        print(f"ok: a {size}-byte message was refused: {notices[-1]}")
    elif mode == "wait":
        client = Client(port, retry_for=float(sys.argv[3]))
        print(f"ok: {client.join('early')}")
    elif mode == "hold":
        client = Client(port)
        client.join(sys.argv[3])
        client.sock.settimeout(float(sys.argv[4]))
        try:
            while client.recv() is not None:
                pass
        except TimeoutError:
            pass
        print(f"ok: {sys.argv[3]} stayed")
    elif mode == "restarts":
        restarts(port, sys.argv[3])
    elif mode == "goodbye":
        client = Client(port)
        client.join("leaving")
        last = None
        while (got := client.recv()) is not None:
            last = got
        if last is None or not last[1].startswith(sys.argv[3]):
            fail(f"the last word was {last}, not {sys.argv[3]!r}")
        print(f"ok: {last[1]}")
    else:
        fail(f"unknown mode {mode}")


def restarts(port: int, where: str) -> None:
    """A numbered stream from alice, across the restarts, must reach bob and carol whole
    and in order on the same connections, and they must still reach alice."""
    import os

    alice, bob, carol = (
        Client(port),
        Client(port, source="127.0.0.2"),
        Client(port, source="127.0.0.3"),
    )
    for name, c in (("alice", alice), ("bob", bob), ("carol", carol)):
        c.join(name)
    ports = [c.sock.getsockname() for c in (alice, bob, carol)]
    open(os.path.join(where, "ready"), "w").close()
    sent = 0
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(where, "done")):
        if time.monotonic() > deadline:
            fail("the restarts took more than 120 s")
        alice.sock.sendall(frame(f"n{sent}"))  # 8 a second, under the flood limit of 10
        sent += 1
        time.sleep(0.125)
    restarted = 0
    for reader in (bob, carol):
        got = []
        while len(got) < sent:
            pair = reader.recv()
            if pair is None:
                fail(f"closed after {got[-3:]} of {sent}")
            if pair[0] == "alice":
                got.append(pair[1])
            elif pair[1].startswith("chatd restarted"):
                restarted += 1
        if got != [f"n{i}" for i in range(sent)]:
            fail(f"the stream arrived as {got}")
    bob.sock.sendall(frame("bob after the restarts"))
    if alice.until("bob") != "bob after the restarts":
        fail("alice did not get bob's message")
    if [c.sock.getsockname() for c in (alice, bob, carol)] != ports:
        fail("not the same connections")
    print(f"ok: {sent} messages across the restarts, whole and in order", end="")
    print(f"; {restarted // 2} restart notices")


if __name__ == "__main__":
    main()
