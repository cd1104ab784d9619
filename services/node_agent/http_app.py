"""The mirror's HTTP edge: a read-only distribution API answering from disks, else from upstream.

Per request: ``routing.route`` classifies it (refusals answered at once: 405 for anything but
GET/HEAD, 400 for a name, tag or digest the grammar refuses), then each source in turn:

- **disk**: a manifest (by tag or digest) or blob the disk catalogue finds. Manifests (at most
  4 MiB) are read whole and checked before a byte is sent, so a corrupt one is passed through at
  once. Blobs are streamed with their sha256 checked as they go and the last chunk held back
  (``verification``); one that fails is cut short, counted, and marked bad on its disk, so the
  client's retry passes through. Small blobs (configs) are checked whole before sending, like
  manifests. A ``Range`` request (a resumed download) is checked whole first, then sliced.
- **waiting**: a manifest of a repository whose disk a pod on this node is about to get
  (``pending_images``) is held until that disk is attached or refused, at most
  ``pending_wait_seconds``, so the runtime racing the agent does not pull it from upstream.
- **private**: a repository a held cache recorded as private is served from a disk only to a
  request whose ``Authorization`` the registry accepts (``pull_authority``); others pass through.
- **upstream**: everything else, streamed from the real registry (``upstream``); full blob
  bodies are checked against their digest the same way, manifests before they are sent. The
  /v2/ probe is the upstream's answer too (its auth challenge, for clients that authenticate),
  or the mirror's own 200 while the upstream is away.

A tag whose image the cache built from a multi-arch index answers that index, so the runtime
picks its own platform exactly as from the registry (another platform's manifest is not on the
disk and passes through); a client that takes no index gets the cached platform manifest.

The standard library's threading server, as the extender's (``services/extender/http_app``): one
thread per connection suits a node's handful of concurrent pulls; the work per request is file
reads, hashing and socket writes, all of which release the GIL. Small answers go out in one
write (headers and body together: two writes meet the client's delayed ACK).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import BinaryIO, Final, Protocol

import httpx

from services.node_agent.disk_catalogue import MAX_MANIFEST_BYTES, DiskCatalogue, open_regular
from services.node_agent.metrics import NodeAgentMetrics
from services.node_agent.pending_images import PendingImages
from services.node_agent.pull_authority import PullAuthority
from services.node_agent.routing import Kind, MirrorRequest, Refusal, Source, accepts, route
from services.node_agent.upstream import RELAYED_RESPONSE_HEADERS, Upstream, UpstreamUnavailable
from services.node_agent.verification import DigestMismatch, digest_of, relay_verified
from snapcache.images import DEFAULT_REGISTRY, ImageReference

log = logging.getLogger(__name__)

API_VERSION: Final = ("Docker-Distribution-API-Version", "registry/2.0")
_JSON: Final = "application/json"
_CHUNK_BYTES: Final = 1024 * 1024
_MAX_ERROR_BODY: Final = 64 * 1024
_RANGE: Final = re.compile(r"bytes=(\d*)-(\d*)")
_REASONS: Final = {
    200: "OK",
    206: "Partial Content",
    304: "Not Modified",
    307: "Temporary Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}

Headers = list[tuple[str, str]]


class Responder(Protocol):
    """How the mirror answers one request (the HTTP handler's connection; a seam for tests)."""

    def send(self, status: int, headers: Headers, body: bytes) -> None:
        """A whole answer, in one write."""

    def start(self, status: int, headers: Headers, *, chunked: bool = False) -> None:
        """Headers of a streamed answer."""

    def write(self, chunk: bytes) -> None:
        """Part of a streamed body."""

    def finish(self) -> None:
        """End a streamed body (the last chunk of a chunked one)."""

    def abort(self) -> None:
        """Cut the connection: a streamed body stays incomplete, so the client sees a failure."""


def error_body(code: str, message: str) -> bytes:
    """A distribution API error body."""
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


def _file_chunks(handle: BinaryIO, length: int) -> Iterator[bytes]:
    remaining = length
    while remaining > 0:
        chunk = handle.read(min(_CHUNK_BYTES, remaining))
        if not chunk:
            return
        remaining -= len(chunk)
        yield chunk


def parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """A single ``bytes=`` range as (first, last); ``None``: ignore it; ``"unsatisfiable"``: 416."""
    match = _RANGE.fullmatch(header.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        return None  # several ranges or another unit: RFC 9110 lets a server send the whole body
    first_text, last_text = match.groups()
    if not first_text:
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return (max(0, size - suffix), size - 1)
    first = int(first_text)
    last = min(int(last_text), size - 1) if last_text else size - 1
    if first >= size or first > last:
        return "unsatisfiable"
    return (first, last)


class Mirror:
    """Answers one read request from a disk or upstream (the use case behind the HTTP handler)."""

    def __init__(
        self,
        *,
        catalogue: DiskCatalogue,
        upstream: Upstream,
        metrics: NodeAgentMetrics,
        default_registry: str = DEFAULT_REGISTRY,
        check_whole_below_bytes: int = _CHUNK_BYTES,
        pending: PendingImages | None = None,
        pending_wait_seconds: float = 0.0,
        authority: PullAuthority | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.upstream = upstream
        self.metrics = metrics
        self.default_registry = default_registry
        self._check_whole_below = check_whole_below_bytes
        self._pending = pending
        self._pending_wait = pending_wait_seconds
        self._authority = authority

    def handle(self, method: str, target: str, headers: Mapping[str, str], out: Responder) -> None:
        """Answer ``method target``; ``headers`` with lower-case names."""
        routed = route(method, target, default_registry=self.default_registry)
        if isinstance(routed, Refusal):
            extra = [("Allow", "GET, HEAD")] if routed.status == 405 else []
            self._error(out, routed.status, routed.code, routed.message, kind="refused", headers=extra)
            return
        if routed.kind is Kind.MANIFEST and routed.image is not None and self._pending is not None:
            settled = self._pending.wait(routed.image.name, self._pending_wait)
            if settled is not None:
                self.metrics.pending_wait(settled)
        for source in routed.sources:
            if source is Source.LOCAL:
                self.metrics.answered("base", "local", 200)
                out.send(200, [("Content-Type", _JSON), API_VERSION], b"{}")
                return
            if source is Source.DISK and self._from_disk(routed, method, headers, out):
                return
            if source is Source.UPSTREAM and self._pass_through(routed, method, headers, out):
                return

    # -- disks --

    def _from_disk(
        self, request: MirrorRequest, method: str, headers: Mapping[str, str], out: Responder
    ) -> bool:
        image = request.image
        assert image is not None
        if self._authority is not None and image.name in self._authority.private:
            section = "manifests" if request.kind is Kind.MANIFEST else "blobs"
            path = f"{image.repository}/{section}/{request.reference}"
            allowed = self._authority.allows(image, path, headers.get("authorization", ""))
            self.metrics.private_check(allowed)
            if not allowed:
                return False  # the registry answers it: its challenge, or its refusal
        if request.kind is Kind.MANIFEST:
            return self._manifest_from_disk(image, method, headers.get("accept", ""), out)
        return self._blob_from_disk(image, method, headers.get("range", ""), out)

    def _bad(self, disk_id: str, digest: str, why: str) -> None:
        self.catalogue.mark_bad(disk_id, digest, why)  # counted by the catalogue's hook

    def _manifest_from_disk(self, image: ImageReference, method: str, accept: str, out: Responder) -> bool:
        for found in self.catalogue.manifests(image):
            if not accepts(accept, found.media_type):
                continue
            try:
                fd, size = open_regular(found.path)
                with os.fdopen(fd, "rb") as handle:
                    data = handle.read(MAX_MANIFEST_BYTES + 1)
            except FileNotFoundError:  # the disk is being released: the next refresh drops it
                return False
            except OSError as exc:
                self._bad(found.disk_id, found.digest, f"unreadable: {type(exc).__name__}")
                return False
            if size != found.size or digest_of(data) != found.digest:
                self._bad(found.disk_id, found.digest, "manifest does not match its digest")
                return False
            head = [
                ("Content-Type", found.media_type),
                ("Docker-Content-Digest", found.digest),
                ("ETag", f'"{found.digest}"'),
                ("Content-Length", str(len(data))),
                API_VERSION,
            ]
            self.metrics.answered("manifest", "disk", 200, 0 if method == "HEAD" else len(data))
            out.send(200, head, b"" if method == "HEAD" else data)
            return True
        return False

    def _blob_from_disk(self, image: ImageReference, method: str, range_header: str, out: Responder) -> bool:
        found = self.catalogue.blob(image.name, image.digest)
        if found is None:
            return False
        try:
            fd, size = open_regular(found.path)
        except FileNotFoundError:  # the disk is being released: the next refresh drops it
            return False
        except OSError as exc:
            self._bad(found.disk_id, found.digest, f"unreadable: {type(exc).__name__}")
            return False
        with os.fdopen(fd, "rb") as handle:
            if size != found.size:
                self._bad(found.disk_id, found.digest, f"{size} bytes on disk, {found.size} expected")
                return False
            head = [
                ("Content-Type", "application/octet-stream"),
                ("Docker-Content-Digest", found.digest),
                ("ETag", f'"{found.digest}"'),
                ("Accept-Ranges", "bytes"),
                API_VERSION,
            ]
            if method == "HEAD":
                self.metrics.answered("blob", "disk", 200)
                out.send(200, [*head, ("Content-Length", str(size))], b"")
                return True
            wanted = parse_range(range_header, size) if range_header else None
            if wanted is not None or size < self._check_whole_below:
                return self._blob_checked_whole(
                    disk_id=found.disk_id,
                    digest=found.digest,
                    handle=handle,
                    size=size,
                    wanted=wanted,
                    head=head,
                    out=out,
                )
            out.start(200, [*head, ("Content-Length", str(size))])
            try:
                relay_verified(
                    _file_chunks(handle, size), digest=found.digest, expected_size=size, write=out.write
                )
            except DigestMismatch as exc:
                self._bad(found.disk_id, found.digest, str(exc))
                out.abort()
                self.metrics.answered("blob", "disk", 502)
                return True
            except OSError:  # the client went away (or the disk failed mid-read)
                out.abort()
                return True
            out.finish()
            self.metrics.answered("blob", "disk", 200, size)
            return True

    def _blob_checked_whole(
        self,
        *,
        disk_id: str,
        digest: str,
        handle: BinaryIO,
        size: int,
        wanted: tuple[int, int] | str | None,
        head: Headers,
        out: Responder,
    ) -> bool:
        """Check the whole blob before sending any of it: small blobs, and ranges."""
        try:
            if wanted is None:
                data = handle.read()
                if digest_of(data) != digest:
                    self._bad(disk_id, digest, "blob does not match its digest")
                    return False
                self.metrics.answered("blob", "disk", 200, len(data))
                out.send(200, [*head, ("Content-Length", str(len(data)))], data)
                return True
            try:
                relay_verified(
                    _file_chunks(handle, size), digest=digest, expected_size=size, write=lambda _: None
                )
            except DigestMismatch as exc:
                self._bad(disk_id, digest, str(exc))
                return False
            if isinstance(wanted, str):
                self.metrics.answered("blob", "disk", 416)
                out.send(416, [*head, ("Content-Range", f"bytes */{size}"), ("Content-Length", "0")], b"")
                return True
            first, last = wanted
            handle.seek(first)
            length = last - first + 1
            out.start(
                206,
                [*head, ("Content-Range", f"bytes {first}-{last}/{size}"), ("Content-Length", str(length))],
            )
            for chunk in _file_chunks(handle, length):
                out.write(chunk)
            out.finish()
            self.metrics.answered("blob", "disk", 206, length)
            return True
        except OSError:
            out.abort()
            return True

    # -- upstream --

    def _pass_through(
        self, request: MirrorRequest, method: str, headers: Mapping[str, str], out: Responder
    ) -> bool:
        """Relay the upstream's answer; ``False`` only for a probe the upstream could not answer."""
        image = request.image
        kind = request.kind.value
        if image is None:
            path, repository = "", ""
        else:
            section = "manifests" if request.kind is Kind.MANIFEST else "blobs"
            path, repository = f"{image.repository}/{section}/{request.reference}", image.repository
        try:
            with self.upstream.open(
                method, request.registry, path, repository=repository, headers=headers
            ) as response:
                self._relay(request, method, response, out)
        except UpstreamUnavailable as exc:
            if request.kind is Kind.BASE:
                return False
            message = f"upstream registry unreachable ({exc})"
            self._error(out, 502, "UNAVAILABLE", message, kind=kind, source="upstream")
        except httpx.HTTPError as exc:  # failed while reading the body: the answer is cut short
            log.warning("upstream %s failed mid-answer: %s", request.registry, type(exc).__name__)
            out.abort()
        except OSError:
            out.abort()
        return True

    def _relay(self, request: MirrorRequest, method: str, response: httpx.Response, out: Responder) -> None:
        image = request.image
        kind = request.kind.value
        status = response.status_code
        head: Headers = [
            (name, value)
            for name, value in response.headers.multi_items()
            if name.lower() in RELAYED_RESPONSE_HEADERS
        ]
        encoded = bool(response.headers.get("content-encoding"))
        if method == "HEAD" or status not in (200, 206) or image is None:
            body = b"" if method == "HEAD" else self._read_limited(response, _MAX_ERROR_BODY)
            if method != "HEAD":
                head = [(k, v) for k, v in head if k.lower() != "content-length"]
                head.append(("Content-Length", str(len(body))))
            self.metrics.answered(kind, "upstream", status, len(body))
            out.send(status, head, body)
            return
        if request.kind is Kind.MANIFEST:
            body = self._read_limited(response, MAX_MANIFEST_BYTES + 1)
            expected = image.digest or response.headers.get("docker-content-digest", "")
            if len(body) > MAX_MANIFEST_BYTES or (
                expected and status == 200 and digest_of(body, expected.partition(":")[0]) != expected
            ):
                self.metrics.digest_failure("upstream")
                self._error(
                    out,
                    502,
                    "MANIFEST_INVALID",
                    f"upstream manifest of {image} does not match {expected}",
                    kind=kind,
                    source="upstream",
                )
                return
            head = [(k, v) for k, v in head if k.lower() != "content-length"]
            self.metrics.answered(kind, "upstream", status, len(body))
            out.send(status, [*head, ("Content-Length", str(len(body)))], body)
            return
        length_text = response.headers.get("content-length", "")
        expected_size = int(length_text) if length_text.isdigit() and not encoded else None
        if expected_size is None:
            head = [(k, v) for k, v in head if k.lower() != "content-length"]
        out.start(status, head, chunked=expected_size is None)
        if status == 206:  # a slice cannot be checked against the whole blob's digest
            sent = 0
            for chunk in response.iter_bytes():
                out.write(chunk)
                sent += len(chunk)
            out.finish()
            self.metrics.answered(kind, "upstream", status, sent)
            return
        try:
            sent = relay_verified(
                response.iter_bytes(), digest=image.digest, expected_size=expected_size, write=out.write
            )
        except DigestMismatch as exc:
            log.error(
                "upstream %s served blob %s that does not match it: %s", image.registry, image.digest, exc
            )
            self.metrics.digest_failure("upstream")
            self.metrics.answered(kind, "upstream", 502)
            out.abort()
            return
        out.finish()
        self.metrics.answered(kind, "upstream", status, sent)

    @staticmethod
    def _read_limited(response: httpx.Response, limit: int) -> bytes:
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) > limit:
                break
        return bytes(data)

    def _error(
        self,
        out: Responder,
        status: int,
        code: str,
        message: str,
        *,
        kind: str,
        source: str = "local",
        headers: Headers | None = None,
    ) -> None:
        body = error_body(code, message)
        self.metrics.answered(kind, source, status)
        out.send(status, [("Content-Type", _JSON), API_VERSION, *(headers or [])], body)


class _SocketResponder(Responder):
    """The ``Responder`` of one request on the handler's connection."""

    def __init__(self, handler: _Handler) -> None:
        self._handler = handler
        self._chunked = False

    def _head(self, status: int, headers: Headers) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if self._handler.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send(self, status: int, headers: Headers, body: bytes) -> None:
        if not any(name.lower() == "content-length" for name, _ in headers):
            headers = [*headers, ("Content-Length", str(len(body)))]
        head_only = self._handler.command == "HEAD"
        self._handler.wfile.write(self._head(status, headers) + (b"" if head_only else body))

    def start(self, status: int, headers: Headers, *, chunked: bool = False) -> None:
        self._chunked = chunked
        if chunked:
            headers = [*headers, ("Transfer-Encoding", "chunked")]
        self._handler.wfile.write(self._head(status, headers))

    def write(self, chunk: bytes) -> None:
        if self._chunked:
            self._handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            self._handler.wfile.write(chunk)

    def finish(self) -> None:
        if self._chunked:
            self._chunked = False
            self._handler.wfile.write(b"0\r\n\r\n")

    def abort(self) -> None:
        self._handler.close_connection = True
        self._chunked = False
        with contextlib.suppress(OSError):
            self._handler.connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MirrorHTTPServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.socket_timeout)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __getattr__(self, name: str) -> Callable[[], None]:
        if name.startswith("do_"):  # every method reaches the mirror: GET and HEAD served, the rest 405
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self) -> None:
        headers = {name.lower(): ", ".join(self.headers.get_all(name) or []) for name in self.headers}
        has_body = headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers
        if self.command not in ("GET", "HEAD") or has_body:
            self.close_connection = True  # a body is never read: the connection cannot be reused
        out = _SocketResponder(self)
        log.debug("%s %s", self.command, self.path[:300])
        try:
            self.server.mirror.handle(self.command, self.path, headers, out)
        except OSError:  # the client went away
            out.abort()
        except Exception:
            log.exception("mirror failed on %s %s", self.command, self.path[:200])
            out.abort()

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http: " + format, *args)


class MirrorHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server carrying the mirror."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], mirror: Mirror, *, socket_timeout: float = 60.0) -> None:
        self.mirror = mirror
        self.socket_timeout = socket_timeout
        super().__init__(address, _Handler)


def serve_in_thread(server: MirrorHTTPServer) -> threading.Thread:
    """Run ``server`` in a daemon thread."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="node-agent-mirror", daemon=True
    )
    thread.start()
    return thread
