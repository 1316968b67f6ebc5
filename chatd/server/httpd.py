"""The HTTP listener of ``metrics.listen``: ``GET /metrics``, served from the event loop.

h11 parses the requests and writes the responses; it does no I/O, so the loop feeds
it what a connection reads, as the chat's connections feed their frame decoders.
Each connection is an `Outbox`: a response is sent at once as far as the kernel
takes it, the rest waits for the socket to be writable.  Nothing here can hold the
chat up or grow the daemon's memory:

- a request's line and headers are at most MAX_HEAD bytes (else 431), its body at
  most MAX_BODY (a scrape has none; else 413), and the whole of it must have come
  REQUEST_TIMEOUT seconds after it began, however slowly it trickles in (else 408):
  then the connection is closed;
- one response per connection per pass of the loop, and no more of its requests are
  read while a response waits unsent: a client that never reads holds one response
  (dropped past MAX_QUEUE bytes), and is dropped when that is not taken within
  SEND_TIMEOUT seconds;
- at most MAX_CONNECTIONS at once: while they are open, new ones wait in the
  kernel's backlog (as Go's LimitListener does), and the chat never notices;
- between requests a connection may wait KEEPALIVE_TIMEOUT seconds for the next.

Any path but /metrics (whatever the query) is 404; a method other than GET or HEAD
on it, 405.  What /metrics answers is the owner's ``render``, given the request's
Accept header (for the content negotiation of the exposition format).
"""

from __future__ import annotations

import errno
import math
import socket
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

import h11

from chatd.server.listeners import sock_address
from chatd.server.loop import READ, Loop
from chatd.server.outbox import OPEN, Outbox

PATH = b"/metrics"
MAX_HEAD = 8 * 1024  # bytes of a request's line and headers
MAX_BODY = 1024  # bytes of a request's body
REQUEST_TIMEOUT = 5.0  # seconds from a request's start (or a connection's) to its end
KEEPALIVE_TIMEOUT = 30.0  # seconds a connection may wait for its next request
SEND_TIMEOUT = 10.0  # seconds a client has to take a response
MAX_QUEUE = 1024 * 1024  # bytes of a response waiting for one client (one is ~6 KiB)
MAX_CONNECTIONS = 16  # connections at once; more wait in the backlog
BACKLOG = 64
RECV_SIZE = 16 * 1024
ACCEPT_BATCH = 8  # connections accepted per pass
CODES = (200, 400, 404, 405, 408, 413, 431, 500)  # the statuses it answers with

# The Accept header of a request -> (body, content type), or None when the figures
# could not be had (the owner logged why).
Render = Callable[[str], "tuple[bytes, str] | None"]


def route(method: bytes, target: bytes) -> int:
    """The status a request gets: 200 for GET or HEAD of /metrics, else 404 or 405."""
    if target.split(b"?", 1)[0] != PATH:
        return 404
    if method not in (b"GET", b"HEAD"):
        return 405
    return 200


