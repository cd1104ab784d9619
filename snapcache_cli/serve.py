"""``snapcache serve``: the embedded default, every service in one process until SIGTERM/SIGINT.

Each service is a `Component`: started in order, drained (health NOT_SERVING, so load
balancers and kubelet probes stop sending work) and then stopped in reverse order. Today the
cache registry comes first; the matcher follows it over the wire (as it does when they run as
separate pods), so it is started with the registry's real address; the scheduler extender comes
last and asks that matcher in process (`snapcache_cli.colocated_matcher`: a function call, not a
gRPC round trip, on the path kube-scheduler waits for). ``--only extender`` asks a matcher over
gRPC at ``--matcher``, or, with ``--colocated-matcher``, runs its own matcher (no gRPC server)
following the registry at ``--registry`` and asks it in process: the deployed layout.

Security: both gRPC servers take the same ``--tls-*`` and ``--token-file`` options; the matcher
and the extender reach the registry and the matcher with the global client options
(``--tls-ca``, ``--client-cert``, ``--token``...), as separate pods would. With ``--token-review``
bearer tokens the file does not list are checked as Kubernetes ServiceAccount tokens
(`snapcache.token_review`), and the file's ``user:``/``group:`` lines give them roles. gRPC in
plaintext is served on loopback by default and elsewhere only with ``--plaintext``, so exposing an
unencrypted API is a choice someone wrote down. The extender serves HTTPS with the same
``--tls-*`` files (kube-scheduler's ``enableHTTPS``); its caller, the scheduler, sends no token.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from sqlalchemy.exc import SQLAlchemyError

from services.cache_registry.server import RegistryApp, RegistryConfig, ZoneConfig
from services.extender.server import ExtenderApp, ExtenderConfig
from services.matcher.server import MatcherApp, MatcherConfig
from snapcache.access import (
    DEFAULT_EXEMPT,
    AccessPolicy,
    Identities,
    IdentityFile,
    exempt_services,
    parse_role,
)
from snapcache.grpc_server import PLAINTEXT, ServerSecurity
from snapcache.kube_clients import kube_api_client
from snapcache.metrics_endpoint import MetricsEndpoint
from snapcache.rpc_observer import REQUEST_LOG
from snapcache.tls import PLAINTEXT_CHANNEL, ClientSecurity, ServerTls
from snapcache.token_review import DEFAULT_CACHE_SECONDS, TokenReviewer
from snapcache_cli.client import CommandFailed, client_security
from snapcache_cli.colocated_matcher import ColocatedMatcher

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_MATCHER_LISTEN = "127.0.0.1:50052"
DEFAULT_EXTENDER_LISTEN = "127.0.0.1:50053"
_EXTENDER_NODES_WAIT_SECONDS = 10.0
_MATCHER_LOAD_WAIT_SECONDS = 30.0
DEFAULT_ZONES = (ZoneConfig("local-a"), ZoneConfig("local-b"))
_STOP_GRACE_SECONDS = 5.0


class Component(Protocol):
    """One service run by `snapcache serve`."""

    name: str

    def start(self) -> str:
        """Start serving; return where (``cache registry on 127.0.0.1:50051``)."""

    def drain(self) -> None:
        """Report NOT_SERVING; keep answering calls in flight."""

    def stop(self) -> None:
        """Stop; safe to call after a failed or partial start."""


@dataclass
class RegistryComponent:
    """The cache registry (gRPC API, lifecycle worker, database) as a component."""

    config: RegistryConfig
    name: str = "cache registry"
    app: RegistryApp | None = None

    @property
    def address(self) -> str:
        """``host:port`` it listens on, with the real port when the config said 0."""
        assert self.app is not None, "not started"
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.app.port}"

    def start(self) -> str:
        """Migrate the database, start the worker and the gRPC server."""
        self.app = RegistryApp(self.config)
        try:
            self.app.start()
        except BaseException:
            self.stop()
            raise
        database = self.app.engine.url.render_as_string(hide_password=True)
        return (
            f"{self.name} on {self.address} ({self.config.security.describe()}, "
            f"data {self.config.data_dir}, database {database})"
        )

    def drain(self) -> None:
        """Health NOT_SERVING for the registry's services."""
        if self.app is not None and self.app.server is not None:
            self.app.server.set_serving(False)

    def stop(self) -> None:
        """Stop serving, stop the worker, close the database."""
        if self.app is not None:
            self.app.stop(_STOP_GRACE_SECONDS)
            self.app = None


