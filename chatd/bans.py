"""Bans of names and addresses, and the state file that keeps them across restarts.

A ban names a user (matched without regard to case) or an IP address or
network (CIDR), and lasts until it is lifted or, if it has a duration, until
it expires.  Times are wall-clock seconds since the epoch, so a ban keeps its
expiry across a restart.  The file is JSON, written atomically: a temporary
file in the same directory, fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

STATE_VERSION = 1
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(?:\d+[smhdw])+")
_PART = re.compile(r"(\d+)([smhdw])")
MAX_DURATION = 100 * 365 * 86400
MAX_TIME = 2**37  # seconds since the epoch: the year 6325, within what gmtime() shows
_FIELDS = ("kind", "target", "reason", "created", "expires", "by")


class StateError(Exception):
    """The state file cannot be read or written; str() is the one-line reason."""


def parse_duration(text: str) -> int:
    """Seconds in "90s", "10m", "2h", "7d", "1w" or a sum such as "1h30m"."""
    if not isinstance(text, str) or not _DURATION.fullmatch(text):
        raise ValueError(f"expected a duration such as 30s, 10m, 2h, 7d or 1h30m, got {text!r}")
    total = sum(int(n) * UNITS[unit] for n, unit in _PART.findall(text))
    if not 0 < total <= MAX_DURATION:
        raise ValueError(f"expected a duration from 1s to 100 years, got {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """A short human form: 45s, 12m05s, 3h20m, 6d04h."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def parse_network(text: str) -> IPNetwork | None:
    """The network ``text`` names (an address is a /32 or /128), or None."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:  # ::ffff:10.0.0.1 is 10.0.0.1
            return ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return net


def peer_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class Ban:
    kind: str  # "name" or "address"
    target: str  # the name as given, or the network in CIDR form
    reason: str
    created: float
    expires: float | None  # None: until lifted
    by: int  # uid of the admin

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.target.casefold() if self.kind == 'name' else self.target}"

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def describe(self) -> str:
        """ " until 2026-11-25 19:00:00 UTC: REASON", for notices."""
        until = f" until {utc(self.expires)}" if self.expires is not None else ""
        reason = f": {self.reason}" if self.reason else ""
        return until + reason

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def iso(t: float | None) -> str | None:
    """ISO 8601 in UTC, as the control protocol gives times."""
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Bans:
    """The bans in force, by name and by network."""

    def __init__(self) -> None:
        self._by_key: dict[str, Ban] = {}
        self._networks: list[tuple[IPNetwork, Ban]] = []

    def __len__(self) -> int:
        return len(self._by_key)

    @property
    def has_address_bans(self) -> bool:
        return bool(self._networks)

    def add(self, ban: Ban) -> Ban | None:
        """Add or replace ``ban``; return the one it replaced."""
        old = self._by_key.get(ban.key)
        self._by_key[ban.key] = ban
        self._reindex()
        return old

    def remove(self, kind: str, target: str) -> Ban | None:
        key = Ban(kind, target, "", 0, None, 0).key
        ban = self._by_key.pop(key, None)
        if ban is not None:
            self._reindex()
        return ban

    def _reindex(self) -> None:
        nets = []
        for ban in self._by_key.values():
            if ban.kind == "address":
                net = parse_network(ban.target)
                if net is not None:
                    nets.append((net, ban))
        self._networks = nets

    def prune(self, now: float) -> list[Ban]:
        """Remove and return the expired bans."""
        gone = [b for b in self._by_key.values() if b.expired(now)]
        for ban in gone:
            del self._by_key[ban.key]
        if gone:
            self._reindex()
        return gone

    def active(self, now: float) -> list[Ban]:
        return sorted(
            (b for b in self._by_key.values() if not b.expired(now)),
            key=lambda b: (b.created, b.key),
        )

    def match_name(self, name: str, now: float) -> Ban | None:
        ban = self._by_key.get(f"name:{name.casefold()}")
        return ban if ban is not None and not ban.expired(now) else None

    def match_address(self, host: str, now: float) -> Ban | None:
        addr = peer_address(host)
        if addr is None:
            return None
        for net, ban in self._networks:
            if addr.version == net.version and addr in net and not ban.expired(now):
                return ban
        return None

    # The state file.

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "bans": [b.to_json() for b in self._by_key.values()]}

    @classmethod
    def from_json(cls, doc: Any, now: float) -> Bans:
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise ValueError(f"expected a version {STATE_VERSION} state document")
        bans = cls()
        items = doc.get("bans", [])
        if not isinstance(items, list):
            raise ValueError("expected a list of bans")
        for i, item in enumerate(items):
            try:
                if not isinstance(item, dict) or set(item) != set(_FIELDS):
                    raise ValueError(f"expected an object with the fields {', '.join(_FIELDS)}")
                ban = Ban(**item)
                _check_ban(ban)
            except (TypeError, ValueError) as e:
                raise ValueError(f"ban {i}: {e}") from None
            if not ban.expired(now):
                bans._by_key[ban.key] = ban
        bans._reindex()
        return bans

    @classmethod
    def load(cls, path: str, now: float | None = None) -> Bans:
        """Read the state file; a missing file is no bans."""
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return cls()
        except OSError as e:
            raise StateError(f"cannot read {path}: {(e.strerror or str(e)).lower()}") from None
        except ValueError as e:  # JSON or UTF-8
            raise StateError(f"cannot read {path}: not a chatd state file ({e})") from None
        try:
            return cls.from_json(doc, time.time() if now is None else now)
        except ValueError as e:
            raise StateError(f"cannot read {path}: {e}") from None

    def save(self, path: str) -> None:
        """Write the state file atomically, creating its directory if missing."""
        data = json.dumps(self.to_json(), indent=1).encode() + b"\n"
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o750, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".state-", dir=directory)
        except (FileExistsError, NotADirectoryError):
            raise StateError(f"cannot write {path}: {directory} is not a directory") from None
        except OSError as e:
            raise StateError(f"cannot write {path}: {(e.strerror or str(e)).lower()}") from None
        try:
            with open(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o640)
            os.replace(tmp, path)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateError(f"cannot write {path}: {(e.strerror or str(e)).lower()}") from None


def _check_ban(ban: Ban) -> None:
    if ban.kind not in ("name", "address") or not isinstance(ban.target, str) or not ban.target:
        raise ValueError("expected kind name or address and a target")
    if ban.kind == "address" and parse_network(ban.target) is None:
        raise ValueError(f"bad network {ban.target!r}")
    if not isinstance(ban.reason, str) or not isinstance(ban.by, int):
        raise ValueError("bad reason or uid")
    for t in (ban.created, ban.expires):
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < MAX_TIME
        ):
            raise ValueError("bad time")  # NaN too; a time past MAX_TIME has no date to show
