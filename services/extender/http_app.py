"""The extender's HTTP edge: decode -> one use case -> encode, on the standard library's server.

Chosen by measurement (bench/extender.py compares the empty handler of this stack with
uvicorn+starlette and granian in the same run): with the whole response written in one
``write`` (headers and body together; two writes meet the client's delayed ACK and cost 40 ms)
``http.server`` answers as fast as the alternatives at the scheduler's one-request-at-a-time
load, needs no dependency, and runs the blocking gRPC and Kubernetes clients without an event
loop to protect. Bad input is a 400 with a message (413 for a body over the limit, 411 without a
Content-Length); an unexpected failure is logged and answered fail-open (all nodes pass, every
score 0), never a 500. Connections have a socket timeout so a slow client cannot hold a thread.

A NodeNames request in the exact layout kube-scheduler writes is read in two parts
(`api.split_node_names`): the pod first, so a pod that uses no cache is answered without
decoding thousands of names, then the names, placed in zones by the node index; a filter that
passes every node echoes the names' text as sent. Any other layout is decoded whole and gets
the same answers (tests/integration/test_extender_http.py compares them).

HTTPS: with `snapcache.tls.SSLContextFiles` each accepted connection is wrapped with the context
of the moment (a certificate rotated on disk is used from the next connection on) and its
handshake runs on the connection's own thread, under the same socket timeout, so a slow or
failing handshake never holds up the accept loop.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, Protocol

import orjson

from services.extender.api import (
    ExtenderArgs,
    decode_args,
    decode_node_names,
    encode_all_names_pass,
    encode_filter_result,
    encode_score_groups,
    names_request_without_cache_key,
    split_node_names,
)
from services.extender.metrics import ExtenderMetrics
from services.extender.scheduling import HostScores, Scheduling
from snapcache.errors import InvalidArgument, SnapcacheError
from snapcache.pod_requests import Mode, PodInfo
from snapcache.rpc_observer import REQUEST_ID_KEY, REQUEST_LOG, REQUEST_LOGGER
from snapcache.tls import SSLContextFiles

log = logging.getLogger(__name__)
request_log = logging.getLogger(REQUEST_LOGGER)

_JSON: Final = "application/json"
_TEXT: Final = "text/plain; charset=utf-8"
_DRAIN_LIMIT: Final = 256 * 1024 * 1024
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    503: "Service Unavailable",
}


def http_status(error: SnapcacheError) -> int:
    """The one place a domain error becomes an HTTP status."""
    if isinstance(error, InvalidArgument):
        return 400
    return 503


def _error_body(status: int, message: str, reason: str = "") -> bytes:
    return orjson.dumps({"Error": message, "reason": reason, "code": status})


class Routes(Protocol):
    """What the HTTP server answers with: `ExtenderRoutes`, or the benchmark's empty handler."""

    def post(self, path: str, body: bytes) -> tuple[int, str, bytes]:
        """Answer a POST: (status, content type, body)."""

    def get(self, path: str) -> tuple[int, str, bytes]:
        """Answer a GET: (status, content type, body)."""


class ExtenderRoutes:
    """Routes of the extender: pure in bytes, so the benchmark and tests can call it directly."""

    def __init__(
        self,
        *,
        scheduling: Scheduling,
        metrics: ExtenderMetrics,
        prefix: str = "",
        healthy: Callable[[], bool] = lambda: True,
    ) -> None:
        self.scheduling = scheduling
        self.metrics = metrics
        prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.filter_path = f"{prefix}/filter"
        self.prioritize_path = f"{prefix}/prioritize"
        self.healthy = healthy

    def post(self, path: str, body: bytes) -> tuple[int, str, bytes]:
        """Answer a POST: (status, content type, body)."""
        if path == self.filter_path:
            verb = "filter"
        elif path == self.prioritize_path:
            verb = "prioritize"
        else:
            return 404, _JSON, _error_body(404, f"no such verb: POST {path[:100]}")
        started = time.perf_counter()
        status, content_type, answer = self._answer(verb, body)
        self.metrics.request(verb, status, time.perf_counter() - started)
        return status, content_type, answer

    def _answer(self, verb: str, body: bytes) -> tuple[int, str, bytes]:
        if (
            verb == "prioritize"
            and self.scheduling.default_mode is Mode.OFF
            and names_request_without_cache_key(body)
        ):
            return 200, _JSON, b"[]"  # every node 0: the pod uses no cache
        split = split_node_names(body)
        if split is not None:
            try:
                return 200, _JSON, self._by_names(verb, *split)
            except InvalidArgument:
                pass  # not the scheduler's shape after all: decoded whole below, which says why
        try:
            args = decode_args(body)
        except SnapcacheError as exc:
            status = http_status(exc)
            return status, _JSON, _error_body(status, str(exc), exc.reason)
        try:
            answer = self._filter(args) if verb == "filter" else self._prioritize(args)
        except Exception:  # a bug must not fail scheduling: fail open, loudly
            self._failed_open(verb)
            answer = (
                encode_filter_result(args, passing=range(len(args.node_names)), failed={})
                if verb == "filter"
                else b"[]"
            )
        return 200, _JSON, answer

    def _by_names(self, verb: str, pod: PodInfo, names_text: memoryview) -> bytes:
        """A NodeNames request as the scheduler writes it: the names decoded while the matcher works."""

        def names() -> list[str]:
            return decode_node_names(names_text)

        try:
            if verb == "prioritize":
                return _encode_scores(self.scheduling.prioritize_names(pod, names, names_key=names_text))
            node_names, outcome = self.scheduling.filter_names(pod, names, names_key=names_text)
            if len(outcome.passing) == len(node_names):
                return encode_all_names_pass(names_text)
            args = ExtenderArgs(pod=pod, node_names=tuple(node_names))
            return encode_filter_result(args, passing=outcome.passing, failed=outcome.failed)
        except InvalidArgument:
            raise
        except Exception:  # a bug must not fail scheduling: fail open, loudly
            self._failed_open(verb)
            if verb == "filter":
                decode_node_names(names_text)  # the names go back to the scheduler: valid ones only
                return encode_all_names_pass(names_text)
            return b"[]"

    def _failed_open(self, verb: str) -> None:
        log.exception("%s failed; answering fail-open", verb)
        self.metrics.fail_open("EXTENDER_ERROR")

    def get(self, path: str) -> tuple[int, str, bytes]:
        """Answer a GET: /healthz and /metrics."""
        if path == "/healthz":
            if self.healthy():
                return 200, _TEXT, b"ok"
            return 503, _TEXT, b"stopping"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render()
        return 404, _TEXT, b"not found"

    def _filter(self, args: ExtenderArgs) -> bytes:
        outcome = self.scheduling.filter(args)
        return encode_filter_result(args, passing=outcome.passing, failed=outcome.failed)

    def _prioritize(self, args: ExtenderArgs) -> bytes:
        return _encode_scores(self.scheduling.prioritize_hosts(args))


