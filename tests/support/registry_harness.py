"""A registry service assembled over a test database and a fake provider, behind a real gRPC server.

The worker does not run in a thread here: tests call `settle()` to run lifecycle passes until no
work is left, so each test sees a deterministic sequence of states.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from services.cache_registry import store
from services.cache_registry.credential_refs import resolve_local_credentials
from services.cache_registry.database import Database, make_engine, migrate
from services.cache_registry.feed import CommitSignal
from services.cache_registry.metrics import RegistryMetrics
from services.cache_registry.service import CacheRegistry, RegistrySettings
from services.cache_registry.servicer import SERVICE_NAME, CacheRegistryServicer
from services.cache_registry.worker import LifecycleWorker, WorkerSettings
from snapcache.grpc_server import RunningServer, ServiceBinding, create_server
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from tests.support.fake_provider import FakeProvider


class ManualClock:
    """A clock tests move by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class Harness:
    """Everything a registry test touches."""

    database: Database
    provider: FakeProvider
    registry: CacheRegistry
    worker: LifecycleWorker
    server: RunningServer
    stub: api_grpc.CacheRegistryServiceStub
    channel: grpc.Channel
    clock: ManualClock
    signal: CommitSignal
    metrics: RegistryMetrics

    def settle(self, passes: int = 10) -> None:
        """Run lifecycle passes until nothing is due."""
        for _ in range(passes):
            self.worker.run_once()
            self.worker.wait_idle(timeout=10)


def build_harness(
    url: str,
    provider: FakeProvider,
    settings: RegistrySettings | None = None,
    *,
    encoder: store.CacheEncoder | None = None,
) -> Harness:
    """Assemble a harness (also used by tests that need two registries on one database).

    ``encoder``: the wire form the service and worker store with each version (as
    `services.cache_registry.server` wires it); None leaves encoding to the gRPC edge.
    """
    engine = make_engine(url)
    migrate(engine)
    database = Database(engine)
    signal = CommitSignal()
    clock = ManualClock()
    registry = CacheRegistry(
        database=database,
        provider=provider,
        signal=signal,
        clock=clock,
        settings=settings or RegistrySettings(watch_poll_seconds=0.05, watch_heartbeat_seconds=0.2),
        encoder=encoder,
    )
    metrics = RegistryMetrics(database=database, zones=tuple(z.name for z in provider.zones()))
    worker = LifecycleWorker(
        database=database,
        provider=provider,
        signal=signal,
        clock=clock,
        settings=WorkerSettings(owner="test-worker", retry_base_seconds=1.0, progress_interval_seconds=0.0),
        resolve_credentials=resolve_local_credentials,
        encoder=encoder,
        on_build=metrics.build_finished,
    )
    server = create_server(
        "127.0.0.1:0",
        [
            ServiceBinding(
                SERVICE_NAME,
                api_grpc.add_CacheRegistryServiceServicer_to_server,
                CacheRegistryServicer(registry),
            )
        ],
        max_workers=8,
        metrics=metrics.rpc,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return Harness(
        database=database,
        provider=provider,
        registry=registry,
        worker=worker,
        server=server,
        stub=api_grpc.CacheRegistryServiceStub(channel),
        channel=channel,
        clock=clock,
        signal=signal,
        metrics=metrics,
    )


def close_harness(harness: Harness) -> None:
    """Stop everything a harness started."""
    harness.signal.close()
    harness.channel.close()
    harness.server.stop(0)
    harness.worker.stop()
    harness.database.engine.dispose()


@pytest.fixture
def harness(database_url: str) -> Iterator[Harness]:
    """A registry on a fresh database (SQLite and PostgreSQL) with a fake provider."""
    built = build_harness(database_url, FakeProvider())
    try:
        yield built
    finally:
        close_harness(built)
