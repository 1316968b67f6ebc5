"""The metrics: the figures (chatd.server.metrics), the HTTP listener (chatd.server.httpd)
and `chatctl metrics`.

The listener is tested in process on a bare Loop (real sockets on 127.0.0.1, the time
limits shortened), the figures on a Server that is not started, and the whole against
the real daemon, scraped over HTTP and parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from helpers import NOTICE, ROOT, Bystanders, Client, Daemon, run_chatd_with, wait_until
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from test_loop import Running

from chatd import __version__
from chatd.server import config, httpd
from chatd.server.config import Address
from chatd.server.httpd import HttpListener, route
from chatd.server.listeners import bind
from chatd.server.loop import Loop
from chatd.server.metrics import LEAVE_REASONS, REJECT_REASONS
from chatd.server.server import Server

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(got: Samples, name: str, **labels: str) -> float:
    return got[(name, frozenset(labels.items()))]


# Routing.


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        (b"GET", b"/metrics", 200),
        (b"HEAD", b"/metrics", 200),
        (b"GET", b"/metrics?name[]=chatd_users", 200),
        (b"GET", b"/", 404),
        (b"GET", b"/metrics/", 404),
        (b"GET", b"/metricsx", 404),
        (b"GET", b"http://example/metrics", 404),
        (b"POST", b"/", 404),
        (b"POST", b"/metrics", 405),
        (b"PUT", b"/metrics", 405),
        (b"OPTIONS", b"/metrics", 405),
    ],
)
def test_route(method: bytes, target: bytes, status: int) -> None:
    assert route(method, target) == status


# The figures, on a Server that is not started.


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    cfg = config.build(
        {
            "listen": ["127.0.0.1:0"],
            "log": {"format": "console"},
            "control": {"socket": ""},
            "state_file": str(tmp_path / "state.json"),
        },
        "<test>",
    )
    s = Server(cfg)
    yield s
    s.close_all()


def documented_metrics() -> list[str]:
    """The metrics chatd(8) lists in its METRICS section, in order."""
    page = (ROOT / "man" / "chatd.8").read_text()
    section = page.split("\n.SH METRICS\n", 1)[1].split("\n.SH ", 1)[0]
    return re.findall(r"^\.B (chatd_[a-z_]+)", section, re.M)


def test_every_metric_is_in_the_page_and_every_one_there_exists(server: Server) -> None:
    families = text_string_to_metric_families(server.metrics.text())
    # The parser names a counter's family without its _total.
    exposed = [f"{f.name}_total" if f.type == "counter" else f.name for f in families]
    # A node of a cluster alone has the chatd_cluster_ figures (tests/test_cluster.py).
    alone = [m for m in documented_metrics() if not m.startswith("chatd_cluster_")]
    assert alone == exposed


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (package prometheus)")
def test_promtool_finds_the_names_right_and_the_readmes_config_and_alerts_valid(
    server: Server, tmp_path: Path
) -> None:
    def promtool(*args: str, stdin: str = "") -> None:
        r = subprocess.run(
            ["promtool", *args], input=stdin, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stdout + r.stderr

    promtool("check", "metrics", stdin=server.metrics.text())  # names, units, types
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme.split("\n## Metrics\n", 1)[1], re.S)
    (tmp_path / "prometheus.yml").write_text(blocks[1])
    (tmp_path / "rules.yml").write_text(blocks[2])
    promtool("check", "config", str(tmp_path / "prometheus.yml"))
    promtool("check", "rules", str(tmp_path / "rules.yml"))


def test_a_new_server_shows_every_figure_at_its_start(server: Server) -> None:
    got = samples(server.metrics.text())
    assert value(got, "chatd_build_info", version=__version__, python=_python()) == 1
    for name in ("chatd_users", "chatd_connections", "chatd_handshakes", "chatd_queue_bytes"):
        assert value(got, name) == 0, name
    for name in ("messages", "deliveries", "bytes_received", "bytes_sent", "kicks", "joins"):
        assert value(got, f"chatd_{name}_total") == 0, name
    for reason in REJECT_REASONS:  # there at 0, so that the first one shows in rate()
        assert value(got, "chatd_rejected_total", reason=reason) == 0
    for reason in LEAVE_REASONS:
        assert value(got, "chatd_left_total", reason=reason) == 0
    assert value(got, "chatd_metrics_requests_total", code="200") == 0
    assert abs(value(got, "chatd_start_time_seconds") - time.time()) < 60
    assert value(got, "chatd_process_open_fds") > 0
    assert value(got, "chatd_process_max_fds") >= value(got, "chatd_process_open_fds")
    assert value(got, "chatd_process_resident_memory_bytes") > 1 << 20
    assert value(got, "chatd_loop_pass_seconds_bucket", le="+Inf") == 0


def _python() -> str:
    import platform

    return platform.python_version()


def test_the_counters_are_read_when_asked(server: Server) -> None:
    stats = server.chat.stats
    stats.messages, stats.joins, stats.kicks = 12, 3, 1
    stats.reject("name taken")
    stats.leave("slow consumer")
    stats.leave("a reason of tomorrow")
    server.chat.room.deliveries = 40
    server.loop.pass_seconds.observe(0.003)
    server.loop.pass_seconds.observe(7.0)
    got = samples(server.metrics.text())
    assert value(got, "chatd_messages_total") == 12 and value(got, "chatd_joins_total") == 3
    assert value(got, "chatd_deliveries_total") == 40 and value(got, "chatd_kicks_total") == 1
    assert value(got, "chatd_rejected_total", reason="name taken") == 1
    assert value(got, "chatd_left_total", reason="slow consumer") == 1
    assert value(got, "chatd_left_total", reason="a reason of tomorrow") == 1
    assert value(got, "chatd_loop_pass_seconds_bucket", le="0.0025") == 0
    assert value(got, "chatd_loop_pass_seconds_bucket", le="0.005") == 1
    assert value(got, "chatd_loop_pass_seconds_bucket", le="2.5") == 1
    assert value(got, "chatd_loop_pass_seconds_count") == 2
    assert value(got, "chatd_loop_pass_seconds_sum") == pytest.approx(7.003)


def test_openmetrics_when_the_scraper_asks_for_it(server: Server) -> None:
    # What Prometheus 3 sends, OpenMetrics first.
    accept = (
        "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
        "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
    )
    rendered = server.metrics.render(accept)
    assert rendered is not None
    body, content_type = rendered
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n") and b"\nchatd_users 0.0\n" in body
    rendered = server.metrics.render("")
    assert rendered is not None
    body, content_type = rendered
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"

    def steady(text: str) -> list[str]:  # the process's figures move between two reads
        return [line for line in text.splitlines() if not line.startswith("chatd_process_")]

    assert steady(body.decode()) == steady(server.metrics.text())


def test_a_provider_adds_its_figures_and_one_that_fails_costs_only_its_own(
    server: Server,
) -> None:
    def history() -> list[Metric]:
        return [GaugeMetricFamily("chatd_history_messages", "messages kept", value=5)]

    def broken() -> list[Metric]:
        raise RuntimeError("a bug in a provider")

    server.metrics.providers["history"] = history
    server.metrics.providers["cluster"] = broken
    structlog.reset_defaults()
    with capture_logs() as logs:
        got = samples(server.metrics.text())
    assert value(got, "chatd_history_messages") == 5
    assert value(got, "chatd_users") == 0  # the rest is all there
    assert value(got, "chatd_metrics_scrape_errors_total") == 1
    (error,) = [e for e in logs if e["event"] == "internal_error"]
    assert error["stage"] == "metrics:cluster"
    assert server.loop.internal_errors == 1


def test_a_scrape_that_fails_is_none_and_counted(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> Iterator[Metric]:
        raise RuntimeError("a bug in the registry")

    monkeypatch.setattr(server.metrics.registry, "collect", broken)
    structlog.reset_defaults()
    with capture_logs() as logs:
        assert server.metrics.render("") is None  # answered 500
        with pytest.raises(RuntimeError):
            server.metrics.text()  # chatctl is told of an internal error
    assert server.metrics.scrape_errors == 2
    assert [e["stage"] for e in logs if e["event"] == "internal_error"] == ["metrics"]


# The listener, in process: a Loop of its own, real sockets.


class Endpoint:
    """An HttpListener on 127.0.0.1:0 whose /metrics is ``body``; the test runs the
    loop's passes itself (``pump``) between what its clients do."""

    def __init__(self, body: bytes = b"# TYPE x gauge\nx 1.0\n") -> None:
        self.loop = Loop()
        self.body = body
        self.rendered: list[tuple[int, str]] = []  # (pass, Accept header)
        sock = bind(Address("127.0.0.1", 0), backlog=httpd.BACKLOG)
        self.port = sock.getsockname()[1]
        self.listener = HttpListener(
            self.loop, sock, self.render, dict.fromkeys(httpd.CODES, 0), structlog.get_logger()
        )

    def render(self, accept: str) -> tuple[bytes, str] | None:
        self.rendered.append((self.loop.passes, accept))
        return self.body, "text/plain; version=0.0.4; charset=utf-8"

    def pump(self, until: Callable[[], bool] = lambda: False, seconds: float = 2.0) -> None:
        deadline = time.monotonic() + seconds
        while not until() and time.monotonic() < deadline:
            self.loop.run_pass(time.monotonic() + 0.01)

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        before = len(self.listener.conns)
        s.connect(("127.0.0.1", self.port))
        s.setblocking(False)
        self.pump(lambda: len(self.listener.conns) > before, 0.2)  # accepted (or waiting)
        return s

    def exchange(self, s: socket.socket, data: bytes = b"", seconds: float = 2.0) -> bytes:
        """Send ``data``, then read until the server closes or ``seconds`` pass."""
        if data:
            s.sendall(data)
        got = bytearray()
        closed = [False]

        def done() -> bool:
            try:
                chunk = s.recv(1 << 20)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                closed[0] = True
                return True
            got.extend(chunk)
            return False

        self.pump(done, seconds)
        if not closed[0]:
            raise TimeoutError(f"still open after {seconds} s; got {bytes(got)!r}")
        return bytes(got)

    def read(self, s: socket.socket, seconds: float = 0.3) -> bytes:
        """What arrives within ``seconds`` (the connection stays open)."""
        got = bytearray()

        def more() -> bool:
            try:
                chunk = s.recv(1 << 20)
            except BlockingIOError:
                return False
            got.extend(chunk)
            return not chunk

        self.pump(more, seconds)
        return bytes(got)

    def close(self) -> None:
        self.listener.close()
        self.loop.close()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    e = Endpoint()
    yield e
    e.close()


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in ``data``: (status, headers in lower case, body)."""
    out = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, head
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        n = int(headers.get("content-length", "0"))
        body, data = data[:n], data[n:]
        out.append((status, headers, body))
    return out


GET = b"GET /metrics HTTP/1.1\r\nHost: chatd\r\n\r\n"


def test_get_metrics_then_another_on_the_same_connection(endpoint: Endpoint) -> None:
    s = endpoint.connect()
    s.sendall(GET)
    (first,) = responses(endpoint.read(s))
    assert first == (
        200,
        {"content-type": "text/plain; version=0.0.4; charset=utf-8", "content-length": "21"},
        endpoint.body,
    )
    s.sendall(GET.replace(b"\r\n\r\n", b"\r\nAccept: text/plain\r\nAccept: */*\r\n\r\n"))
    assert [r[0] for r in responses(endpoint.read(s))] == [200]  # kept alive
    assert [accept for _, accept in endpoint.rendered] == ["", "text/plain,*/*"]
    last = endpoint.exchange(s, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert [r[0] for r in responses(last)] == [200]
    assert endpoint.listener.answered[200] == 3
    s.close()  # the server waits for its end of stream, then closes too
    endpoint.pump(lambda: not endpoint.listener.conns, 1.0)
    assert not endpoint.listener.conns


def test_head_and_http_1_0(endpoint: Endpoint) -> None:
    got = endpoint.exchange(endpoint.connect(), b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\n")
    assert b"Content-Length: 21\r\n" in got
    got = endpoint.exchange(endpoint.connect(), b"GET /metrics HTTP/1.0\r\n\r\n")  # then closed
    assert responses(got)[0][2] == endpoint.body


def test_the_same_bytes_whole_or_one_at_a_time(endpoint: Endpoint) -> None:
    whole = endpoint.exchange(endpoint.connect(), GET.replace(b"HTTP/1.1", b"HTTP/1.0"))
    s = endpoint.connect()
    for byte in GET.replace(b"HTTP/1.1", b"HTTP/1.0"):
        s.send(bytes([byte]))
        endpoint.pump(seconds=0.002)
    assert endpoint.exchange(s) == whole


def test_pipelined_requests_are_answered_in_order_one_a_pass(endpoint: Endpoint) -> None:
    s = endpoint.connect()
    got = endpoint.exchange(s, GET * 3 + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
    assert [r[0] for r in responses(got)] == [200, 200, 200, 404]  # closed after the 404
    passes = [p for p, _ in endpoint.rendered]
    assert len(set(passes)) == 3


@pytest.mark.parametrize(
    ("request_", "status", "extra"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 404, set()),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 405, {"allow"}),
        (b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 405, {"allow"}),
        (b"GET /metrics HTTP/1.1\r\n\r\n", 400, set()),  # HTTP/1.1 needs Host
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, set()),  # TLS, say
        (
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + b"a" * 2000,
            413,
            set(),
        ),
    ],
)
def test_what_is_refused_is_answered_and_closed(
    endpoint: Endpoint, request_: bytes, status: int, extra: set[str]
) -> None:
    (response,) = responses(endpoint.exchange(endpoint.connect(), request_))
    assert response[0] == status
    assert response[1]["connection"] == "close"
    assert extra <= response[1].keys()
    if status == 405:
        assert response[1]["allow"] == "GET, HEAD"
    assert endpoint.rendered == [] and endpoint.listener.answered[status] == 1


@pytest.mark.parametrize(
    "huge",
    [
        b"GET /" + b"m" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # the request line
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 10_000 + b"\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 2000,  # never ends
    ],
    ids=["line", "header", "headers"],
)
def test_a_huge_request_is_cut_off(endpoint: Endpoint, huge: bytes) -> None:
    s = endpoint.connect()
    (response,) = responses(endpoint.exchange(s, huge))
    assert response[0] == 431
    assert endpoint.rendered == []


def test_a_slow_request_is_cut_off_however_it_trickles(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(httpd, "REQUEST_TIMEOUT", 0.3)
    silent = endpoint.connect()  # sends nothing at all
    started = endpoint.connect()
    started.send(b"GET /metrics HTTP/1.1\r\n")
    dribbling = endpoint.connect()
    t0 = time.monotonic()
    sent = 0
    while sent < len(GET) - 1:  # a byte every 20 ms (each one progress), never the last
        dribbling.send(GET[sent : sent + 1])
        sent += 1
        endpoint.pump(seconds=0.02)
        try:
            answer = dribbling.recv(1000)
            break
        except BlockingIOError:
            pass
    cut = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert 0.25 < cut < 0.6 and sent < len(GET) - 1, (cut, sent)
    for s in (silent, started):
        (response,) = responses(endpoint.exchange(s, seconds=1.0))
        assert response[0] == 408
    assert endpoint.rendered == [] and endpoint.listener.answered[408] == 3


def test_a_kept_alive_connection_is_closed_when_it_asks_nothing_more(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(httpd, "KEEPALIVE_TIMEOUT", 0.3)
    monkeypatch.setattr(httpd, "REQUEST_TIMEOUT", 0.2)  # only for a request begun
    s = endpoint.connect()
    got = endpoint.exchange(s, GET, seconds=1.0)
    assert [r[0] for r in responses(got)] == [200]  # and then closed, without a 408


def test_a_client_that_never_reads_holds_one_response_then_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(httpd, "SEND_TIMEOUT", 0.5)
    monkeypatch.setattr(httpd, "MAX_QUEUE", 8 << 20)
    e = Endpoint(body=b"x" * (4 << 20))  # more than the sockets' buffers hold
    try:
        s = e.connect(rcvbuf=4096)
        sent = 0
        try:
            for _ in range(20_000):  # a flood of requests, as far as the buffers take them
                sent += s.send(GET)
        except BlockingIOError:
            pass
        e.pump(seconds=0.2)
        (conn,) = e.listener.conns
        assert 0 < conn.queued <= len(e.body)
        assert len(e.rendered) == 1 and sent > 4 * httpd.RECV_SIZE
        # No more of its requests were read meanwhile: a read's worth waits in h11.
        assert len(conn.http.trailing_data[0]) <= httpd.RECV_SIZE
        e.pump(lambda: not e.listener.conns, 2.0)
        assert not e.listener.conns  # dropped
    finally:
        e.close()


def test_a_response_over_the_queue_limit_drops_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(httpd, "MAX_QUEUE", 64 * 1024)
    e = Endpoint(body=b"x" * (8 << 20))
    try:
        s = e.connect(rcvbuf=4096)
        s.sendall(GET)
        e.pump(lambda: not e.listener.conns, 1.0)
        assert not e.listener.conns and len(e.rendered) == 1
    finally:
        e.close()


def test_connections_over_the_limit_wait_in_the_backlog(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(httpd, "REQUEST_TIMEOUT", 30.0)
    held = [endpoint.connect() for _ in range(httpd.MAX_CONNECTIONS)]
    assert len(endpoint.listener.conns) == httpd.MAX_CONNECTIONS
    waiting = endpoint.connect()  # the kernel completes the handshake: it waits
    waiting.sendall(GET)
    assert endpoint.read(waiting, 0.3) == b""
    assert not endpoint.listener.accepting
    held[0].close()  # a slot frees: the one waiting is served
    assert [r[0] for r in responses(endpoint.read(waiting, 1.0))] == [200]
    assert len(endpoint.listener.conns) == httpd.MAX_CONNECTIONS
    for s in held[1:]:
        s.close()
    waiting.close()


# The real daemon.

METRICS_ON = {"metrics": {"listen": "127.0.0.1:0"}}


def metrics_port(d: Daemon) -> int:
    address = d.wait_for("startup")["metrics"]
    return int(address.rsplit(":", 1)[1])


def get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        conn.close()


def scrape(port: int) -> Samples:
    status, headers, body = get(port)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(body)


def test_the_metrics_are_off_by_default(daemon: Daemon) -> None:
    assert daemon.wait_for("startup")["metrics"] is None


def test_a_scrape_counts_what_the_test_did(start: Callable[..., Daemon]) -> None:
    d = start(METRICS_ON)
    port = metrics_port(d)
    before = scrape(port)
    alice, bob = d.client("alice"), d.client("bob")
    alice.expect(NOTICE, "bob joined")
    impostor = Client(d.port)
    impostor.send("ALICE")  # the name is taken
    assert impostor.expect_closed()[0][1].startswith("name rejected")
    for text in ("one", "two", "three"):
        alice.send(text)
        bob.expect("alice", text)
    carol = d.client("carol")
    carol.send("/quit")
    alice.expect(NOTICE, "carol joined")
    alice.expect(NOTICE, "carol left (quit)")
    d.result("kick", name="bob", reason="test")
    alice.expect(NOTICE, "bob was kicked (test)")
    got = scrape(port)
    assert value(got, "chatd_users") == 1 and value(got, "chatd_users_peak") == 3
    assert value(got, "chatd_joins_total") == 3
    assert value(got, "chatd_connections_total") == 4
    assert value(got, "chatd_messages_total") == 3
    assert value(got, "chatd_rejected_total", reason="name taken") == 1
    assert value(got, "chatd_left_total", reason="quit") == 1
    assert value(got, "chatd_left_total", reason="kicked") == 1
    assert value(got, "chatd_kicks_total") == 1
    stats = d.result("stats")
    assert value(got, "chatd_deliveries_total") == stats["deliveries"] > 3
    assert value(got, "chatd_bytes_received_total") == stats["bytes_in"] > 0
    assert value(got, "chatd_bytes_sent_total") == stats["bytes_out"] > 0
    assert value(got, "chatd_build_info", version=__version__, python=_python()) == 1
    assert value(got, "chatd_metrics_requests_total", code="200") == 1  # the first scrape
    assert value(got, "chatd_loop_pass_seconds_count") > value(
        before, "chatd_loop_pass_seconds_count"
    )
    assert value(got, "chatd_start_time_seconds") == value(before, "chatd_start_time_seconds")
    assert value(got, "chatd_history_kept") == 1 and value(got, "chatd_history_complete") == 1
    assert value(got, "chatd_history_messages") in (0, 1, 2, 3)  # as the writer has them
    assert value(got, "chatd_history_lost_total") == 0
    wait_until(
        "the three messages in the history's file",
        lambda: value(scrape(port), "chatd_history_messages") == 3,
    )


def test_other_paths_and_methods_and_a_huge_request(start: Callable[..., Daemon]) -> None:
    d = start(METRICS_ON)
    port = metrics_port(d)
    status, _, body = get(port, "/")
    assert (status, body) == (404, "not found: the metrics are at /metrics\n")
    status, headers, _ = get(port, method="POST")
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    status, headers, body = get(port, method="HEAD")
    assert status == 200 and body == "" and int(headers["content-length"]) > 1000
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 100_000)
        assert s.recv(100).startswith(b"HTTP/1.1 431 ")
    assert value(scrape(port), "chatd_metrics_requests_total", code="431") == 1


def test_a_scraper_that_never_reads_does_not_stall_the_chat(start: Callable[..., Daemon]) -> None:
    d = start(METRICS_ON)
    port = metrics_port(d)
    bystanders = Bystanders(d)
    hogs = []
    for _ in range(httpd.MAX_CONNECTIONS + 4):  # every slot, and more in the backlog
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        try:
            for _ in range(200):  # pipelined requests, never a response read
                s.send(GET)
        except BlockingIOError:
            pass
        hogs.append(s)
    for _ in range(3):
        assert bystanders.check() < 1.0
    assert d.result("stats")["users"] == 2
    for s in hogs:
        s.close()
    assert value(scrape(port), "chatd_users") == 2  # served again once they are gone


def test_chatctl_metrics_is_the_http_body(start: Callable[..., Daemon]) -> None:
    d = start(METRICS_ON)
    port = metrics_port(d)
    alice = d.client("alice")
    alice.send("hello")
    d.wait_for("message", user="alice")  # logged after the pass that took it
    _, _, body = get(port)
    r = d.ctl("metrics")
    assert (r.returncode, r.stderr) == (0, "")

    varying = (
        "chatd_loop_pass_seconds",
        "chatd_process_",
        "chatd_metrics_requests_total",
        "chatd_history_",  # the writer commits in its own time
    )

    def steady(text: str) -> list[str]:
        return [line for line in text.splitlines() if not any(v in line for v in varying)]

    assert r.stdout.endswith(
        "# TYPE chatd_metrics_scrape_errors_total counter\nchatd_metrics_scrape_errors_total 0.0\n"
    )
    assert steady(r.stdout) == steady(body)
    assert "chatd_messages_total 1.0" in steady(body) and len(steady(body)) > 60
    js = d.ctl("--json", "metrics")
    assert steady(json.loads(js.stdout)["text"]) == steady(body)


def test_a_metrics_address_in_use_stops_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_chatd_with(
            tmp_path,
            {
                "metrics": {"listen": f"127.0.0.1:{port}"},
                "control": {"socket": ""},
                "state_file": str(tmp_path / "state.json"),
            },
        )
    assert r.returncode == 1
    assert r.stderr.endswith(
        f"chatd: error: metrics.listen: cannot listen on 127.0.0.1:{port}: address already in use\n"
    ), r.stderr


def test_a_bug_in_answering_costs_that_connection_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = Running(tmp_path, metrics={"listen": "127.0.0.1:0"})
    port = int(str(running.server.metrics.address).rsplit(":", 1)[1])

    def buggy(method: bytes, target: bytes) -> int:
        if target == b"/bug":
            raise RuntimeError("a bug in the HTTP handling")
        return route(method, target)

    monkeypatch.setattr(httpd, "route", buggy)
    outcome: list[Any] = []

    def talk() -> None:
        alice, bob = Client(running.port), Client(running.port)
        alice.join("alice")
        bob.join("bob")
        alice.expect(NOTICE, "bob joined")
        try:
            get(port, "/bug")
        except (http.client.RemoteDisconnected, ConnectionResetError) as e:
            outcome.append(type(e))
        outcome.append(get(port)[0])
        bob.send("still here")
        alice.expect("bob", "still here")

    structlog.reset_defaults()
    with capture_logs() as logs:
        running.talk(talk)
    assert outcome[1:] == [200] and len(outcome) == 2
    (error,) = [e for e in logs if e["event"] == "internal_error"]
    assert error["stage"] == "io" and "HttpConn" in error["connection"]
    listener = running.server.metrics.listener
    assert listener is not None and listener.conns == set()  # both closed, nothing left
    running.close()


def test_the_listener_closes_when_the_server_stops(tmp_path: Path) -> None:
    running = Running(tmp_path, metrics={"listen": "127.0.0.1:0"})
    address = running.server.metrics.address
    assert address is not None
    port = int(address.rsplit(":", 1)[1])
    got: list[int] = []
    running.talk(lambda: got.append(get(port)[0]))
    assert got == [200]
    running.server.stop("test")
    assert running.server.metrics.address is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    running.close()
