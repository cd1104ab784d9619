"""gRPC server bootstrap shared by every service: reflection, health, error mapping, graceful stop.

`create_server` is kept apart from running it (grpc examples style) so tests bind
`127.0.0.1:0` and talk to the same server stack production runs.

Two server models, each where it measured better:

- `create_server`: grpcio's thread pool. For handlers that block (the registry's database and
  provider calls), and it has the faster empty RPC.
- `create_aio_server`: grpc.aio on an event loop in a thread of its own. For short CPU-only
  handlers on the request path (the matcher): the handler runs on the thread that took the call
  off the wire, with no hand-off to a pool thread woken for it. Measured at 100,000 caches
  (bench/match.py set-up, one client): a match added 93 us over the empty RPC on grpc.aio
  against 176 us on the thread pool, so its absolute latency was lower (706 vs 769 us) even
  though grpc.aio's empty RPC is a little slower (613 vs 593 us).

Both bound the calls they run with our own admission control (`snapcache.rpc_admission`)
rather than grpc's ``maximum_concurrent_rpcs``, whose refusal is a bare RESOURCE_EXHAUSTED with
no reason and no retry delay: beyond ``max_concurrent_rpcs`` running handlers a call is answered
at once with the error table's status (ErrorInfo ``OVERLOADED``, RetryInfo with a jittered delay).
grpc's bound stays on as a hard ceiling, `rpc_admission.hard_ceiling`, twice as high. On the
thread pool every admitted call gets a thread of its own (the pool grows to the limit plus
`SPARE_WORKERS`, threads started only when needed), so a refusal, a health check or reflection
never waits behind admitted calls, watch streams included, which hold their thread for as long
as they last.

Both take a `ServerSecurity`: TLS (`snapcache.tls`, reloaded from disk, mutual with a client CA)
and access control (`snapcache.rpc_auth`). Without one a server is plaintext and open, which is
what the embedded default on loopback and the tests use; callers decide when that is allowed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from snapcache.access import AccessPolicy
from snapcache.admission import DEFAULT_RETRY_AFTER_SECONDS, Admission
from snapcache.rpc_admission import AdmissionInterceptor, AioAdmissionInterceptor, hard_ceiling
from snapcache.rpc_auth import AioAuthInterceptor, AuthInterceptor
from snapcache.rpc_errors import AioErrorInterceptor, ErrorInterceptor
from snapcache.rpc_observer import AioRpcObserver, RpcMetrics, RpcObserver
from snapcache.tls import ServerTls, server_credentials

log = logging.getLogger(__name__)

# Threads of a thread-pool server beyond its admission limit: they answer refusals, health checks
# and reflection while every admitted call holds one.
SPARE_WORKERS = 8


@dataclass(frozen=True)
class ServiceBinding:
    """One servicer and how to add it to a server."""

    full_name: str  # "snapcache.v1.CacheRegistryService"
    add_to_server: Callable[[Any, Any], None]  # (servicer, grpc.Server or grpc.aio.Server)
    servicer: Any


@dataclass(frozen=True)
class ServerSecurity:
    """TLS (None: plaintext) and access control (None: every caller may do everything)."""

    tls: ServerTls | None = None
    access: AccessPolicy | None = None

    def describe(self) -> str:
        """``mTLS, auth`` / ``TLS`` / ``plaintext``, for start-up lines."""
        transport = "plaintext" if self.tls is None else ("mTLS" if self.tls.mutual else "TLS")
        return transport + (", auth" if self.access is not None else "")

    def validate(self) -> None:
        """Refuse TLS files that do not load, at start-up."""
        if self.tls is not None:
            self.tls.validate()

    @property
    def client_certificates(self) -> bool:
        """True when callers may be identified by a verified client certificate (mutual TLS)."""
        return self.tls is not None and self.tls.mutual

    def bind(self, server: Any, address: str) -> int:
        """Add the listening port with these credentials; return the port (0: not bound)."""
        if self.tls is None:
            port: int = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, server_credentials(self.tls))
        return port


PLAINTEXT = ServerSecurity()


def _admission(limit: int | None, retry_after_seconds: float) -> Admission | None:
    return None if limit is None else Admission(limit, retry_after_seconds=retry_after_seconds)


class _Health(Protocol):
    def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> Any: ...


def _add_services(server: Any, bindings: Sequence[ServiceBinding], health_servicer: Any) -> list[str]:
    """Add the services, the health service and reflection to ``server``; return the services' names."""
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [b.full_name for b in bindings]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    return names


