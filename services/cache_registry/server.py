"""Wiring of the cache registry: settings -> engine -> store -> provider -> worker -> gRPC server.

The only place that builds the registry's objects; everything else receives what it needs.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.cache_registry.commit_listener import CommitListener
from services.cache_registry.credential_refs import (
    IN_CLUSTER_ENV,
    KUBECONFIG_ENV,
    CredentialRefResolver,
)
from services.cache_registry.database import Database, make_engine, migrate
from services.cache_registry.feed import CommitSignal
from services.cache_registry.kube_secrets import KubeSecretReader
from services.cache_registry.local_provider import LocalProvider, LocalProviderConfig, LocalZone
from services.cache_registry.messages import ImageCacheWire
from services.cache_registry.metrics import RegistryMetrics
from services.cache_registry.service import CacheRegistry, RegistrySettings
from services.cache_registry.servicer import SERVICE_NAME, CacheRegistryServicer
from services.cache_registry.worker import LifecycleWorker, WorkerSettings
from snapcache.grpc_server import PLAINTEXT, RunningServer, ServerSecurity, ServiceBinding, create_server
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZoneConfig:
    """A zone of the local provider: its name, disk capacity (0 = unlimited), storage root."""

    name: str
    max_disks: int = 0
    root: Path | None = None


def _kubeconfig_from_env() -> Path | None:
    value = os.environ.get(KUBECONFIG_ENV, "")
    return Path(value).expanduser() if value else None


def _in_cluster_from_env() -> bool:
    return os.environ.get(IN_CLUSTER_ENV, "").strip().lower() in {"1", "true", "yes"}


@dataclass(frozen=True)
class RegistryConfig:
    """Everything the registry needs to start; validated before anything starts."""

    data_dir: Path
    listen: str = "127.0.0.1:50051"
    database_url: str = ""  # default: SQLite in data_dir
    zones: Sequence[ZoneConfig] = field(
        default_factory=lambda: (ZoneConfig("local-a"), ZoneConfig("local-b"))
    )
    pull_concurrency: int = 4
    max_concurrent_builds: int = 2
    lease_seconds: float = 30.0
    failed_cache_ttl_hours: float = 24.0
    worker_poll_seconds: float = 2.0
    grpc_workers: int = 32
    # Calls in flight (watch streams included) beyond which new ones are refused at once with
    # RESOURCE_EXHAUSTED, instead of queueing without bound for a worker thread.
    max_inflight_rpcs: int = 256
    # identity in work leases; stable across restarts so a restarted registry resumes its own
    # builds at once instead of waiting for its old leases to expire (default: host + data dir)
    instance_id: str = ""
    # Kubernetes API access, to read the dockerconfigjson Secrets caches name as credentials: a
    # kubeconfig file, or the pod's service account (in-cluster). Neither: Secret references fail
    # with CREDENTIALS_UNAVAILABLE. Defaults come from $SNAPCACHE_KUBECONFIG and
    # $SNAPCACHE_KUBE_IN_CLUSTER (read when the config is made), so `snapcache serve` takes them too.
    kubeconfig: Path | None = field(default_factory=_kubeconfig_from_env)
    kube_in_cluster: bool = field(default_factory=_in_cluster_from_env)
    # TLS and access control of the gRPC API (default: plaintext, open; for loopback)
    security: ServerSecurity = PLAINTEXT

    def database(self) -> str:
        """The database URL in force."""
        return self.database_url or f"sqlite:///{self.data_dir / 'registry.db'}"

    def validate(self) -> None:
        """Refuse a bad configuration at start-up rather than at the first request."""
        if not self.zones:
            raise ValueError("at least one zone is required")
        names = [z.name for z in self.zones]
        if len(set(names)) != len(names):
            raise ValueError(f"zone names repeat: {names}")
        if any(z.max_disks < 0 for z in self.zones):
            raise ValueError("zone max_disks must be >= 0")
        if self.pull_concurrency < 1 or self.max_concurrent_builds < 1:
            raise ValueError("pull_concurrency and max_concurrent_builds must be >= 1")
        if self.max_inflight_rpcs < 1:
            raise ValueError("max_inflight_rpcs must be >= 1")
        if not 0.5 <= self.lease_seconds <= 3600:
            raise ValueError("lease_seconds must be 0.5 to 3600")
        if not self.database().startswith(("sqlite", "postgresql")):
            raise ValueError(
                f"unsupported database URL {self.database()!r}: use sqlite:/// or postgresql+psycopg://"
            )
        if self.kubeconfig is not None and self.kube_in_cluster:
            raise ValueError("give either a kubeconfig or in-cluster Kubernetes access, not both")
        if self.kubeconfig is not None and not self.kubeconfig.is_file():
            raise ValueError(f"kubeconfig {self.kubeconfig} is not a file")
        self.security.validate()

    def secret_reader(self) -> KubeSecretReader | None:
        """The Kubernetes Secret reader this configuration asks for (None: no Kubernetes access)."""
        if self.kube_in_cluster:
            return KubeSecretReader.in_cluster()
        if self.kubeconfig is not None:
            return KubeSecretReader.from_kubeconfig(self.kubeconfig)
        return None


def _clock() -> datetime:
    return datetime.now(UTC)


class RegistryApp:
    """A built registry: its server, worker and database, started and stopped together."""

    def __init__(self, config: RegistryConfig) -> None:
        config.validate()
        # first: a kubeconfig or in-cluster setup that does not load stops start-up here
        self.secrets = config.secret_reader()
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.engine = make_engine(config.database())
        migrate(self.engine)
        self.database = Database(self.engine)
        self.signal = CommitSignal()
        # Other replicas' commits wake this one's watchers and worker (PostgreSQL only).
        self.listener = (
            CommitListener(self.engine, self.signal) if self.engine.dialect.name == "postgresql" else None
        )
        self.provider = LocalProvider(
            LocalProviderConfig(
                root=config.data_dir / "provider",
                zones=[LocalZone(name=z.name, max_disks=z.max_disks, root=z.root) for z in config.zones],
                pull_concurrency=config.pull_concurrency,
            )
        )
        self.registry = CacheRegistry(
            database=self.database,
            provider=self.provider,
            signal=self.signal,
            clock=_clock,
            settings=RegistrySettings(),
            encoder=ImageCacheWire(),
        )
        self.metrics = RegistryMetrics(database=self.database, zones=tuple(z.name for z in config.zones))
        owner = config.instance_id or f"{socket.gethostname()}:{config.data_dir.resolve()}"
        self.worker = LifecycleWorker(
            database=self.database,
            provider=self.provider,
            signal=self.signal,
            clock=_clock,
            settings=WorkerSettings(
                owner=owner,
                lease_seconds=config.lease_seconds,
                max_concurrent_builds=config.max_concurrent_builds,
                failed_cache_ttl=timedelta(hours=config.failed_cache_ttl_hours),
                poll_seconds=config.worker_poll_seconds,
            ),
            resolve_credentials=CredentialRefResolver(self.secrets),
            encoder=ImageCacheWire(),
            on_build=self.metrics.build_finished,
        )
        self.server: RunningServer | None = None
        if self.secrets is not None:
            log.info("credentials in Kubernetes Secrets are read through %s", self.secrets.server)

    @property
    def port(self) -> int:
        """The bound port (after `start`)."""
        assert self.server is not None
        return self.server.port

    def bindings(self) -> list[ServiceBinding]:
        """The registry's gRPC services, for a server of its own or a shared one."""
        return [
            ServiceBinding(
                full_name=SERVICE_NAME,
                add_to_server=api_grpc.add_CacheRegistryServiceServicer_to_server,
                servicer=CacheRegistryServicer(self.registry),
            )
        ]

    def start(self) -> RegistryApp:
        """Reconcile, start the worker, then serve."""
        if self.listener is not None:
            self.listener.start()
        self.worker.start()
        self.server = create_server(
            self.config.listen,
            self.bindings(),
            max_workers=self.config.grpc_workers,
            max_concurrent_rpcs=self.config.max_inflight_rpcs,
            security=self.config.security,
            metrics=self.metrics.rpc,
        )
        log.info(
            "cache registry serving on port %d (database %s)",
            self.server.port,
            self.engine.url.render_as_string(),
        )
        return self

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop serving (watchers released), stop the worker, close the database."""
        self.signal.close()
        if self.server is not None:
            self.server.stop(grace_seconds)
        self.worker.stop()
        if self.listener is not None:
            self.listener.stop()
        self.engine.dispose()
        if self.secrets is not None:
            self.secrets.close()