@dataclass
class MatcherComponent:
    """The matcher, following the registry at the address ``registry`` gives once it started."""

    listen: str
    registry: Callable[[], str]
    metrics_listen: str = ""
    security: ServerSecurity = PLAINTEXT
    registry_security: ClientSecurity = PLAINTEXT_CHANNEL
    max_inflight_rpcs: int = 1024
    share_node_credentials: bool = False
    name: str = "matcher"
    app: MatcherApp | None = None

    @property
    def address(self) -> str:
        """``host:port`` it listens on, with the real port when the config said 0."""
        assert self.app is not None, "not started"
        return f"{self.listen.rpartition(':')[0]}:{self.app.port}"

    def started_app(self) -> MatcherApp:
        """The running matcher, for an extender asking it in process."""
        assert self.app is not None, "not started"
        return self.app

    def start(self) -> str:
        """Start serving (no gRPC when ``listen`` is "") and wait (bounded) for the first load."""
        config = MatcherConfig(
            registry_target=self.registry(),
            listen=self.listen,
            metrics_listen=self.metrics_listen,
            security=self.security,
            registry_security=self.registry_security,
            max_inflight_rpcs=self.max_inflight_rpcs,
            share_node_credentials=self.share_node_credentials,
        )
        self.app = MatcherApp(config)
        try:
            self.app.start(wait_loaded_seconds=_MATCHER_LOAD_WAIT_SECONDS)
        except BaseException:
            self.stop()
            raise
        status = self.app.sync.status()
        loaded = f"{status.cache_count} caches indexed" if status.loaded else "index still loading"
        metrics = f", metrics on :{self.app.metrics_port}" if self.app.metrics_port else ""
        if not self.listen:
            return f"{self.name} in process, following {self.registry()} ({loaded}{metrics})"
        return f"{self.name} on {self.address} ({self.security.describe()}, {loaded}{metrics})"

    def drain(self) -> None:
        """Health NOT_SERVING."""
        if self.app is not None:
            self.app.drain()

    def stop(self) -> None:
        """Stop serving, report the last hits, stop following the registry."""
        if self.app is not None:
            self.app.stop(_STOP_GRACE_SECONDS)
            self.app = None


@dataclass
class ExtenderComponent:
    """The kube-scheduler extender (HTTP), asking the matcher at the address ``matcher`` gives,
    or the running matcher ``colocated`` gives, in process."""

    listen: str
    matcher: Callable[[], str]
    colocated: Callable[[], MatcherApp] | None = None
    default_mode: str = "off"
    kubeconfig: Path | None = None
    in_cluster: bool = False
    matcher_security: ClientSecurity = PLAINTEXT_CHANNEL
    tls: ServerTls | None = None
    name: str = "scheduler extender"
    app: ExtenderApp | None = None

    def start(self) -> str:
        """Start serving HTTP; with Kubernetes access, wait (bounded) for the node cache."""
        config = ExtenderConfig(
            matcher_target="" if self.colocated is not None else self.matcher(),
            listen=self.listen,
            default_mode=self.default_mode,
            kubeconfig=self.kubeconfig,
            in_cluster=self.in_cluster,
            matcher_security=self.matcher_security,
            tls=self.tls,
        )
        colocated = self.colocated
        self.app = ExtenderApp(
            config,
            matcher=None
            if colocated is None
            else lambda fail_open: ColocatedMatcher(colocated(), on_fail_open=fail_open),
        )
        try:
            self.app.start(wait_nodes_seconds=_EXTENDER_NODES_WAIT_SECONDS)
        except BaseException:
            self.stop()
            raise
        cache = self.app.node_cache
        if cache is None:
            nodes = "no Kubernetes access: NodeNames requests see nodes without zones"
        else:
            nodes = f"{cache.size()} nodes" if cache.synced() else "nodes still listing"
        where = f"{self.listen.rpartition(':')[0]}:{self.app.port}"
        scheme = "http" if self.tls is None else "https"
        asks = "matcher in process" if self.colocated is not None else f"matcher {config.matcher_target}"
        return f"{self.name} on {scheme}://{where} ({asks}, {nodes})"

    def drain(self) -> None:
        """/healthz answers 503."""
        if self.app is not None:
            self.app.drain()

    def stop(self) -> None:
        """Stop serving HTTP, following nodes and writing events."""
        if self.app is not None:
            self.app.stop()
            self.app = None