def _set_serving(health_servicer: _Health, service_names: Sequence[str], serving: bool) -> None:
    """Flip health for the whole server ("") and each of its services."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *service_names):
        health_servicer.set(name, status)


@dataclass
class RunningServer:
    """A started server with its port and health servicer."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: Sequence[str] = field(default_factory=tuple)
    admission: Admission | None = None

    def set_serving(self, serving: bool) -> None:
        """Flip health for the whole server and each service."""
        _set_serving(self.health, self.service_names, serving)

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Report NOT_SERVING, stop taking calls and let running ones finish within the grace."""
        self.set_serving(False)
        self.server.stop(grace_seconds).wait()


def create_server(
    address: str,
    bindings: Sequence[ServiceBinding],
    *,
    max_workers: int = 32,
    max_concurrent_rpcs: int | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    security: ServerSecurity = PLAINTEXT,
    metrics: RpcMetrics | None = None,
    retry_after_seconds: float = DEFAULT_RETRY_AFTER_SECONDS,
) -> RunningServer:
    """Build and start a server on ``address`` (port 0 picks a free one); return it with its port.

    Every call is logged and, with ``metrics``, counted and timed (`snapcache.rpc_observer`).
    ``max_concurrent_rpcs``: handlers run at once before new calls are refused (admission); the
    pool then has at least that many threads plus `SPARE_WORKERS`. A refused call is told to retry
    after ``retry_after_seconds``, jittered.
    """
    admission = _admission(max_concurrent_rpcs, retry_after_seconds)
    admitting: list[grpc.ServerInterceptor] = []
    ceiling: int | None = None
    if admission is not None:
        admitting.append(AdmissionInterceptor(admission))
        max_workers = max(max_workers, admission.limit + SPARE_WORKERS)
        ceiling = hard_ceiling(admission.limit, SPARE_WORKERS)
    auth: list[grpc.ServerInterceptor] = []
    if security.access is not None:
        auth.append(AuthInterceptor(security.access, client_certificates=security.client_certificates))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        # admission before auth: an overloaded server sheds load before any token is checked
        interceptors=[RpcObserver(metrics), *admitting, *auth, *interceptors, ErrorInterceptor()],
        maximum_concurrent_rpcs=ceiling,
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ],
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    names = _add_services(server, bindings, health_servicer)
    port = security.bind(server, address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    server.start()
    running = RunningServer(
        server=server, port=port, health=health_servicer, service_names=tuple(names), admission=admission
    )
    running.set_serving(True)
    log.info(
        "gRPC server listening",
        extra={"address": address, "port": port, "services": names, "security": security.describe()},
    )
    return running


class AioHealth:
    """The aio health servicer, set from any thread (as `health.HealthServicer` is)."""

    def __init__(self, servicer: health_aio.HealthServicer, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._loop = loop

    def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        """Set ``service``'s status; waits until the server's loop has applied it."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._servicer.set(service, status), self._loop).result(timeout=10)


@dataclass
class AioRunningServer:
    """A started grpc.aio server, its loop's thread, its port and health (`RunningServer`'s face)."""

    server: grpc.aio.Server
    port: int
    health: AioHealth
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    service_names: Sequence[str] = field(default_factory=tuple)
    admission: Admission | None = None

    def set_serving(self, serving: bool) -> None:
        """Flip health for the whole server and each service."""
        _set_serving(self.health, self.service_names, serving)

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Report NOT_SERVING, stop taking calls, let running ones finish, end the loop's thread."""
        if self.loop.is_closed():
            return
        self.set_serving(False)
        stopped = asyncio.run_coroutine_threadsafe(self.server.stop(grace_seconds), self.loop)
        stopped.result(timeout=grace_seconds + 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def create_aio_server(
    address: str,
    bindings: Sequence[ServiceBinding],
    *,
    max_concurrent_rpcs: int | None = None,
    thread_name: str = "grpc-aio",
    security: ServerSecurity = PLAINTEXT,
    metrics: RpcMetrics | None = None,
    retry_after_seconds: float = DEFAULT_RETRY_AFTER_SECONDS,
) -> AioRunningServer:
    """Like `create_server`, for servicers whose methods are coroutines; serves on its own thread."""
    loop = asyncio.new_event_loop()
    admission = _admission(max_concurrent_rpcs, retry_after_seconds)
    admitting: list[grpc.aio.ServerInterceptor] = []
    ceiling: int | None = None
    if admission is not None:
        admitting.append(AioAdmissionInterceptor(admission))
        ceiling = hard_ceiling(admission.limit, SPARE_WORKERS)
    auth: list[grpc.aio.ServerInterceptor] = []
    if security.access is not None:
        auth.append(AioAuthInterceptor(security.access, client_certificates=security.client_certificates))
    started: dict[str, Any] = {}
    ready = threading.Event()

    async def start() -> None:
        server = grpc.aio.server(
            interceptors=[AioRpcObserver(metrics), *admitting, *auth, AioErrorInterceptor()],
            maximum_concurrent_rpcs=ceiling,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ],
        )
        health_servicer = health_aio.HealthServicer()
        names = _add_services(server, bindings, health_servicer)
        port = security.bind(server, address)
        if port == 0:
            raise OSError(f"cannot bind gRPC server to {address}")
        await server.start()
        started.update(server=server, port=port, health=health_servicer, names=names)

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:  # reported to the caller below
            started["error"] = exc
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name=thread_name, daemon=True)
    thread.start()
    ready.wait()
    if "error" in started:
        thread.join()
        raise started["error"]
    running = AioRunningServer(
        server=started["server"],
        port=started["port"],
        health=AioHealth(started["health"], loop),
        loop=loop,
        thread=thread,
        service_names=tuple(started["names"]),
        admission=admission,
    )
    running.set_serving(True)
    log.info(
        "gRPC (aio) server listening",
        extra={
            "address": address,
            "port": running.port,
            "services": started["names"],
            "security": security.describe(),
        },
    )
    return running
