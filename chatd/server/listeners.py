"""The listening TCP sockets: binding the configured addresses, and the file limit."""

from __future__ import annotations

import contextlib
import resource
import socket

from chatd.server.config import Address
from chatd.server.errors import StartupError
from chatd.wire.errors import os_reason

BACKLOG = 4096


def raise_nofile_limit() -> int:
    """Raise the open-file soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if want > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    return soft


def bind_all(addresses: tuple[Address, ...]) -> list[socket.socket]:
    """A listening socket for each address; raises StartupError (none left open)."""
    socks: list[socket.socket] = []
    try:
        for addr in addresses:
            socks.append(bind(addr))
    except StartupError:
        for s in socks:
            s.close()
        raise
    return socks


def bind(addr: Address, backlog: int = BACKLOG) -> socket.socket:
    try:
        infos = socket.getaddrinfo(
            addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        raise StartupError(f"cannot listen on {addr}: {e.strerror}") from None
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {addr}: {os_reason(e)}") from None
    return sock


def sock_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return str(Address(host, port))