@dataclass
class MetricsComponent:
    """One /metrics endpoint with the metrics of every component of the process (started last).

    One endpoint rather than one per component: a pod is one scrape target, and the components'
    metric names never collide (each has its own prefix).
    """

    listen: str
    registries: Callable[[], Sequence[CollectorRegistry]]
    name: str = "metrics endpoint"
    endpoint: MetricsEndpoint | None = None

    def start(self) -> str:
        """Serve the registries of the components already started."""
        self.endpoint = MetricsEndpoint(*self.registries())
        port = self.endpoint.serve(self.listen)
        return f"metrics on http://{self.listen.rpartition(':')[0]}:{port}/metrics"

    def drain(self) -> None:
        """Keep serving: the last scrapes during a shutdown are worth having."""

    def stop(self) -> None:
        """Stop serving."""
        if self.endpoint is not None:
            self.endpoint.stop()
            self.endpoint = None


def start_all(components: Sequence[Component]) -> list[str]:
    """Start components in order; on a failure stop those already started and re-raise."""
    started: list[Component] = []
    lines = []
    try:
        for component in components:
            lines.append(component.start())
            started.append(component)
    except BaseException:
        stop_all(started)
        raise
    return lines


def stop_all(components: Sequence[Component]) -> None:
    """Drain every component, then stop them in reverse order of starting."""
    for component in components:
        component.drain()
    for component in reversed(components):
        try:
            component.stop()
        except Exception:
            log.exception("stopping the %s failed", component.name)


def start_or_explain(components: Sequence[Component]) -> list[str]:
    """`start_all`, with the failures a user can fix turned into `CommandFailed`."""
    try:
        return start_all(components)
    except SQLAlchemyError as exc:
        raise CommandFailed(f"cannot open the database: {exc}") from exc
    except OSError as exc:  # the port is taken, the data directory is not writable
        raise CommandFailed(f"cannot start: {exc}") from exc
    except ValueError as exc:  # a configuration only found bad when loaded (a broken kubeconfig)
        raise CommandFailed(f"invalid configuration: {exc}", exit_code=2) from exc


def wait_for_signal() -> str:
    """Block until SIGTERM or SIGINT (main thread only); return the signal's name.

    A second signal during shutdown gets the default behaviour, so an impatient Ctrl-C still
    ends the process.
    """
    received: list[str] = []
    stop = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    while not stop.wait(0.5):
        pass
    return received[0]


def _zone(text: str) -> ZoneConfig:
    name, equals, limit = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME[=MAX_DISKS], got {text!r}")
    if not equals:
        return ZoneConfig(name)
    try:
        max_disks = int(limit)
    except ValueError:
        raise argparse.ArgumentTypeError(f"MAX_DISKS of zone {name!r} must be an integer") from None
    if max_disks < 0:
        raise argparse.ArgumentTypeError(f"MAX_DISKS of zone {name!r} must be >= 0 (0: unlimited)")
    return ZoneConfig(name, max_disks=max_disks)


def default_data_dir() -> Path:
    """``$SNAPCACHE_DATA_DIR`` or ``~/.local/share/snapcache``."""
    return Path(os.environ.get("SNAPCACHE_DATA_DIR") or "~/.local/share/snapcache").expanduser()


def database_url(text: str) -> str:
    """Accept the PostgreSQL URLs people paste (``postgres://``, ``postgresql://``).

    SQLAlchemy would read those as psycopg2, which is not installed; psycopg 3 is.
    """
    for prefix in ("postgres://", "postgresql://"):
        if text.startswith(prefix):
            return "postgresql+psycopg://" + text.removeprefix(prefix)
    return text


