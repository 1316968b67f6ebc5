"""The cluster's pure parts: its config keys, and the order of the shared log."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatd.core.cluster import Sequencer
from chatd.server import config
from chatd.server.config import ConfigError


def load(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "chatd.yaml"
    p.write_text(text)
    return config.load(p)


def test_cluster_is_off_by_default() -> None:
    c = config.defaults().cluster
    assert (c.redis, c.node, c.lease, c.history, c.room, c.required) == (
        "",
        "",
        10.0,
        10000,
        "chatd",
        False,
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost",
        "rediss://redis.lan:6380/2",
        "redis://:secret@10.0.0.1:6379/0",
        "redis://[::1]:6379",
        "unix:///run/redis/redis-server.sock",
    ],
)
def test_redis_urls(tmp_path: Path, url: str) -> None:
    assert load(tmp_path, f"cluster:\n  redis: '{url}'\n").cluster.redis == url


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("redis: http://x", "cluster.redis: expected a URL such as redis://"),
        (
            "redis: 'redis://:pw@host:99999'",
            "expected a port 1-65535 in the URL, got 'redis://:***@host:99999'",
        ),
        ("redis: 'redis://h/x'", "expected a database number"),
        ("redis: 'unix://rel/path'", "expected unix:///ABSOLUTE/PATH"),
        ("node: 'a b'", "cluster.node: expected a name of letters"),
        ("room: ''", "cluster.room: expected a name"),
        ("lease: 0", "cluster.lease: expected seconds from 1 to 3600"),
        ("history: true", "cluster.history: expected an integer"),
        ("required: 1", "cluster.required: expected true or false"),
        ("password_file: rel", "cluster.password_file: expected an absolute path"),
        ("sentinel: x", "cluster.sentinel: unknown setting"),
    ],
)
def test_bad_cluster_settings(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, f"cluster:\n  {text}\n")
    assert error in str(e.value)
    assert "pw" not in str(e.value)


def test_password_is_redacted() -> None:
    assert config.redacted_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert config.redacted_url("rediss://u:pw@h") == "rediss://u:***@h"
    assert config.redacted_url("redis://h:1/0") == "redis://h:1/0"


def ev(n: int) -> dict[str, object]:
    return {"t": "m", "x": str(n)}


def test_sequencer_in_order_and_twice() -> None:
    s = Sequencer(0)
    assert s.feed(1, ev(1)) == [(1, ev(1))]
    assert s.feed(1, ev(1)) == []
    assert s.feed(2, ev(2)) == [(2, ev(2))]
    assert s.gap is None


def test_sequencer_gap_filled_from_history() -> None:
    s = Sequencer(1)
    assert s.feed(4, ev(4)) == []
    assert s.gap == (2, 3)
    ready, missed = s.fill([(2, ev(2)), (3, ev(3))], 3)
    assert [n for n, _ in ready] == [2, 3, 4]
    assert missed == 0
    assert s.last == 4


def test_sequencer_gap_past_history_counts_the_missed() -> None:
    s = Sequencer(10)
    s.feed(20, ev(20))
    ready, missed = s.fill([(18, ev(18)), (19, ev(19))], 19)
    assert [n for n, _ in ready] == [18, 19, 20]
    assert missed == 7
