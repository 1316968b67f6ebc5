"""Bans (chatd.core.bans) and the address matcher (chatd.core.addresses) in detail: the
state document's every check, bans loaded from it matching, removal, IPv4-mapped
networks and scoped peers."""

from __future__ import annotations

import ipaddress
import math
from typing import Any

import pytest

from chatd.core.addresses import in_networks, parse_network, peer_address
from chatd.core.bans import MAX_TIME, Ban, Bans

T0 = 1_800_000_000.0
FIELDS = "kind, target, reason, created, expires, by"


def item(**changes: Any) -> dict[str, Any]:
    """A ban of the state document, as the server writes it."""
    ban = {
        "kind": "address",
        "target": "10.6.0.0/16",
        "reason": "spam",
        "created": T0,
        "expires": None,
        "by": 1000,
    }
    ban.update(changes)
    return ban


def loaded(*items: dict[str, Any], now: float = T0) -> Bans:
    return Bans.from_json({"version": 1, "bans": list(items)}, now)


def refused(doc: Any) -> str:
    with pytest.raises(ValueError) as e:
        Bans.from_json(doc, T0)
    return str(e.value)


# Loaded bans are in force.


def test_address_bans_loaded_from_the_document_match_peers() -> None:
    bans = loaded(item(), item(target="2001:db8::/32", reason=""))
    assert bans.has_address_bans and len(bans) == 2
    hit = bans.match_address("10.6.200.1", T0)
    assert hit == Ban("address", "10.6.0.0/16", "spam", T0, None, 1000)
    assert bans.match_address("::ffff:10.6.0.1", T0) is hit
    assert bans.match_address("2001:db8::7", T0) is not None
    assert bans.match_address("10.7.0.1", T0) is None


def test_name_bans_loaded_from_the_document_match_names() -> None:
    bans = loaded(item(kind="name", target="Eve", expires=T0 + 60))
    assert not bans.has_address_bans
    assert bans.match_name("EVE", T0) == Ban("name", "Eve", "spam", T0, T0 + 60, 1000)
    assert bans.match_name("EVE", T0 + 60) is None


def test_bans_that_expired_while_down_are_left_out() -> None:
    bans = loaded(item(expires=T0), item(kind="name", target="eve", expires=T0 + 0.5))
    assert len(bans) == 1 and not bans.has_address_bans
    assert bans.match_address("10.6.0.1", T0) is None


def test_a_document_without_bans_has_none() -> None:
    bans = Bans.from_json({"version": 1}, T0)
    assert len(bans) == 0 and bans.to_json() == {"version": 1, "bans": []}


def test_the_document_round_trips() -> None:
    bans = loaded(item(), item(kind="name", target="eve", expires=T0 + 60, created=0))
    again = Bans.from_json(bans.to_json(), T0)
    assert again.active(T0) == bans.active(T0)
    assert [b.target for b in again.active(T0)] == ["eve", "10.6.0.0/16"]  # by creation


# A document that does not check out, one test per message.


@pytest.mark.parametrize("doc", [[], None, "x", {"bans": []}, {"version": 2, "bans": []}])
def test_only_a_version_1_document_is_read(doc: Any) -> None:
    assert refused(doc) == "expected a version 1 state document"


@pytest.mark.parametrize("bans", [{}, "x", None, 5])
def test_the_bans_must_be_a_list(bans: Any) -> None:
    assert refused({"version": 1, "bans": bans}) == "expected a list of bans"


@pytest.mark.parametrize(
    "bad",
    [
        "ban",
        ["kind", "address"],
        {k: v for k, v in item().items() if k != "by"},
        {**item(), "until": None},
        {},
    ],
)
def test_each_ban_must_have_exactly_the_fields(bad: Any) -> None:
    assert refused({"version": 1, "bans": [item(), bad]}) == (
        f"ban 1: expected an object with the fields {FIELDS}"
    )


@pytest.mark.parametrize(
    "changes",
    [{"kind": "user"}, {"kind": "Name"}, {"target": ""}, {"target": 5}, {"kind": None}],
)
def test_each_ban_must_have_a_kind_and_a_target(changes: dict[str, Any]) -> None:
    assert refused({"version": 1, "bans": [item(**changes)]}) == (
        "ban 0: expected kind name or address and a target"
    )


