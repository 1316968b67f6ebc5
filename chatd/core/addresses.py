"""Peer addresses and the networks they are matched against (bans, flood exemptions).

One matcher for the whole daemon: an IPv4 peer that reaches an IPv6 socket arrives as
``::ffff:10.0.0.1`` and is matched as 10.0.0.1; an IPv6 scope (``fe80::1%eth0``) is
ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=4096)  # the same peers over and over; the addresses are immutable
def peer_address(host: str) -> IPAddress | None:
    """The address of a peer as the kernel reports it, an IPv4-mapped one as IPv4."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_network(text: str) -> IPNetwork | None:
    """The network ``text`` names (an address is a /32 or /128), or None.

    ``::ffff:10.0.0.0/120`` is 10.0.0.0/24: the IPv4-mapped form of a network is the
    network, as it is for a peer.
    """
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return net


def in_networks(host: str, networks: Iterable[IPNetwork]) -> bool:
    """Whether the peer ``host`` is in one of ``networks``."""
    if not networks:
        return False
    addr = peer_address(host)
    if addr is None:
        return False
    return any(addr.version == net.version and addr in net for net in networks)
