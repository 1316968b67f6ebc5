"""chatd's figures for Prometheus, read from its counters when they are asked for.

Nothing is counted here: a scrape reads the counters the chat, the room, the loop and
the connections keep anyway (and sums the connections' byte and queue counts), so
the per-message path costs nothing more.  The figures come from providers, each a
function that returns Prometheus metric families; a subsystem with figures of its own
(the history, a cluster) adds its provider under its name:

    server.metrics.providers["history"] = history_figures  # -> [CounterMetricFamily...]

A provider that fails costs its own figures, never the scrape: the error is logged as
an internal error and counted in ``chatd_metrics_scrape_errors_total``.  The families
are exposed from a private `CollectorRegistry` with prometheus_client's writers, over
HTTP (`chatd.server.httpd`, when ``metrics.listen`` is set) and to ``chatctl metrics``.

The process figures are chatd's own (``chatd_process_*``, as prometheus_client's
ProcessCollector names them in a namespace), not ``process_*``: that collector needs
/proc/stat, which the unit's ProcSubset=pid hides, and node_exporter, which takes
``chatctl metrics`` in its textfile collector, has ``process_*`` figures of its own.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from chatd import __version__
from chatd.server import httpd
from chatd.server.config import Address
from chatd.server.errors import StartupError
from chatd.server.listeners import bind

if TYPE_CHECKING:
    from chatd.server.server import Server

Provider = Callable[[], Iterable[Metric]]

# Label values there from the start, at 0, so that rate() and increase() see the
# first one; a reason not listed here appears when it first happens.
REJECT_REASONS = (
    "bad name",
    "banned",
    "handshake timeout",
    "name taken",
    "server full",
    "too many from address",
    "too many joining",
)
LEAVE_REASONS = (
    "banned",
    "closed",
    "flooding",
    "idle",
    "internal error",
    "kicked",
    "protocol error",
    "quit",
    "shutdown",
    "slow consumer",
)
PAGE_SIZE = resource.getpagesize()


class Metrics:
    """The figures, the registry they are exposed from, and the HTTP listener."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.providers: dict[str, Provider] = {
            "chat": self._chat,
            "history": self._history,
            "cluster": self._cluster,
            "loop": self._loop,
            "process": self._process,
        }
        self.scrape_errors = 0
        self.answered = dict.fromkeys(httpd.CODES, 0)  # HTTP responses by status
        self.listener: httpd.HttpListener | None = None
        self.registry = CollectorRegistry()
        self.registry.register(self)

    # The listener.

    def open(self, inherited: socket.socket | None = None) -> None:
        """Listen on ``metrics.listen``, if set; raises StartupError.  ``inherited``:
        the listener the chatd before this one had, kept if it is on that address."""
        address = self.server.config.metrics.listen
        if inherited is not None and (address is None or not _listens_on(inherited, address)):
            inherited.close()
            inherited = None
        if address is None:
            return
        try:
            sock = inherited or bind(address, backlog=httpd.BACKLOG)
        except StartupError as e:
            raise StartupError(f"metrics.listen: {e}") from None
        self.listener = httpd.HttpListener(
            self.server.loop, sock, self.render, self.answered, self.server.log
        )

    @property
    def address(self) -> str | None:
        """Where the listener listens ("HOST:PORT"), None without one."""
        return self.listener.address if self.listener else None

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    # Exposition.

    def render(self, accept: str) -> tuple[bytes, str] | None:
        """The figures in the format ``accept`` asks for (the Prometheus text format
        unless it asks for OpenMetrics): (body, content type), None if they failed."""
        encoder, content_type = choose_encoder(accept)
        try:
            return encoder(self.registry), content_type
        except Exception:
            self._failed("metrics")
            return None

    def text(self) -> str:
        """The figures in the Prometheus text format (`chatctl metrics`)."""
        try:
            return generate_latest(self.registry).decode()
        except Exception:
            self.scrape_errors += 1
            raise

    def collect(self) -> Iterator[Metric]:
        """Every provider's families, then the scrapes' own (the registry's call)."""
        for name, provider in list(self.providers.items()):
            try:
                families = list(provider())
            except Exception:
                self._failed(f"metrics:{name}")
                continue
            yield from families
        yield from self._scrapes()

    def _failed(self, stage: str) -> None:
        self.scrape_errors += 1
        self.server.loop.internal_error(stage, None)

    # The providers.

    def _chat(self) -> Iterator[Metric]:
        server = self.server
        chat = server.chat
        stats = chat.stats
        conns = server.conns.values()
        yield InfoMetricFamily(
            "chatd_build",
            "chatd's version, and the Python it runs on (the value is always 1)",
            value={"version": __version__, "python": platform.python_version()},
        )
        yield _gauge(
            "chatd_start_time_seconds",
            "when chatd started, in seconds since the epoch (uptime: time() - this)",
            stats.started,
        )
        yield _gauge("chatd_users", "users in the chat (connections that joined)", len(chat.room))
        yield _gauge("chatd_users_peak", "the most users in the chat at once", stats.peak_users)
        yield _gauge(
            "chatd_connections",
            "chat connections open, joined or not (the control socket's aside)",
            len(server.conns),
        )
        yield _gauge(
            "chatd_handshakes",
            "connections waiting to send their name (max_handshakes limits them)",
            chat.admission.handshakes,
        )
        yield _counter("chatd_connections_total", "chat connections accepted", stats.connections)
        yield _counter("chatd_joins_total", "users who joined (sent a good name)", stats.joins)
        yield _counter(
            "chatd_messages_total",
            "messages accepted and relayed (private ones and actions included)",
            stats.messages,
        )
        yield _counter(
            "chatd_deliveries_total",
            "frame pairs (a message or a notice) handed to users",
            chat.room.deliveries,
        )
        yield _counter(
            "chatd_bytes_received_total",
            "bytes read from chat connections",
            stats.bytes_in + sum(c.bytes_in for c in conns),
        )
        yield _counter(
            "chatd_bytes_sent_total",
            "bytes written to chat connections",
            stats.bytes_out + sum(c.bytes_out for c in conns),
        )
        yield _gauge(
            "chatd_queue_bytes",
            "bytes waiting to be sent to chat connections, in all",
            sum(c.queued for c in conns),
        )
        yield _by_reason(
            "chatd_rejected_total",
            "connections refused before they joined, by reason",
            REJECT_REASONS,
            stats.rejected,
        )
        yield _by_reason(
            "chatd_left_total",
            "users who left the chat, by reason (as the leave event gives it)",
            LEAVE_REASONS,
            stats.left,
        )
        yield _counter(
            "chatd_flood_dropped_total",
            "messages dropped by flood control",
            stats.flood_dropped,
        )
        yield _counter(
            "chatd_evictions_total",
            "users disconnected as slow consumers (max_queue_bytes waiting for them)",
            stats.evictions,
        )
        yield _counter("chatd_kicks_total", "users kicked by an admin", stats.kicks)
        yield _gauge("chatd_bans", "bans in force", len(chat.bans.active(server.wall())))

    def _history(self) -> Iterator[Metric]:
        h = self.server.history_status()
        yield _gauge(
            "chatd_history_kept", "1 when a history is kept (keep_messages > 0)", h["kept"]
        )
        yield _gauge(
            "chatd_history_messages", "messages in the history (its file, or memory)", h["messages"]
        )
        yield _gauge(
            "chatd_history_complete", "0 while writes to the history file fail", h["complete"]
        )
        yield _gauge("chatd_history_pending", "messages waiting to be written", h["pending"])
        yield _counter("chatd_history_lost_total", "messages that could not be kept", h["lost"])
        yield _gauge(
            "chatd_history_write_lag_seconds",
            "how long the oldest message not yet in the file has waited",
            h["write_lag"],
        )

    def _cluster(self) -> Iterator[Metric]:
        """With cluster.redis: the link and the cluster as this node sees it."""
        backplane = self.server.chat.backplane
        if backplane is None:
            return
        status = backplane.status()
        yield _gauge(
            "chatd_cluster_link_up", "1 while the link to Redis is up", status["link"] == "up"
        )
        yield _gauge("chatd_cluster_nodes", "live nodes, this one included", status["nodes"])
        yield _gauge("chatd_cluster_users", "users on every node", status["users"])
        yield _gauge(
            "chatd_cluster_replay_waiting",
            "messages said here while the link was down, not yet in Redis",
            status["replay_waiting"],
        )

    def _loop(self) -> Iterator[Metric]:
        loop = self.server.loop
        h = loop.pass_seconds
        yield HistogramMetricFamily(
            "chatd_loop_pass_seconds",
            "time the event loop took for one pass: from waking up in select() to the next "
            "wait (a slow one holds everyone up)",
            buckets=[(_bound(bound), n) for bound, n in h.cumulative()],
            sum_value=h.sum,
        )
        yield _counter(
            "chatd_internal_errors_total",
            "bugs caught by the event loop (each logged as internal_error, rate-limited)",
            loop.internal_errors,
        )

    def _process(self) -> Iterator[Metric]:
        times = os.times()
        yield _counter(
            "chatd_process_cpu_seconds_total",
            "user and system CPU time chatd spent",
            times.user + times.system,
        )
        try:
            with open("/proc/self/statm", "rb") as f:
                resident = int(f.read().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            pass
        else:
            yield _gauge("chatd_process_resident_memory_bytes", "chatd's resident memory", resident)
        try:
            fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            pass
        else:
            yield _gauge("chatd_process_open_fds", "file descriptors chatd has open", fds)
        yield _gauge(
            "chatd_process_max_fds",
            "the most file descriptors chatd may open (its soft RLIMIT_NOFILE)",
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )

    def _scrapes(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "chatd_metrics_requests_total",
            "HTTP requests to metrics.listen, by the status answered",
            labels=["code"],
        )
        for code, n in sorted(self.answered.items()):
            family.add_metric([str(code)], n)
        yield family
        yield _counter(
            "chatd_metrics_scrape_errors_total",
            "figures that could not be collected (logged as internal_error; a scrape "
            "leaves them out, or answers 500)",
            self.scrape_errors,
        )


def _listens_on(sock: socket.socket, address: Address) -> bool:
    """Whether ``sock`` is bound where ``address`` says (port 0: on any port)."""
    try:
        host, port = sock.getsockname()[:2]
        infos = socket.getaddrinfo(address.host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return host in {ai[4][0] for ai in infos} and address.port in (0, port)


def _bound(le: float) -> str:
    """A bucket's bound as the exposition writes it: 0.005, 1.0, +Inf."""
    return "+Inf" if math.isinf(le) else repr(le)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _by_reason(
    name: str, doc: str, known: tuple[str, ...], counts: dict[str, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["reason"])
    for reason in sorted({*known, *counts}):
        family.add_metric([reason], counts.get(reason, 0))
    return family