class HttpListener:
    """The listening socket and its connections."""

    def __init__(
        self,
        loop: Loop,
        sock: socket.socket,
        render: Render,
        answered: dict[int, int],
        log: Any,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.render = render
        self.answered = answered  # responses by status, counted here
        self.log = log
        self.address = sock_address(sock)
        self.conns: set[HttpConn] = set()
        self.accepting = False  # registered with the loop
        self.closed = False
        sock.setblocking(False)
        self._accept()

    def ready(self, mask: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self.conns) >= MAX_CONNECTIONS:
                self._pause()  # until one closes
                return
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment rather than spin.
                    self.log.warning("metrics_accept_paused", error=e.strerror)
                    self._pause()
                    self.loop.call_at(self.loop.now() + 0.1, self._resume)
                return
            HttpConn(self, sock)

    def _accept(self) -> None:
        if not self.accepting and not self.closed:
            self.loop.register(self.sock, READ, self)
            self.accepting = True

    def _pause(self) -> None:
        if self.accepting:
            self.loop.unregister(self.sock)
            self.accepting = False

    def _resume(self, _: Any = None) -> None:
        if len(self.conns) < MAX_CONNECTIONS:
            self._accept()

    def gone(self, conn: HttpConn) -> None:
        self.conns.discard(conn)
        self._resume()

    def answer(self, status: int) -> None:
        self.answered[status] = self.answered.get(status, 0) + 1

    def close(self) -> None:
        if self.closed:
            return
        self._pause()
        self.closed = True
        for conn in list(self.conns):
            conn.close_now()
        self.sock.close()


class HttpConn(Outbox):
    """One HTTP connection: requests in, one at a time; responses out."""

    __slots__ = (
        "_answered_in",
        "_check_at",
        "_continuing",
        "body",
        "http",
        "listener",
        "queued_at",
        "request",
        "started",
        "waiting_since",
    )

    def __init__(self, listener: HttpListener, sock: socket.socket) -> None:
        super().__init__(listener.loop, sock)
        sock.setblocking(False)
        self.listener = listener
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        now = time.monotonic()
        self.waiting_since = now  # since when it waits for a request
        # When the request being read began: on connecting for the first one, at its
        # first byte for the next; 0 while it waits between requests.
        self.started = now
        self.queued_at = 0.0  # when the response now waiting was queued
        self.request: h11.Request | None = None
        self.body = 0  # bytes of the request's body so far
        self._answered_in = -1  # the loop pass of the last response
        self._continuing = False  # a _serve of the requests read already is scheduled
        self._check_at = math.inf  # the earliest timer set
        listener.conns.add(self)
        self.update_interest()
        self._schedule()

    def __repr__(self) -> str:
        return f"<HttpConn fd={self.fd} {self.http.their_state}/{self.link}>"

    # Outbox.

    def _reading(self) -> bool:
        return not self.queued and not self._continuing

    def _over_limit(self) -> None:
        if self.queued > MAX_QUEUE:
            self.close_now()

    def _closed(self) -> None:
        self.listener.gone(self)
        self.loop.unregister(self.sock)
        self.interest = 0
        self.sock.close()
        # Its timer may hold it a while yet: let go of the parser and what it buffered.
        self.http = _CLOSED
        self.request = None

    def flush(self) -> None:
        super().flush()
        if self.link is OPEN and not self.queued:
            self.waiting_since = time.monotonic()  # the response is out
            self._serve()  # a request that came meanwhile

    # Requests.

    def readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self.close_now()
            return
        if data and not self.started:
            self.started = time.monotonic()
            self._schedule()
        self.http.receive_data(data)  # b"": the peer's end of stream
        self._serve()

    def _serve(self, _: Any = None) -> None:
        """Take the events of what was read, answering a request once it is complete."""
        self._continuing = False
        http = self.http
        while self.link is OPEN and not self.queued:
            if self._answered_in == self.loop.passes:
                data, closed = http.trailing_data
                if data or closed:
                    self._continue()  # one response a pass: the chat gets its turn
                break
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as e:
                self._error(e.error_status_hint, f"bad request: {e}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                # h11 limits what it buffers of a head not yet complete; one that
                # came whole in a read is measured here.
                if _head_size(event) > MAX_HEAD:
                    self._error(431, f"request too large (at most {MAX_HEAD} bytes of head)")
                    return
                self.request = event
                self.body = 0
            elif isinstance(event, h11.Data):
                self.body += len(event.data)
                if self.body > MAX_BODY:
                    self._error(413, f"request body too large (at most {MAX_BODY} bytes)")
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._answer()
            elif isinstance(event, h11.ConnectionClosed):
                self.close_after(None)
                return
        self.update_interest()

    def _continue(self) -> None:
        if not self._continuing:
            self._continuing = True
            self.loop.call_soon(self._serve)

    def _answer(self) -> None:
        request = self.request
        assert request is not None
        self._answered_in = self.loop.passes
        status = route(request.method, request.target)
        if status == 404:
            self._error(404, "not found: the metrics are at /metrics")
            return
        if status == 405:
            self._error(405, "method not allowed: GET or HEAD", [("Allow", "GET, HEAD")])
            return
        rendered = self.listener.render(_header(request, b"accept"))
        if rendered is None:
            self._error(500, "the metrics could not be collected: see the chatd log")
            return
        body, content_type = rendered
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if not self._send(200, headers, body if request.method == b"GET" else b""):
            return
        http = self.http
        if http.our_state is h11.MUST_CLOSE:  # the client asked to close, or HTTP/1.0
            self.close_after(None)
            return
        http.start_next_cycle()
        self.request = None
        self.waiting_since = now = time.monotonic()
        self.started = now if http.trailing_data[0] else 0.0
        self._schedule()

    def _error(self, status: int, text: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Answer ``status`` with ``text`` and close."""
        body = text.encode() + b"\n"
        all_headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            *headers,
        ]
        if self._send(status, all_headers, body):
            self.close_after(None)

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> bool:
        """Send a response; False if h11 refused it (the connection is then closed)."""
        http = self.http
        reason = HTTPStatus(status).phrase.encode()
        try:
            data = http.send(h11.Response(status_code=status, headers=headers, reason=reason))
            if body:
                data = (data or b"") + (http.send(h11.Data(data=body)) or b"")
            data = (data or b"") + (http.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            self.close_now()
            return False
        self.listener.answer(status)
        self.deliver(data)
        if self.queued:
            self.queued_at = time.monotonic()
            self._schedule()
        return self.link is OPEN

    # Time limits.

    def _deadline(self) -> float:
        if self.queued:
            return self.queued_at + SEND_TIMEOUT
        if self.started:
            return self.started + REQUEST_TIMEOUT
        return self.waiting_since + KEEPALIVE_TIMEOUT

    def _schedule(self) -> None:
        """Have _check called at the deadline, unless a timer is set for earlier."""
        due = self._deadline()
        if due < self._check_at:
            self._check_at = due
            self.loop.call_at(due, self._check)

    def _check(self, _: Any) -> None:
        if self.link is not OPEN:
            return
        now = time.monotonic()
        if now >= self._deadline():
            self._expired()
        elif self._check_at <= now:  # the earliest timer, and the deadline moved on
            self._check_at = math.inf
            self._schedule()

    def _expired(self) -> None:
        if self.queued:
            self.close_now()  # it does not read
        elif self.started:
            self._error(408, f"request timeout: a request must come within {REQUEST_TIMEOUT:g} s")
        else:
            self.close_after(None)  # waited long enough for another request


_CLOSED = h11.Connection(h11.SERVER)  # what a closed connection keeps instead of its own


def _head_size(request: h11.Request) -> int:
    """About the bytes of a request's line and headers (as h11 gives them back)."""
    line = len(request.method) + len(request.target) + 12  # spaces, HTTP/1.1, CRLF
    return line + sum(len(key) + len(value) + 4 for key, value in request.headers)


def _header(request: h11.Request, name: bytes) -> str:
    """The values of a request's header ``name`` (lower case), joined with commas."""
    values = [value for key, value in request.headers if key == name]
    return b",".join(values).decode("latin-1")
