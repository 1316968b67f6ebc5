"""Bans of names and addresses, and their state document.

A ban names a user (matched without regard to case, and covering the names that
look like it) or an IP address or network
(CIDR), and lasts until it is lifted or, if it has a duration, until it expires.
Times are wall-clock seconds since the epoch, so a ban keeps its expiry across a
restart.  `Bans.to_json()` / `Bans.from_json()` are the document the server keeps in
its state file (server/state.py writes it); a document that does not check out is a
`StateError`, never a silently shorter list of bans.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from chatd.core.addresses import IPNetwork, parse_network, peer_address
from chatd.core.names import name_keys, name_problem
from chatd.wire.chat import text_problem
from chatd.wire.notices import utc

STATE_VERSION = 1
MAX_TIME = 2**37  # seconds since the epoch: the year 6325, within what gmtime() shows
_FIELDS = ("kind", "target", "reason", "created", "expires", "by")
MAX_REASON = 1024  # characters, as the control commands take
MAX_NAME_BYTES = 1024  # a name ban may name more than today's max_name_bytes


class StateError(Exception):
    """The state cannot be read or written; str() is the one-line reason."""


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
        """Bans with one key are one ban (a name's without regard to case)."""
        return f"{self.kind}:{self.target.casefold() if self.kind == 'name' else self.target}"

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def terms(self) -> str:
        """' until 2026-11-25 19:00:00 UTC: REASON', the ``terms`` field of ban notices."""
        until = f" until {utc(self.expires)}" if self.expires is not None else ""
        reason = f": {self.reason}" if self.reason else ""
        return until + reason

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Bans:
    """The bans in force, by name and by network."""

    def __init__(self) -> None:
        self._by_key: dict[str, Ban] = {}
        self._networks: list[tuple[IPNetwork, Ban]] = []
        self._names: dict[str, Ban] = {}  # name_keys() of each name ban -> the ban

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
        # equivalent: a key is made of the kind and target alone, the rest only fills a Ban
        key = Ban(kind, target, "", 0, None, 0).key  # pragma: no mutate
        ban = self._by_key.pop(key, None)
        if ban is not None:
            self._reindex()
        return ban

    def _reindex(self) -> None:
        nets = []
        names = {}
        for ban in self._by_key.values():
            if ban.kind == "address":
                net = parse_network(ban.target)
                if net is not None:
                    nets.append((net, ban))
            else:
                names.update(dict.fromkeys(name_keys(ban.target), ban))
        self._networks = nets
        self._names = names

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
        for key in name_keys(name):
            ban = self._names.get(key)
            if ban is not None and not ban.expired(now):
                return ban
        return None

    def match_address(self, host: str, now: float) -> Ban | None:
        addr = peer_address(host)
        if addr is None:
            return None
        for net, ban in self._networks:
            if addr.version == net.version and addr in net and not ban.expired(now):
                return ban
        return None

    # The state document.

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "bans": [b.to_json() for b in self._by_key.values()]}

    @classmethod
    def from_json(cls, doc: Any, now: float) -> Bans:
        """The bans of a state document, the expired ones left out; raises ValueError."""
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
                ban = _checked(Ban(**item))
            except (TypeError, ValueError) as e:
                raise ValueError(f"ban {i}: {e}") from None
            if not ban.expired(now):
                bans._by_key[ban.key] = ban
        bans._reindex()
        return bans


def _checked(ban: Ban) -> Ban:
    """``ban`` if it is one the control commands could have made (an address target in
    the form they give it); raises ValueError saying what is wrong."""
    if ban.kind not in ("name", "address") or not isinstance(ban.target, str) or not ban.target:
        raise ValueError("expected kind name or address and a target")
    if ban.kind == "address":
        net = parse_network(ban.target)
        if net is None:
            raise ValueError(f"bad network {ban.target!r}")
        ban = replace(ban, target=str(net))  # ::ffff:10.0.0.1 is 10.0.0.1/32
    else:
        problem = name_problem(ban.target, MAX_NAME_BYTES, since_history=False)
        if problem:
            raise ValueError(f"bad name {ban.target!r}: {problem}")
    if not isinstance(ban.reason, str) or not isinstance(ban.by, int) or isinstance(ban.by, bool):
        raise ValueError("bad reason or uid")
    problem = text_problem(ban.reason)
    if problem or len(ban.reason) > MAX_REASON:
        raise ValueError(f"bad reason {ban.reason[:40]!r}: {problem or 'too long'}")
    for t in (ban.created, ban.expires):
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < MAX_TIME
        ):
            raise ValueError("bad time")  # NaN too; a time past MAX_TIME has no date to show
    return ban
