"""gRPC server bootstrap shared by every service: reflection, health, error mapping, graceful stop.

`create_server` is kept apart from running it (grpc examples style) so tests bind
`127.0.0.1:0` and talk to the same server stack production runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from snapcache.rpc_errors import ErrorInterceptor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceBinding:
    """One servicer and how to add it to a server."""

    full_name: str  # "snapcache.v1.CacheRegistryService"
    add_to_server: Callable[[Any, grpc.Server], None]
    servicer: Any


@dataclass
class RunningServer:
    """A started server with its port and health servicer."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: Sequence[str] = field(default_factory=tuple)

    def set_serving(self, serving: bool) -> None:
        """Flip health for the whole server and each service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            self.health.set(name, status)

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
) -> RunningServer:
    """Build and start a server on ``address`` (port 0 picks a free one); return it with its port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=[*interceptors, ErrorInterceptor()],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ],
    )
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [b.full_name for b in bindings]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    server.start()
    running = RunningServer(server=server, port=port, health=health_servicer, service_names=tuple(names))
    running.set_serving(True)
    log.info("gRPC server listening", extra={"address": address, "port": port, "services": names})
    return running
