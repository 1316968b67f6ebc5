"""Who may hold a place, and the flood bucket each address shares.

One script on one address must not be able to take every slot, nor escape flood
control by opening more connections:

- at most ``max_clients`` connections at once, and ``max_per_address`` from one
  address (an IPv6 address counts as its /64, which one host usually has);
- at most ``max_handshakes`` connections at once that have not sent a name yet, and
  ``max_handshakes_per_address`` from one address; past half of
  ``max_handshakes`` a new connection is dropped at random, the more likely the
  fuller it is (OpenSSH's MaxStartups), so a flood of idle connections cannot lock
  real users out for as long as it lasts;
- the connections from one address share one flood bucket.

``address_exempt`` lifts the per-address limits for a NAT'ed LAN or a bot, as
``flood.exempt`` lifts flood control.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

from chatd.core.addresses import in_networks, peer_address
from chatd.wire import notices
from chatd.wire.tokenbucket import TokenBucket

if TYPE_CHECKING:
    from chatd.core.chat import Settings


class Entrant(Protocol):
    """What admission needs of a connection."""

    peer_host: str
    address: str  # the address it counts against, set here
    bucket: TokenBucket | None


@lru_cache(maxsize=4096)  # a LAN's hosts come back: a restart or a storm asks for each often
def address_key(host: str) -> str:
    """What a peer's connections count against: its address, an IPv6 one's /64."""
    addr = peer_address(host)
    if addr is None:
        return host
    if addr.version == 6:
        return str(ipaddress.ip_network((addr, 64), strict=False))
    return str(addr)


class Admission:
    def __init__(self, settings: Settings, rng: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.rng = rng
        self.places = 0  # connections holding a place (not refused, not gone)
        self.handshakes = 0  # of them, those with no name yet
        self._places: dict[str, int] = {}  # address -> places it holds
        self._handshakes: dict[str, int] = {}  # address -> handshakes it holds
        self._buckets: dict[str, tuple[TokenBucket, int]] = {}  # address -> (bucket, users)

    def enter(self, m: Entrant, now: float) -> tuple[str, str] | None:
        """Count ``m`` in; (reason, notice) if it must be refused, else None.

        A refused connection is counted in too: it leaves through `leave()` as every
        connection does.
        """
        cfg = self.settings
        key = m.address = address_key(m.peer_host)
        self.places += 1
        self.handshakes += 1
        here = self._places[key] = self._places.get(key, 0) + 1
        waiting = self._handshakes[key] = self._handshakes.get(key, 0) + 1
        if self.places > cfg.max_clients:
            return "server full", notices.SERVER_FULL()
        limited = not in_networks(m.peer_host, cfg.address_exempt)
        if limited and cfg.max_per_address and here > cfg.max_per_address:
            return "too many from address", notices.TOO_MANY_FROM_ADDRESS(host=key)
        if limited and waiting > cfg.max_handshakes_per_address:
            return "too many from address", notices.TOO_MANY_FROM_ADDRESS(host=key)
        if self._early_drop():
            return "too many joining", notices.SERVER_BUSY()
        m.bucket = self._bucket(m, now)
        return None

    def _early_drop(self) -> bool:
        full = self.settings.max_handshakes
        if self.handshakes > full:
            return True
        start = full // 2
        if self.handshakes <= start:
            return False
        return self.rng() < (self.handshakes - start) / (full - start + 1)

    def readmit(self, m: Entrant, joined: bool, bucket: tuple[float, float] | None) -> None:
        """Count in a connection the chatd before this one had (a restart), as it was:
        no checks, its address's bucket with the tokens it had at ``bucket`` (tokens,
        stamp), or none."""
        key = m.address = address_key(m.peer_host)
        self.places += 1
        self._places[key] = self._places.get(key, 0) + 1
        if not joined:
            self.handshakes += 1
            self._handshakes[key] = self._handshakes.get(key, 0) + 1
        m.bucket = None
        if bucket is not None:
            shared = self._buckets.get(key)
            if shared is None:
                flood = self.settings.flood
                restored = TokenBucket(flood.rate, flood.burst, bucket[1])
                restored.tokens = min(bucket[0], restored.burst)
                shared = (restored, 0)
            self._buckets[key] = (shared[0], shared[1] + 1)
            m.bucket = shared[0]

    def joined(self, m: Entrant) -> None:
        """``m`` sent its name: it holds a place, no more a handshake."""
        self._handshake_done(m.address)

    def leave(self, m: Entrant, handshaking: bool) -> None:
        """Count ``m`` out (``handshaking``: it never joined)."""
        key = m.address
        self.places -= 1
        _decrement(self._places, key)
        if handshaking:
            self._handshake_done(key)
        if m.bucket is not None:
            self._release_bucket(key)
            m.bucket = None

    def _handshake_done(self, key: str) -> None:
        self.handshakes -= 1
        _decrement(self._handshakes, key)

    # Flood control, shared by an address's connections.

    def _bucket(self, m: Entrant, now: float) -> TokenBucket | None:
        flood = self.settings.flood
        if flood.rate <= 0 or in_networks(m.peer_host, flood.exempt):
            return None
        shared = self._buckets.get(m.address)
        if shared is None:
            bucket = TokenBucket(flood.rate, flood.burst, now)
            self._buckets[m.address] = (bucket, 1)
            return bucket
        self._buckets[m.address] = (shared[0], shared[1] + 1)
        return shared[0]

    def _release_bucket(self, key: str) -> None:
        bucket, users = self._buckets[key]
        if users > 1:
            self._buckets[key] = (bucket, users - 1)
        else:
            del self._buckets[key]

    def buckets(self) -> list[tuple[str, TokenBucket]]:
        """The flood buckets, by address (a restart hands them over)."""
        return [(key, bucket) for key, (bucket, _) in self._buckets.items()]

    def rebucket(self, m: Entrant, now: float) -> None:
        """Give ``m`` the bucket the settings now say (a reload)."""
        if m.bucket is not None:
            self._release_bucket(m.address)
        m.bucket = self._bucket(m, now)

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        flood = settings.flood
        for bucket, _ in self._buckets.values():
            bucket.rate = flood.rate
            bucket.burst = float(flood.burst)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