def register(subparsers: Any, *, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add ``serve`` to the top-level subcommands."""
    serve = subparsers.add_parser(
        "serve",
        parents=parents,
        help="run the services (embedded default: SQLite, local disks)",
        description="Run the cache registry, the matcher and the scheduler extender until SIGTERM or SIGINT.",
    )
    serve.add_argument(
        "--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT", help="gRPC address (default %(default)s)"
    )
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="PATH",
        help="state directory (default $SNAPCACHE_DATA_DIR or ~/.local/share/snapcache)",
    )
    serve.add_argument(
        "--database-url",
        default="",
        metavar="URL",
        help="sqlite:///PATH or postgresql://USER@HOST/DB (default SQLite in the data directory)",
    )
    serve.add_argument(
        "--instance-id",
        default=os.environ.get("SNAPCACHE_INSTANCE_ID", ""),
        metavar="ID",
        help="this registry's identity in work leases, stable across restarts so a restarted registry "
        "resumes its own builds at once (default $SNAPCACHE_INSTANCE_ID, else host name + data directory; "
        "a pod's host name changes when it is replaced)",
    )
    serve.add_argument(
        "--zone",
        type=_zone,
        action="append",
        default=None,
        metavar="NAME[=MAX_DISKS]",
        help="a zone of the local provider (repeatable; default local-a and local-b)",
    )
    serve.add_argument(
        "--max-concurrent-builds", type=int, default=2, metavar="N", help="builds at once (default 2)"
    )
    serve.add_argument(
        "--max-inflight-rpcs",
        type=int,
        default=0,
        metavar="N",
        help="calls running at once per gRPC server beyond which new ones are refused at once with "
        "RESOURCE_EXHAUSTED, reason OVERLOADED and a jittered retry delay (clients retry), instead of "
        "queueing; health and reflection are never refused (default 256 for the registry, 1024 for "
        "the matcher)",
    )
    serve.add_argument(
        "--lease-seconds",
        type=float,
        default=30.0,
        metavar="S",
        help="work leases last this long without renewal: how soon another replica takes over the "
        "builds of one that died (default 30)",
    )
    serve.add_argument(
        "--kubeconfig",
        type=Path,
        default=None,
        metavar="PATH",
        help="kubeconfig for reading dockerconfigjson Secrets named as credentials "
        "(default $SNAPCACHE_KUBECONFIG)",
    )
    serve.add_argument(
        "--in-cluster",
        action="store_true",
        help="read those Secrets with the pod's service account (default $SNAPCACHE_KUBE_IN_CLUSTER)",
    )
    serve.add_argument(
        "--matcher-listen",
        default=DEFAULT_MATCHER_LISTEN,
        metavar="HOST:PORT",
        help="the matcher's gRPC address (default %(default)s); 'off' runs no matcher",
    )
    serve.add_argument(
        "--share-node-credentials",
        action="store_true",
        help="match images the registry pulled with its own docker config (docker_config_path "
        "credentials, like a kubelet's node credentials) for every pod; by default for none, as "
        "no pod names them (docs/security.md)",
    )
    serve.add_argument(
        "--extender-listen",
        default=DEFAULT_EXTENDER_LISTEN,
        metavar="HOST:PORT",
        help="the scheduler extender's HTTP address (default %(default)s); 'off' runs no extender",
    )
    serve.add_argument(
        "--extender-default",
        choices=("off", "auto"),
        default="off",
        help="image caches for pods without a use-image-cache annotation (default %(default)s)",
    )
    serve.add_argument(
        "--matcher",
        default=DEFAULT_MATCHER_LISTEN,
        metavar="ADDRESS",
        help="the matcher the extender asks over gRPC with --only extender (default %(default)s)",
    )
    serve.add_argument(
        "--colocated-matcher",
        action="store_true",
        help="with --only extender: run a matcher in the extender's process, following the registry "
        "at --registry (it reports hits there: give a writer's token), and ask it with a function call "
        "instead of --matcher over gRPC (the round trip is most of a prioritize's time); `serve` without "
        "--only always asks its own matcher in process",
    )
    serve.add_argument(
        "--only",
        choices=("registry", "matcher", "extender"),
        default="",
        help="run one service: the registry, the matcher following the registry at --registry, or "
        "the extender asking the matcher at --matcher (as separate pods do); default: all",
    )
    serve.add_argument(
        "--metrics-listen",
        default="",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics of every service this process runs here (default: not served)",
    )
    _add_security_options(serve)
    serve.set_defaults(handler=run_serve, default_log_level="info")


def _add_security_options(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group(
        "security of the servers",
        "The registry and the matcher (gRPC) serve with these, the extender (HTTPS for kube-scheduler) "
        "with the --tls-* ones; to reach the gRPC servers, the matcher and the extender "
        "use the global --tls-ca, --tls-server-name, --client-cert, --client-key, --token and "
        "--client-token-file (the matcher needs a writer: it reports matches to the registry).",
    )
    group.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        metavar="PATH",
        help="serve TLS with this certificate chain (PEM), read again when it changes on disk",
    )
    group.add_argument("--tls-key", type=Path, default=None, metavar="PATH", help="the key of --tls-cert")
    group.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        metavar="PATH",
        help="require client certificates signed by this CA (mutual TLS); their common name or a "
        "subject alternative name may be given a role in --token-file as cert:NAME,USER,ROLE",
    )
    group.add_argument(
        "--tls-client-role",
        choices=("reader", "writer"),
        default="",
        help="role of any client certificate --tls-client-ca verified that --token-file does not name "
        "(default: such a client is refused)",
    )
    group.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="require callers to be identified: TOKEN,USER,ROLE lines (role reader or writer), sent as "
        "'authorization: Bearer TOKEN'; read again when it changes (default: no authentication)",
    )
    group.add_argument(
        "--token-review",
        action="store_true",
        help="also accept Kubernetes ServiceAccount tokens, checked with the TokenReview API through "
        "--kubeconfig or --in-cluster (needs 'create tokenreviews'); --token-file gives them roles "
        "with user:system:serviceaccount:NAMESPACE:NAME,LABEL,ROLE or group:GROUP,LABEL,ROLE lines",
    )
    group.add_argument(
        "--token-review-audience",
        action="append",
        default=None,
        metavar="AUDIENCE",
        help="accept only tokens issued for this audience (repeatable; default: the API server's own)",
    )
    group.add_argument(
        "--token-review-cache-seconds",
        type=float,
        default=DEFAULT_CACHE_SECONDS,
        metavar="S",
        help="remember an accepted token this long, so a revoked one works at most this long "
        "(default %(default)s; refusals and failures are never remembered)",
    )
    group.add_argument(
        "--auth-exempt",
        default=",".join(DEFAULT_EXEMPT),
        metavar="SERVICES",
        help="services anyone may call when authentication is on, comma-separated from health and "
        "reflection; '' for none (default %(default)s)",
    )
    group.add_argument(
        "--plaintext",
        action="store_true",
        help="allow serving without TLS on an address other than loopback (default: refused)",
    )


def is_loopback(address: str) -> bool:
    """True for ``127.0.0.1:P``, ``[::1]:P`` and ``localhost:P``; False for all interfaces."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_security(args: argparse.Namespace, *, addresses: Sequence[str]) -> ServerSecurity:
    """TLS and access control for the servers at ``addresses``, from ``serve`` options."""
    tls: ServerTls | None = None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CommandFailed("--tls-cert and --tls-key go together", exit_code=2)
    if args.tls_cert is not None:
        if args.plaintext:
            raise CommandFailed("--plaintext contradicts --tls-cert", exit_code=2)
        client_ca = args.tls_client_ca.expanduser() if args.tls_client_ca is not None else None
        tls = ServerTls(cert=args.tls_cert.expanduser(), key=args.tls_key.expanduser(), client_ca=client_ca)
    elif args.tls_client_ca is not None:
        raise CommandFailed("--tls-client-ca needs --tls-cert and --tls-key", exit_code=2)
    else:
        exposed = [a for a in addresses if not is_loopback(a)]
        if exposed and not args.plaintext:
            raise CommandFailed(
                f"refusing to serve in plaintext on {', '.join(exposed)}: give --tls-cert and "
                "--tls-key, or --plaintext to choose plaintext",
                exit_code=2,
            )
    if args.tls_client_role and args.tls_client_ca is None:
        raise CommandFailed("--tls-client-role needs --tls-client-ca", exit_code=2)
    reviewing = bool(args.token_review)
    if reviewing and args.token_file is None:
        raise CommandFailed(
            "--token-review needs --token-file: its user: and group: lines give Kubernetes identities roles",
            exit_code=2,
        )
    access: AccessPolicy | None = None
    try:
        if tls is not None:
            tls.validate()
        if args.token_file is not None or args.tls_client_role:
            exempt = [name.strip() for name in args.auth_exempt.split(",") if name.strip()]
            access = AccessPolicy(
                IdentityFile(args.token_file.expanduser()) if args.token_file is not None else Identities,
                certificate_role=parse_role(args.tls_client_role) if args.tls_client_role else None,
                exempt=exempt_services(exempt),
                token_review=token_reviewer(args) if reviewing else None,
            )
    except OSError as exc:
        raise CommandFailed(f"cannot read {exc.filename}: {exc.strerror}", exit_code=2) from exc
    except ValueError as exc:
        raise CommandFailed(f"invalid security configuration: {exc}", exit_code=2) from exc
    return ServerSecurity(tls=tls, access=access)


def kube_access(args: argparse.Namespace) -> tuple[Path | None, bool]:
    """(kubeconfig, in-cluster) from --kubeconfig / --in-cluster, else $SNAPCACHE_KUBECONFIG /
    $SNAPCACHE_KUBE_IN_CLUSTER, as every component of ``serve`` reads them."""
    kubeconfig = args.kubeconfig
    if kubeconfig is None and not args.in_cluster and os.environ.get("SNAPCACHE_KUBECONFIG"):
        kubeconfig = Path(os.environ["SNAPCACHE_KUBECONFIG"])
    in_cluster = args.in_cluster or (
        kubeconfig is None
        and os.environ.get("SNAPCACHE_KUBE_IN_CLUSTER", "").strip().lower() in ("1", "true", "yes")
    )
    return (kubeconfig.expanduser().resolve() if kubeconfig is not None else None), in_cluster


def token_reviewer(args: argparse.Namespace) -> TokenReviewer:
    """The TokenReview client of --token-review; ValueError when there is no Kubernetes access."""
    kubeconfig, in_cluster = kube_access(args)
    if kubeconfig is None and not in_cluster:
        raise ValueError("--token-review needs Kubernetes access: --kubeconfig or --in-cluster")
    if args.token_review_cache_seconds < 0:
        raise ValueError("--token-review-cache-seconds must not be negative")
    return TokenReviewer(
        kube_api_client(kubeconfig=kubeconfig, in_cluster=in_cluster),
        audiences=tuple(args.token_review_audience or ()),
        cache_seconds=args.token_review_cache_seconds,
    )


def internal_client_security(args: argparse.Namespace, security: ServerSecurity) -> ClientSecurity:
    """How the matcher and extender of this process reach the servers it runs, checked against them."""
    client = client_security(args)
    if security.tls is not None and not client.tls:
        raise CommandFailed(
            "the matcher and extender reach this process's TLS servers as clients: give --tls-ca "
            "(and --tls-server-name if the certificate does not name the listen host)",
            exit_code=2,
        )
    if security.client_certificates and client.cert is None:
        raise CommandFailed(
            "with --tls-client-ca, give --client-cert and --client-key for the matcher", exit_code=2
        )
    if security.access is not None and client.cert is None and client.token_source() is None:
        raise CommandFailed(
            "with --token-file, give the matcher a writer's --token, $SNAPCACHE_TOKEN or --client-token-file",
            exit_code=2,
        )
    return client


def registry_config(args: argparse.Namespace) -> RegistryConfig:
    """The registry's configuration from ``serve`` options."""
    kube: dict[str, Any] = {}  # only what was given, so the environment's defaults still apply
    if args.kubeconfig is not None:
        kube["kubeconfig"] = args.kubeconfig.expanduser().resolve()
    if args.in_cluster:
        kube["kube_in_cluster"] = True
    return RegistryConfig(
        data_dir=(args.data_dir or default_data_dir()).expanduser().resolve(),
        listen=args.listen,
        database_url=database_url(args.database_url),
        zones=tuple(args.zone or DEFAULT_ZONES),
        max_concurrent_builds=args.max_concurrent_builds,
        lease_seconds=args.lease_seconds,
        max_inflight_rpcs=args.max_inflight_rpcs or 256,
        instance_id=args.instance_id,
        **kube,
    )


def extender_component(args: argparse.Namespace, matcher_address: Callable[[], str]) -> ExtenderComponent:
    """The extender from ``serve`` options; Kubernetes access from --kubeconfig / --in-cluster."""
    kubeconfig, in_cluster = kube_access(args)
    if args.extender_listen == "off":
        raise CommandFailed("--only extender needs an --extender-listen address, not 'off'", exit_code=2)
    return ExtenderComponent(
        listen=args.extender_listen,
        matcher=matcher_address,
        default_mode=args.extender_default,
        kubeconfig=kubeconfig,
        in_cluster=in_cluster,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Start every component, say where they listen, serve until a signal, shut down cleanly."""
    components: list[Component] = []
    registry: RegistryComponent | None = None
    matcher: MatcherComponent | None = None

    def registry_address() -> str:
        return registry.address if registry is not None else str(args.registry)

    def matcher_address() -> str:
        return matcher.address if matcher is not None else str(args.matcher)

    runs_registry = args.only in ("", "registry")
    runs_matcher = args.only == "matcher" or (not args.only and args.matcher_listen != "off")
    if args.colocated_matcher and args.only != "extender":
        raise CommandFailed("--colocated-matcher goes with --only extender", exit_code=2)
    runs_extender = args.only == "extender" or (
        not args.only and runs_matcher and args.extender_listen != "off"
    )
    served = [args.listen] * runs_registry + [args.matcher_listen] * runs_matcher
    served += [args.extender_listen] * runs_extender
    security = server_security(args, addresses=[a for a in served if a != "off"])
    if args.only or not runs_matcher:
        clients = client_security(args)  # the servers it reaches are elsewhere: as configured
    else:
        clients = internal_client_security(args, security)
    if runs_registry:
        config = dataclasses.replace(registry_config(args), security=security)
        try:
            config.validate()
        except ValueError as exc:
            raise CommandFailed(f"invalid configuration: {exc}", exit_code=2) from exc
        registry = RegistryComponent(config)
        components.append(registry)
    if runs_matcher:
        matcher = MatcherComponent(
            listen=args.matcher_listen,
            registry=registry_address,
            security=security,
            registry_security=clients,
            max_inflight_rpcs=args.max_inflight_rpcs or 1024,
            share_node_credentials=args.share_node_credentials,
        )
        components.append(matcher)
    elif args.colocated_matcher:  # the extender's own, answering in process only
        matcher = MatcherComponent(
            listen="",
            registry=registry_address,
            registry_security=clients,
            share_node_credentials=args.share_node_credentials,
        )
        components.append(matcher)
    extender: ExtenderComponent | None = None
    if runs_extender:
        extender = extender_component(args, matcher_address)
        extender = dataclasses.replace(
            extender,
            matcher_security=clients,
            tls=security.tls,
            colocated=matcher.started_app if matcher is not None else None,
        )
        components.append(extender)
    if args.metrics_listen:

        def registries() -> list[CollectorRegistry]:
            apps = [c.app for c in (registry, matcher, extender) if c is not None]
            return [app.metrics.registry for app in apps if app is not None]

        components.append(MetricsComponent(args.metrics_listen, registries))
    where = start_or_explain(components)
    print("snapcache serving: " + "; ".join(where), flush=True)
    try:
        name = wait_for_signal()
        log.info("%s received; shutting down", name)
    finally:
        stop_all(components)
        REQUEST_LOG.flush()  # the last calls' lines before "stopped", not after it at exit
    log.info("stopped")
    return 0
