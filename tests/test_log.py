"""The log module: the per-message fast path and deferred writes."""

from __future__ import annotations

import datetime
import io
import json
import re
from collections.abc import Iterator

import pytest
import yaml
from helpers import Daemon

from chatd.server import log
from chatd.server.config import LogConfig


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    log.configure(LogConfig(format="json", level="info", messages=True), stream=out)
    yield out
    log.defer(False)


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def _untimed(line: str) -> str:
    return re.sub(r'"timestamp": "[^"]+"', '"timestamp": T', line)


def test_hot_writes_the_line_structlog_writes(stream: io.StringIO) -> None:
    fields = {"peer": "[::1]:5000", "user": "Zoë", "bytes": 14, "text": 'say "hi" ✓ \\ \t'}
    log.get().info("message", **fields)
    log.hot("message", **fields)
    slow, fast = _lines(stream)
    assert _untimed(fast) == _untimed(slow)
    keys = ["timestamp", "level", "event", "peer", "user", "bytes", "text"]
    assert list(json.loads(fast)) == keys
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", json.loads(fast)["timestamp"])


@pytest.mark.parametrize(
    "fields",
    [
        {"n": -3, "f": 0.1, "t": True, "none": None, "list": [1, "é"], "s": "\x00\u2028"},
        {"peer": "1.2.3.4:5", "user": "a", "extra": 1},
    ],
)
def test_hot_values_and_overrides_match_structlog(
    stream: io.StringIO, fields: dict[str, object]
) -> None:
    log.get().info("e", **fields)
    log.hot("e", **fields)
    slow, fast = _lines(stream)
    assert _untimed(fast) == _untimed(slow)


def test_hot_timestamps_are_iso_utc_and_current(stream: io.StringIO) -> None:
    for _ in range(3):
        log.hot("tick")
    now = datetime.datetime.now(datetime.UTC)
    for line in _lines(stream):
        stamp = json.loads(line)["timestamp"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stamp)
        then = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert abs((now - then).total_seconds()) < 5


def test_hot_falls_back_to_structlog_for_the_console_format() -> None:
    out = io.StringIO()
    log.configure(LogConfig(format="console", level="info", messages=True), stream=out)
    log.hot("message", user="alice", bytes=2, text="hi")
    line = out.getvalue()
    assert "message" in line and "user=alice" in line and not line.startswith("{")


def test_deferred_lines_wait_for_flush_and_keep_their_order(stream: io.StringIO) -> None:
    logger = log.get(user="a")
    log.defer(True)
    logger.info("one")
    log.hot("two", bytes=1)
    logger.warning("three")
    assert stream.getvalue() == ""
    log.flush()
    assert [json.loads(x)["event"] for x in _lines(stream)] == ["one", "two", "three"]
    logger.info("four")
    log.defer(False)  # writes what was kept
    logger.info("five")  # and then each line at once
    assert [json.loads(x)["event"] for x in _lines(stream)][3:] == ["four", "five"]


def test_reconfiguring_writes_kept_lines_to_the_old_stream_first(stream: io.StringIO) -> None:
    log.defer(True)
    log.get().info("before")
    other = io.StringIO()
    log.configure(LogConfig(format="json", level="info", messages=True), stream=other)
    log.get().info("after")
    log.flush()
    assert [json.loads(x)["event"] for x in _lines(stream)] == ["before"]
    assert [json.loads(x)["event"] for x in _lines(other)] == ["after"]


def test_hot_writes_nothing_above_info() -> None:
    out = io.StringIO()
    log.configure(LogConfig(format="json", level="warning", messages=True), stream=out)
    log.hot("join", user="a")
    log.get().warning("shown")
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == ["shown"]


def test_a_log_that_cannot_be_written_does_not_stop_the_daemon(daemon: Daemon) -> None:
    # A full disk under log.file (here /dev/full: every write fails with ENOSPC)
    # loses log lines, but the chat goes on and the daemon still exits cleanly.
    alice, bob = daemon.client("alice"), daemon.client("bob")
    alice.recv()  # bob joined
    cfg = {**daemon.config, "log": {"format": "json", "file": "/dev/full"}}
    daemon.config_path.write_text(yaml.safe_dump(cfg))
    assert "log.file" in daemon.result("reload")["applied"]
    for i in range(3):
        alice.send(f"still here {i}")
        assert bob.recv() == ("alice", f"still here {i}")
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.stderr
    assert "cannot write the log" in daemon.stderr


def test_the_console_format_escapes_what_a_terminal_would_act_on() -> None:
    out = io.StringIO()
    log.configure(LogConfig(format="console", level="info", messages=True), stream=out)
    log.get().info("rejected", reason="bad name", name="\x1b]0;owned\x07\u202e")
    line = out.getvalue()
    assert "\x1b" not in line and "\x07" not in line and "\u202e" not in line
    assert "\\x1b]0;owned\\x07\\u202e" in line
    log.hot("message", user="\x1b[2Jbob", text="hi")  # the hot path on a console too
    assert "\x1b" not in out.getvalue()
