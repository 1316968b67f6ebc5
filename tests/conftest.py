from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start chatd with settings over the test defaults; stopped at teardown."""
    daemons: list[Daemon] = []

    def _start(settings: dict[str, Any] | None = None, **kw: Any) -> Daemon:
        where = tmp_path / f"d{len(daemons)}"
        where.mkdir(exist_ok=True)
        d = Daemon(where, settings, **kw)
        daemons.append(d)
        return d

    yield _start
    for d in daemons:
        d.stop()


@pytest.fixture
def daemon(start: Callable[..., Daemon]) -> Daemon:
    return start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A redis-server of its own on an ephemeral loopback port, no persistence."""
    from redis_helpers import RedisServer

    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def node(start: Callable[..., Daemon], redis_server: Any) -> Callable[..., Daemon]:
    """Start a chatd node of a cluster on ``redis_server``: node(NAME, **cluster settings)."""

    def _node(name: str, settings: dict[str, Any] | None = None, **cluster: Any) -> Daemon:
        return start(
            {
                **(settings or {}),
                "cluster": {"redis": redis_server.url, "node": name, "lease": 2, **cluster},
            }
        )

    return _node