def _encode_scores(scores: HostScores) -> bytes:
    # Only the nodes that score: the scheduler adds the listed hosts' scores, so a node left out
    # gets 0, and thousands of zeros are not worth encoding.
    return encode_score_groups(scores.groups, plain=scores.plain)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ExtenderHTTPServer

    def setup(self) -> None:
        self.request.settimeout(self.server.socket_timeout)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        started = time.perf_counter()
        path = self.path.partition("?")[0]
        status = self._send(*self.server.routes.get(path))
        self._log("GET", path, status, started)

    def do_POST(self) -> None:
        started = time.perf_counter()
        path = self.path.partition("?")[0]
        status = self._post(path)
        if status:
            self._log("POST", path, status, started)

    def _post(self, path: str) -> int:
        """Read the body and answer; the status sent (0: the connection broke first)."""
        if self.headers.get("Transfer-Encoding"):
            return self._refuse(411, "chunked bodies are not accepted: send Content-Length")
        length_text = self.headers.get("Content-Length")
        try:
            length = int(length_text) if length_text is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            return self._refuse(411, "Content-Length is required")
        limit = self.server.max_body_bytes
        if length > limit:
            return self._refuse(
                413, f"body of {length} bytes is over the limit of {limit} bytes", drain=length
            )
        try:
            body = self.rfile.read(length)
        except OSError:
            self.close_connection = True
            return 0
        if len(body) != length:
            self.close_connection = True
            return 0
        return self._send(*self.server.routes.post(path, body))

    def _refuse(self, status: int, message: str, *, drain: int = 0) -> int:
        self._send(status, _JSON, _error_body(status, message), close=True)
        # Read (and drop) what the client is still sending, so it sees our answer rather than
        # a connection reset; bounded by size and by the socket timeout.
        if 0 < drain <= _DRAIN_LIMIT:
            remaining = drain
            try:
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            except OSError:
                pass
        return status

    def _send(self, status: int, content_type: str, body: bytes, *, close: bool = False) -> int:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        )
        if close:
            self.close_connection = True
        try:
            self.wfile.write(head.encode("latin-1") + body)  # one write: see the module docstring
        except OSError:
            self.close_connection = True
        return status

    def _log(self, method: str, path: str, status: int, started: float) -> None:
        """One line per request (probes and scrapes at debug); no header but the request id is read."""
        level = logging.DEBUG if method == "GET" else logging.INFO
        if request_log.isEnabledFor(level):
            seconds = time.perf_counter() - started
            given = self.headers.get(REQUEST_ID_KEY)
            metadata = ((REQUEST_ID_KEY, given),) if given else ()
            REQUEST_LOG.add((time.time(), level, f"{method} {path[:100]}", status, seconds, metadata, ""))

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http: " + format, *args)


class ExtenderHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server carrying the routes and limits."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        routes: Routes,
        *,
        max_body_bytes: int,
        socket_timeout: float,
        tls: SSLContextFiles | None = None,
    ) -> None:
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.socket_timeout = socket_timeout
        self.tls = tls
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; with TLS, wrap it (the handshake happens on its thread)."""
        connection, address = super().get_request()
        if self.tls is None:
            return connection, address
        wrapped = self.tls.context().wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A failed TLS handshake or a dropped connection is the client's business: one log line."""
        error = sys.exc_info()[1]
        if isinstance(error, (ssl.SSLError, ConnectionError, TimeoutError)):
            log.info("connection from %s failed: %s", client_address[0], error)
            return
        super().handle_error(request, client_address)


def serve_in_thread(server: ExtenderHTTPServer) -> threading.Thread:
    """Run ``server`` in a daemon thread."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="extender-http", daemon=True
    )
    thread.start()
    return thread