def test_an_address_ban_must_name_a_network() -> None:
    assert refused({"version": 1, "bans": [item(target="10.0.0.0/33")]}) == (
        "ban 0: bad network '10.0.0.0/33'"
    )
    assert len(loaded(item(kind="name", target="10.0.0.0/33"))) == 1  # a name may look like one


@pytest.mark.parametrize("changes", [{"reason": None}, {"reason": 5}, {"by": "0"}, {"by": 1.5}])
def test_each_ban_must_have_a_reason_and_a_uid(changes: dict[str, Any]) -> None:
    assert refused({"version": 1, "bans": [item(**changes)]}) == "ban 0: bad reason or uid"


@pytest.mark.parametrize(
    "t", [True, False, "1800000000", -1, -0.5, MAX_TIME, MAX_TIME + 1.0, math.nan, math.inf]
)
@pytest.mark.parametrize("field", ["created", "expires"])
def test_each_time_must_be_a_date(field: str, t: Any) -> None:
    assert refused({"version": 1, "bans": [item(**{field: t})]}) == "ban 0: bad time"


@pytest.mark.parametrize("t", [0, 0.0, 1, MAX_TIME - 1])
def test_times_from_the_epoch_to_max_time_are_dates(t: float) -> None:
    assert len(loaded(item(created=t), now=0)) == 1
    assert len(loaded(item(expires=t), now=0)) == (1 if t else 0)  # read, expired at 0


# The set of bans.


def test_new_bans_have_none() -> None:
    bans = Bans()
    assert len(bans) == 0 and not bans.has_address_bans
    assert bans.match_address("10.0.0.1", T0) is None
    assert bans.match_name("eve", T0) is None
    assert bans.active(T0) == [] and bans.prune(T0) == []


def test_a_removed_address_ban_no_longer_matches() -> None:
    bans = Bans()
    net = Ban("address", "10.6.0.0/16", "spam", T0, None, 0)
    bans.add(net)
    bans.add(Ban("name", "eve", "", T0, None, 0))
    assert bans.remove("address", "10.7.0.0/16") is None
    assert bans.has_address_bans
    assert bans.remove("address", "10.6.0.0/16") is net
    assert not bans.has_address_bans and len(bans) == 1
    assert bans.match_address("10.6.0.1", T0) is None
    assert bans.remove("name", "EVE") is not None and len(bans) == 0


# Addresses.


@pytest.mark.parametrize(
    ("host", "addr"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("fe80::1%eth0", "fe80::1"),
        ("fe80::1%eth0%x", "fe80::1"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
def test_peer_address(host: str, addr: str) -> None:
    assert peer_address(host) == ipaddress.ip_address(addr)


@pytest.mark.parametrize("host", ["", "bob", "10.0.0.1 ", "10.0.0.256", "%eth0"])
def test_what_is_no_peer_address(host: str) -> None:
    assert peer_address(host) is None


@pytest.mark.parametrize(
    ("text", "net"),
    [
        ("10.1.2.3/24", "10.1.2.0/24"),
        ("10.1.2.3", "10.1.2.3/32"),
        ("::ffff:10.0.0.0/120", "10.0.0.0/24"),
        ("::ffff:0.0.0.0/96", "0.0.0.0/0"),
        ("::ffff:10.0.0.1/128", "10.0.0.1/32"),
        ("::fffe:0:0/95", "::fffe:0:0/95"),
        ("2001:db8::1/32", "2001:db8::/32"),
    ],
)
def test_parse_network(text: str, net: str) -> None:
    assert parse_network(text) == ipaddress.ip_network(net)


def test_in_networks() -> None:
    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
    assert in_networks("10.9.9.9", nets) and in_networks("::ffff:10.9.9.9", nets)
    assert in_networks("2001:db8::5", nets)
    assert not in_networks("11.0.0.1", nets)
    assert not in_networks("not an address", nets)
    assert not in_networks("10.0.0.1", [])
