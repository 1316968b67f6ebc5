"""systemd integration in the standard library: sd_notify and socket activation.

``Notifier`` speaks the sd_notify datagram protocol: newline-separated
``KEY=VALUE`` assignments (READY=1, STATUS=..., RELOADING=1, STOPPING=1,
WATCHDOG=1) sent to the AF_UNIX datagram socket named by $NOTIFY_SOCKET, a
path or, with a leading "@", an abstract name.  Without $NOTIFY_SOCKET it does
nothing, so the daemon calls it unconditionally.

``listen_fds()`` takes the listening sockets systemd passes (LISTEN_FDS
descriptors from fd 3 on, meant for the process whose pid is LISTEN_PID).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

SD_LISTEN_FDS_START = 3
SCM_MAX_FD = 253  # descriptors the kernel passes in one message


def fdstore_size(environ: Mapping[str, str] | None = None) -> int:
    """How many descriptors the manager keeps for chatd ($FDSTORE: set by systemd 254
    and newer from FileDescriptorStoreMax=, and by chatd.service for older ones)."""
    env = os.environ if environ is None else environ
    value = env.get("FDSTORE", "")
    return int(value) if value.isdigit() else 0


def passed_fds(environ: MutableMapping[str, str] | None = None) -> list[tuple[int, str]] | None:
    """The descriptors systemd passed (socket activation, the fd store) with their
    names, or None when it passed none.  The variables are removed so that no child
    takes them."""
    env = os.environ if environ is None else environ
    pid = env.pop("LISTEN_PID", "")
    count = env.pop("LISTEN_FDS", "")
    names = env.pop("LISTEN_FDNAMES", "")
    if not pid or not count or pid != str(os.getpid()):
        return None
    if not count.isdigit() or int(count) < 1:
        raise ActivationError(f"LISTEN_FDS: expected a positive number, got {count!r}")
    fdnames = names.split(":") if names else []
    passed = []
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        passed.append((fd, fdnames[i] if i < len(fdnames) else "unknown"))
    return passed


class ActivationError(Exception):
    """The inherited sockets cannot be used; str() is the one-line reason."""


class Notifier:
    """A connected, non-blocking datagram socket to the service manager, or nothing."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.sock: socket.socket | None = None
        self.error: str | None = None
        if not address:
            return
        if address.startswith("@"):
            target = "\0" + address[1:]
        elif address.startswith("/"):
            target = address
        else:
            self.error = f"unsupported NOTIFY_SOCKET {address!r}"
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(target)
        except OSError as e:
            sock.close()
            self.error = f"cannot connect to NOTIFY_SOCKET {address!r}: {e.strerror or e}"
            return
        sock.setblocking(False)
        self.sock = sock

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier $NOTIFY_SOCKET names; the variable is removed so children don't use it."""
        env = os.environ if environ is None else environ
        return cls(env.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True if it was sent.

        Never blocks: a full queue at the manager loses the datagram (the next
        STATUS or WATCHDOG replaces it), and the reason is kept in ``error``.
        """
        if self.sock is None:
            return False
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            self.sock.send(message)
        except OSError as e:
            self.error = f"sd_notify failed: {e.strerror or e}"
            return False
        return True

    def ready(self, status: str, log: Any, call_at: Callable[[float, Any, Any], None]) -> None:
        """Say READY=1 with the first STATUS=, and start the watchdog's pings at half
        its interval: a timer of the loop, so when the loop is stuck the pings stop
        and systemd acts."""
        if self.error:
            log.warning("sd_notify_unavailable", error=self.error)
        if not self.enabled:
            return
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
        interval = watchdog_usec() / 2e6
        if interval <= 0:
            return
        log.info("watchdog", ping_seconds=interval)

        def ping(_: Any) -> None:
            self.notify("WATCHDOG=1")
            call_at(time.monotonic() + interval, ping, None)

        call_at(time.monotonic() + interval, ping, None)

    def store(self, fds: list[int], name: str) -> bool:
        """Keep ``fds`` in the manager's file descriptor store under ``name`` (FDSTORE=1):
        the next chatd gets them back.  At most SCM_MAX_FD a message."""
        if self.sock is None:
            return False
        message = f"FDSTORE=1\nFDNAME={name}".encode()
        try:
            for i in range(0, len(fds), SCM_MAX_FD):
                socket.send_fds(self.sock, [message], fds[i : i + SCM_MAX_FD])
        except OSError as e:
            self.error = f"sd_notify FDSTORE failed: {e.strerror or e}"
            return False
        return True

    def unstore(self, name: str) -> bool:
        """Drop the descriptors stored under ``name`` (FDSTOREREMOVE=1)."""
        return self.notify("FDSTOREREMOVE=1", f"FDNAME={name}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, for RELOADING=1's MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_usec(environ: Mapping[str, str] | None = None) -> int:
    """The watchdog interval systemd asks for ($WATCHDOG_USEC), or 0 for none."""
    env = os.environ if environ is None else environ
    value = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not value.isdigit() or (pid and pid != str(os.getpid())):
        return 0
    return int(value)


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[socket.socket] | None:
    """The listening TCP sockets systemd passed, or None when not socket-activated.

    LISTEN_PID must name this process (the variables may have been inherited
    by mistake).  The variables are removed so that no child takes them.
    Raises ActivationError when a passed descriptor is not a listening TCP
    socket.
    """
    passed = passed_fds(environ)
    if passed is None:
        return None
    socks: list[socket.socket] = []
    try:
        for fd, name in passed:
            label = f"fd {fd}" + (f" ({name})" if name != "unknown" else "")
            socks.append(_adopt(fd, label))
    except ActivationError:
        for s in socks:
            s.close()
        raise
    return socks


def adopt_listener(fd: int, label: str) -> socket.socket:
    """The listening TCP socket ``fd``; ActivationError if it is not one."""
    return _adopt(fd, label)


def _adopt(fd: int, label: str) -> socket.socket:
    try:
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise ActivationError(f"LISTEN_FDS: {label} is not a socket: {e.strerror or e}") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if (
        sock.family not in (socket.AF_INET, socket.AF_INET6)
        or sock.type != socket.SOCK_STREAM
        or not listening
    ):
        sock.detach()
        raise ActivationError(f"LISTEN_FDS: {label} is not a listening TCP socket")
    return sock
