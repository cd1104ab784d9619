"""TLS, mutual TLS and access control of the gRPC servers, with certificates made by the test.

The registry here is the harness's service (SQLite, scripted provider) behind a second, secured
server built by the same `create_server` production uses; the matcher is the real `MatcherApp`
(grpc.aio) following it over TLS with a token. Every RPC of the registry is called through its
service descriptor, so an RPC added later is covered without touching this file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import descriptor, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.cache_registry.servicer import SERVICE_NAME, CacheRegistryServicer
from services.extender.server import ExtenderApp, ExtenderConfig
from services.matcher.server import MatcherApp, MatcherConfig
from snapcache.access import DEFAULT_EXEMPT, METHOD_ROLES, AccessPolicy, IdentityFile, Role, exempt_services
from snapcache.grpc_server import RunningServer, ServerSecurity, ServiceBinding, create_server
from snapcache.rpc_errors import error_info
from snapcache.tls import ClientSecurity, ServerTls, open_channel
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc
from snapcache_cli.main import build_parser, main
from snapcache_cli.operator_command import operator_config
from tests.support.certificates import Issued, Pki, serial_of
from tests.support.fake_provider import FakeProvider
from tests.support.registry_harness import Harness, build_harness, close_harness

IDENTITIES = """\
# token,user,role
reader-token,rita,reader
writer-token,walter,writer
cert:matcher-client,matcher,writer
cert:viewer,vera,reader
"""
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
REGISTRY_METHODS: list[descriptor.MethodDescriptor] = list(
    api.DESCRIPTOR.services_by_name["CacheRegistryService"].methods
)
# fresh connections for each channel: grpc shares subchannels between channels to one target
FRESH = [("grpc.use_local_subchannel_pool", 1)]
WAIT_SECONDS = 10.0
FIXTURES = Path(__file__).parents[1] / "fixtures" / "extender"


@dataclass
class Certificates:
    """The test's PKI: a CA, the server's certificate and clients' certificates."""

    pki: Pki
    server: Issued
    matcher_client: Issued
    viewer: Issued
    stranger: Issued  # signed by the CA, named nowhere
    foreign: Issued  # signed by another CA


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    pki = Pki(tmp_path / "pki")
    other = Pki(tmp_path / "other", name="other CA")
    return Certificates(
        pki=pki,
        server=pki.server(),
        matcher_client=pki.client("matcher-client"),
        viewer=pki.client("viewer"),
        stranger=pki.client("stranger"),
        foreign=other.client("viewer"),
    )


@pytest.fixture
def identity_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.csv"
    path.write_text(IDENTITIES)
    return path


@pytest.fixture
def harness(sqlite_url: str) -> Iterator[Harness]:
    built = build_harness(sqlite_url, FakeProvider())
    try:
        yield built
    finally:
        close_harness(built)


def policy(identity_file: Path, **options: object) -> AccessPolicy:
    return AccessPolicy(IdentityFile(identity_file), **options)  # type: ignore[arg-type]


def serve_registry(harness: Harness, security: ServerSecurity) -> RunningServer:
    binding = ServiceBinding(
        SERVICE_NAME,
        api_grpc.add_CacheRegistryServiceServicer_to_server,
        CacheRegistryServicer(harness.registry),
    )
    return create_server("127.0.0.1:0", [binding], max_workers=8, security=security)


@pytest.fixture
def tls_registry(harness: Harness, certs: Certificates, identity_file: Path) -> Iterator[RunningServer]:
    tls = ServerTls(cert=certs.server.cert, key=certs.server.key)
    server = serve_registry(harness, ServerSecurity(tls=tls, access=policy(identity_file)))
    try:
        yield server
    finally:
        server.stop(0)


@pytest.fixture
def mtls_registry(harness: Harness, certs: Certificates, identity_file: Path) -> Iterator[RunningServer]:
    tls = ServerTls(cert=certs.server.cert, key=certs.server.key, client_ca=certs.pki.ca)
    server = serve_registry(harness, ServerSecurity(tls=tls, access=policy(identity_file)))
    try:
        yield server
    finally:
        server.stop(0)


def refusal(channel: grpc.Channel, method: descriptor.MethodDescriptor) -> tuple[grpc.StatusCode, str]:
    """(code, ErrorInfo reason) of a refused call; ("OK"-ish code, "") when not refused."""
    request_class = message_factory.GetMessageClass(method.input_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    caller = channel.unary_stream if method.server_streaming else channel.unary_unary
    try:
        answer = caller(path, request_serializer=lambda m: m.SerializeToString())(request_class(), timeout=5)
        if method.server_streaming:
            next(iter(answer))
            answer.cancel()
    except grpc.RpcError as error:
        info = error_info(error)
        return error.code(), info.reason if info is not None else ""
    return grpc.StatusCode.OK, ""


def tls_client(certs: Certificates, **fields: object) -> ClientSecurity:
    return ClientSecurity(ca=certs.pki.ca, **fields)  # type: ignore[arg-type]


def channel_to(server: RunningServer | MatcherApp, security: ClientSecurity) -> grpc.Channel:
    return open_channel(f"127.0.0.1:{server.port}", security, options=FRESH)


def test_every_registry_rpc_is_in_the_access_table() -> None:
    assert REGISTRY_METHODS
    for method in REGISTRY_METHODS:
        assert f"/{SERVICE_NAME}/{method.name}" in METHOD_ROLES, method.name


@pytest.mark.parametrize(
    ("token", "writer_methods", "reader_methods"),
    [
        (None, (grpc.StatusCode.UNAUTHENTICATED, "AUTHENTICATION_REQUIRED"), "refused alike"),
        ("not-a-token", (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID"), "refused alike"),
        ("reader-token", (grpc.StatusCode.PERMISSION_DENIED, "ROLE_INSUFFICIENT"), "allowed"),
        ("writer-token", "allowed", "allowed"),
    ],
)
def test_every_registry_rpc_over_tls_by_token(
    tls_registry: RunningServer,
    certs: Certificates,
    token: str | None,
    writer_methods: tuple[grpc.StatusCode, str] | str,
    reader_methods: str,
) -> None:
    with channel_to(tls_registry, tls_client(certs, token=token or "")) as channel:
        for method in REGISTRY_METHODS:
            required = METHOD_ROLES[f"/{SERVICE_NAME}/{method.name}"]
            expected = (
                writer_methods if required is Role.WRITER or reader_methods == "refused alike" else "allowed"
            )
            got = refusal(channel, method)
            if expected == "allowed":
                assert got[0] not in REFUSED, (method.name, got)
            else:
                assert got == expected, method.name


@pytest.mark.parametrize(
    ("client", "writer_methods", "reader_methods"),
    [
        ("viewer", (grpc.StatusCode.PERMISSION_DENIED, "ROLE_INSUFFICIENT"), "allowed"),
        ("matcher_client", "allowed", "allowed"),
        ("stranger", (grpc.StatusCode.UNAUTHENTICATED, "CERTIFICATE_UNKNOWN"), "refused alike"),
    ],
)
def test_every_registry_rpc_over_mtls_by_certificate(
    mtls_registry: RunningServer,
    certs: Certificates,
    client: str,
    writer_methods: tuple[grpc.StatusCode, str] | str,
    reader_methods: str,
) -> None:
    issued: Issued = getattr(certs, client)
    with channel_to(mtls_registry, tls_client(certs, cert=issued.cert, key=issued.key)) as channel:
        for method in REGISTRY_METHODS:
            required = METHOD_ROLES[f"/{SERVICE_NAME}/{method.name}"]
            expected = (
                writer_methods if required is Role.WRITER or reader_methods == "refused alike" else "allowed"
            )
            got = refusal(channel, method)
            if expected == "allowed":
                assert got[0] not in REFUSED, (method.name, got)
            else:
                assert got == expected, method.name


def test_a_token_identifies_a_caller_over_mtls_too(mtls_registry: RunningServer, certs: Certificates) -> None:
    # the viewer's certificate is a reader, its token a writer: the token decides
    security = tls_client(certs, cert=certs.viewer.cert, key=certs.viewer.key, token="writer-token")
    with channel_to(mtls_registry, security) as channel:
        create = next(m for m in REGISTRY_METHODS if m.name == "CreateImageCache")
        assert refusal(channel, create)[0] not in REFUSED


@pytest.mark.parametrize("client", ["none", "foreign"])
def test_mtls_refuses_a_client_without_a_certificate_of_its_ca(
    mtls_registry: RunningServer, certs: Certificates, client: str
) -> None:
    fields: dict[str, object] = {"token": "writer-token"}  # a valid token does not replace the certificate
    if client == "foreign":
        fields.update(cert=certs.foreign.cert, key=certs.foreign.key)
    with channel_to(mtls_registry, tls_client(certs, **fields)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE  # the handshake failed


def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_registry: RunningServer) -> None:
    with channel_to(tls_registry, ClientSecurity(token="writer-token")) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def test_writer_runs_a_cache_through_its_life_and_reader_reads_it(
    harness: Harness, tls_registry: RunningServer, certs: Certificates
) -> None:
    with (
        channel_to(tls_registry, tls_client(certs, token="writer-token")) as writer_channel,
        channel_to(tls_registry, tls_client(certs, token="reader-token")) as reader_channel,
    ):
        writer = api_grpc.CacheRegistryServiceStub(writer_channel)
        reader = api_grpc.CacheRegistryServiceStub(reader_channel)
        created = writer.CreateImageCache(
            api.CreateImageCacheRequest(
                image_cache=pb.ImageCache(images=["nginx:1.25"]), image_cache_id="imc-00000001"
            )
        )
        assert created.state == pb.ImageCache.CREATING
        harness.settle()
        assert reader.GetImageCache(api.GetImageCacheRequest(name=created.name)).state == pb.ImageCache.READY
        assert [c.name for c in reader.ListImageCaches(api.ListImageCachesRequest()).image_caches] == [
            created.name
        ]
        disk = writer.ProvisionDisk(
            api.ProvisionDiskRequest(parent=created.name, zone="zone-a", disk_id="n1")
        )
        assert [d.name for d in reader.ListDisks(api.ListDisksRequest(parent=created.name)).disks] == [
            disk.name
        ]
        with pytest.raises(grpc.RpcError) as caught:
            reader.ReleaseDisk(api.ReleaseDiskRequest(name=disk.name))
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert writer.ReleaseDisk(api.ReleaseDiskRequest(name=disk.name)).released
        assert (
            writer.DeleteImageCache(api.DeleteImageCacheRequest(name=created.name)).state
            == pb.ImageCache.DELETING
        )
        events = reader.ListImageCacheEvents(api.ListImageCacheEventsRequest(parent=created.name)).events
        assert events[0].reason == "Created"


def test_identity_file_changes_apply_without_a_restart(
    tls_registry: RunningServer, certs: Certificates, identity_file: Path
) -> None:
    create = next(m for m in REGISTRY_METHODS if m.name == "CreateImageCache")
    with channel_to(tls_registry, tls_client(certs, token="reader-token")) as channel:
        assert refusal(channel, create)[0] is grpc.StatusCode.PERMISSION_DENIED
        identity_file.write_text("reader-token,rita,writer\n")
        os.utime(identity_file, ns=(1, time.time_ns() + 10**9))
        assert refusal(channel, create)[0] not in REFUSED
    with channel_to(tls_registry, tls_client(certs, token="writer-token")) as channel:
        assert refusal(channel, create) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")  # revoked


def presented_serial(port: int, ca: Path, *, alpn: str = "h2") -> int:
    """The serial of the certificate the server presents to a new TLS connection."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols([alpn])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return serial_of(ssl.DER_cert_to_PEM_cert(der).encode())


def bump(*paths: Path) -> None:
    """Make sure a rewrite is seen as a change even where mtimes are coarse."""
    for path in paths:
        os.utime(path, ns=(1, time.time_ns() + 10**9))


def test_a_certificate_rotated_on_disk_is_served_without_a_restart(
    tls_registry: RunningServer, certs: Certificates, tmp_path: Path
) -> None:
    port = tls_registry.port
    first = serial_of(certs.server.cert.read_bytes())
    assert presented_serial(port, certs.pki.ca) == first
    with channel_to(tls_registry, tls_client(certs, token="reader-token")) as old_channel:
        old = api_grpc.CacheRegistryServiceStub(old_channel)
        old.ListImageCaches(api.ListImageCachesRequest(), timeout=5)

        # half a rotation: a new key whose certificate is not written yet keeps the old pair
        staged = certs.pki.server("staged")
        certs.server.key.write_bytes(staged.key.read_bytes())
        bump(certs.server.key)
        assert presented_serial(port, certs.pki.ca) == first

        certs.server.cert.write_bytes(staged.cert.read_bytes())
        bump(certs.server.cert)
        second = serial_of(staged.cert.read_bytes())
        assert second != first
        assert presented_serial(port, certs.pki.ca) == second  # new connections see the new certificate
        old.ListImageCaches(api.ListImageCachesRequest(), timeout=5)  # the open connection carries on

    # a new CA altogether: clients trusting only the old one are refused at the handshake
    new_pki = Pki(tmp_path / "new-pki", name="new CA")
    new_pki.server(cert_path=certs.server.cert, key_path=certs.server.key)
    bump(certs.server.cert, certs.server.key)
    with channel_to(tls_registry, tls_client(certs, token="reader-token")) as stale:
        with pytest.raises(grpc.RpcError) as caught:
            api_grpc.CacheRegistryServiceStub(stale).ListImageCaches(api.ListImageCachesRequest(), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    with channel_to(tls_registry, ClientSecurity(ca=new_pki.ca, token="reader-token")) as fresh:
        api_grpc.CacheRegistryServiceStub(fresh).ListImageCaches(api.ListImageCachesRequest(), timeout=5)


def eventually(check: Callable[[], object], *, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture
def secure_matcher(
    tls_registry: RunningServer, certs: Certificates, identity_file: Path
) -> Iterator[MatcherApp]:
    app = MatcherApp(
        MatcherConfig(
            registry_target=f"127.0.0.1:{tls_registry.port}",
            listen="127.0.0.1:0",
            hit_flush_seconds=0.1,
            status_check_seconds=0.1,
            security=ServerSecurity(
                tls=ServerTls(cert=certs.server.cert, key=certs.server.key), access=policy(identity_file)
            ),
            registry_security=tls_client(certs, token="writer-token"),
        )
    )
    app.start(wait_loaded_seconds=WAIT_SECONDS)
    try:
        yield app
    finally:
        app.stop(0)


def test_matcher_follows_a_tls_token_registry_end_to_end(
    harness: Harness, tls_registry: RunningServer, secure_matcher: MatcherApp, certs: Certificates
) -> None:
    with channel_to(tls_registry, tls_client(certs, token="writer-token")) as channel:
        api_grpc.CacheRegistryServiceStub(channel).CreateImageCache(
            api.CreateImageCacheRequest(
                image_cache=pb.ImageCache(images=["nginx:1.25"]), image_cache_id="imc-00000001"
            )
        )
    harness.settle()
    request = mpb.MatchImageCachesRequest(images=["nginx:1.25"])
    with channel_to(secure_matcher, tls_client(certs, token="reader-token")) as channel:
        matcher = mpb_grpc.MatcherServiceStub(channel)

        def matched() -> bool:
            answer = matcher.MatchImageCaches(request, timeout=5)
            return answer.decision == mpb.MatchImageCachesResponse.MATCHED

        eventually(matched, what="the READY cache in the matcher's index")
        assert matcher.GetIndexStatus(mpb.GetIndexStatusRequest(), timeout=5).live
    # the recorded match went back to the registry through ReportMatches, a writer's call
    eventually(
        lambda: (
            harness.stub.GetImageCache(api.GetImageCacheRequest(name="imageCaches/imc-00000001")).match_count
        ),
        what="the hit reported to the registry",
    )
    with channel_to(secure_matcher, tls_client(certs)) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            mpb_grpc.MatcherServiceStub(channel).MatchImageCaches(request, timeout=5)
        info = error_info(caught.value)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert info is not None and info.reason == "AUTHENTICATION_REQUIRED"


def list_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    return [s.name for answer in answers for s in answer.list_services_response.service]


def test_health_and_reflection_need_no_token(
    tls_registry: RunningServer, secure_matcher: MatcherApp, certs: Certificates
) -> None:
    for server, service in ((tls_registry, SERVICE_NAME), (secure_matcher, "snapcache.v1.MatcherService")):
        with channel_to(server, tls_client(certs)) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            assert service in list_services(channel)


@pytest.mark.parametrize("model", ["thread pool", "aio"])
def test_health_and_reflection_can_require_a_token(
    harness: Harness, certs: Certificates, identity_file: Path, model: str
) -> None:
    security = ServerSecurity(
        tls=ServerTls(cert=certs.server.cert, key=certs.server.key),
        access=policy(identity_file, exempt=exempt_services(())),
    )
    server: RunningServer | MatcherApp
    if model == "aio":
        server = MatcherApp(
            MatcherConfig(
                registry_target=f"127.0.0.1:{harness.server.port}", listen="127.0.0.1:0", security=security
            )
        ).start(wait_loaded_seconds=WAIT_SECONDS)
    else:
        server = serve_registry(harness, security)
    try:
        with channel_to(server, tls_client(certs)) as channel:
            for check in (
                lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5),
                lambda: list_services(channel),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    check()
                assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with channel_to(server, tls_client(certs, token="reader-token")) as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert list_services(channel)
    finally:
        server.stop(0)


def test_default_exemptions_are_health_and_reflection() -> None:
    assert set(DEFAULT_EXEMPT) == {"health", "reflection"}


def test_cli_reaches_a_tls_registry_with_a_token(
    harness: Harness,
    tls_registry: RunningServer,
    certs: Certificates,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = ["--registry", f"127.0.0.1:{tls_registry.port}", "--tls-ca", str(certs.pki.ca)]
    monkeypatch.delenv("SNAPCACHE_TOKEN", raising=False)
    assert main(["cache", "list", *target]) == 1
    assert "UNAUTHENTICATED AUTHENTICATION_REQUIRED" in capsys.readouterr().err
    assert main(["cache", "create", "nginx:1.25", "--token", "reader-token", *target]) == 1
    assert "PERMISSION_DENIED ROLE_INSUFFICIENT" in capsys.readouterr().err
    monkeypatch.setenv("SNAPCACHE_TOKEN", "writer-token")
    assert main(["cache", "create", "nginx:1.25", *target]) == 0
    capsys.readouterr()
    assert main(["-o", "json", "cache", "list", *target]) == 0
    assert "imageCaches/imc-" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--listen", "0.0.0.0:0"], "refusing to serve in plaintext on 0.0.0.0:0"),
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert"),
        (["--token-file", "missing.csv"], "cannot read"),
        (["--tls-client-role", "reader"], "--tls-client-role needs --tls-client-ca"),
    ],
)
def test_serve_refuses_unsafe_or_incomplete_security(
    arguments: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["serve", "--data-dir", str(tmp_path), "--matcher-listen", "off", *arguments])
    assert code == 2
    assert message in capsys.readouterr().err


def test_serve_refuses_auth_without_an_identity_for_its_own_matcher(
    identity_file: Path, certs: Certificates, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = ["--tls-cert", str(certs.server.cert), "--tls-key", str(certs.server.key)]
    base = ["serve", "--data-dir", str(tmp_path), *tls, "--token-file", str(identity_file)]
    assert main(base) == 2
    assert "give --tls-ca" in capsys.readouterr().err
    assert main([*base, "--tls-ca", str(certs.pki.ca), "--token", ""]) == 2
    assert "give the matcher a writer's --token" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.e2e
def test_serve_process_with_tls_and_tokens_end_to_end(
    tmp_path: Path, certs: Certificates, identity_file: Path
) -> None:
    """`snapcache serve` on TLS + tokens: its matcher follows its registry, its extender asks its matcher."""
    ports = {name: free_port() for name in ("registry", "matcher", "extender", "metrics")}
    writer_token = tmp_path / "matcher.token"
    writer_token.write_text("writer-token\n")
    command = [
        sys.executable,
        "-m",
        "snapcache_cli.main",
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--listen",
        f"127.0.0.1:{ports['registry']}",
        "--matcher-listen",
        f"127.0.0.1:{ports['matcher']}",
        "--extender-listen",
        f"127.0.0.1:{ports['extender']}",
        "--extender-default",
        "auto",
        "--metrics-listen",
        f"127.0.0.1:{ports['metrics']}",
        "--tls-cert",
        str(certs.server.cert),
        "--tls-key",
        str(certs.server.key),
        "--token-file",
        str(identity_file),
        "--tls-ca",
        str(certs.pki.ca),
        "--client-token-file",
        str(writer_token),
    ]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SNAPCACHE_")}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
    try:
        with channel_to_port(ports["matcher"], tls_client(certs, token="reader-token")) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                try:
                    answer = health.Check(
                        health_pb2.HealthCheckRequest(service="snapcache.v1.MatcherService.IndexFeed"),
                        timeout=2,
                    )
                except grpc.RpcError:
                    return process.poll() is not None  # ends the wait; asserted below
                return answer.status == health_pb2.HealthCheckResponse.SERVING

            eventually(serving, what="the matcher following the registry over TLS with its token")
            assert process.poll() is None, log_path.read_text()
            status = mpb_grpc.MatcherServiceStub(channel).GetIndexStatus(
                mpb.GetIndexStatusRequest(), timeout=5
            )
            assert status.loaded and status.live
        body = json.loads((FIXTURES / "kube-scheduler-1.20-prioritize-request-nodenames.json").read_text())
        pod = body["Pod"]
        pod["metadata"].setdefault("annotations", {})["snapcache.io/use-image-cache"] = "auto"
        # the extender serves HTTPS with the same certificate (the scheduler's enableHTTPS)
        base = f"https://localhost:{ports['extender']}"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(certs.pki.ca)), timeout=5) as https:

            def extender_healthy() -> bool:
                try:
                    return https.get(f"{base}/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            eventually(extender_healthy, what="the extender")
            answer = https.post(f"{base}/prioritize", json=body)
            assert answer.status_code == 200
            metrics = https.get(f"{base}/metrics").text
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{ports['extender']}/healthz", timeout=5)
        assert not re.search(r"^snapcache_extender_fail_open_total\{.*\} [1-9]", metrics, re.MULTILINE), (
            metrics
        )
        # and the matcher did answer it, over TLS with the extender's token
        answers = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5).text
        assert re.search(r"^snapcache_matcher_answers_total\{.*\} [1-9]", answers, re.MULTILINE), answers
        # one endpoint for the process: the registry's metrics are there too (the matcher's calls)
        assert re.search(
            r'^snapcache_registry_grpc_requests_total\{code="OK",method="CacheRegistryService/ListImageCaches"\} [1-9]',
            answers,
            re.MULTILINE,
        ), answers
        assert "snapcache_registry_zone_caches" in answers and "snapcache_extender_requests_total" in answers
        with channel_to_port(ports["registry"], tls_client(certs)) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                api_grpc.CacheRegistryServiceStub(channel).ListImageCaches(
                    api.ListImageCachesRequest(), timeout=5
                )
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert "TLS, auth" in log_path.read_text()
    assert "writer-token" not in log_path.read_text() and "reader-token" not in log_path.read_text()


def channel_to_port(port: int, security: ClientSecurity) -> grpc.Channel:
    return open_channel(f"127.0.0.1:{port}", security, options=FRESH)


def test_cli_match_reaches_a_tls_matcher_with_a_token(
    secure_matcher: MatcherApp, certs: Certificates, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--matcher", f"127.0.0.1:{secure_matcher.port}", "--tls-ca", str(certs.pki.ca)]
    assert main(["match", "nginx:1.25", *target, "--token", "not-a-token"]) == 1
    assert "UNAUTHENTICATED TOKEN_INVALID" in capsys.readouterr().err
    assert main(["-o", "json", "match", "nginx:1.25", *target, "--token", "reader-token"]) == 0
    assert "NO_MATCH" in capsys.readouterr().out


def test_operator_reaches_the_registry_with_the_global_client_options(
    tmp_path: Path, certs: Certificates
) -> None:
    token_file = tmp_path / "operator.token"
    token_file.write_text("writer-token\n")
    client = certs.matcher_client
    args = build_parser().parse_args(
        [
            "operator",
            "--kubeconfig",
            str(tmp_path / "kubeconfig"),
            "--tls-ca",
            str(certs.pki.ca),
            "--client-cert",
            str(client.cert),
            "--client-key",
            str(client.key),
            "--client-token-file",
            str(token_file),
            "--tls-server-name",
            "localhost",
        ]
    )
    security = operator_config(args).registry_security
    assert security == ClientSecurity(
        ca=certs.pki.ca, cert=client.cert, key=client.key, server_name="localhost", token_file=token_file
    )
    source = security.token_source()
    assert source is not None and source() == "writer-token"


SECURITY_FLAGS = {
    "serve": (
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "--tls-client-role",
        "--token-file",
        "--token-review",
        "--auth-exempt",
        "--plaintext",
    ),
    "every command": (
        "--tls-ca",
        "--tls-server-name",
        "--client-cert",
        "--client-key",
        "--token",
        "--client-token-file",
    ),
}


@pytest.mark.parametrize("flag", [f for flags in SECURITY_FLAGS.values() for f in flags])
def test_security_flags_have_help_and_are_in_the_readme(flag: str) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert f"`{flag}" in readme
    commands = ("serve",) if flag in SECURITY_FLAGS["serve"] else ("serve", "operator", "match", "cache list")
    parser = build_parser()
    for command in commands:
        words = command.split()
        sub: argparse.ArgumentParser = parser
        for word in words:
            actions = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
            sub = actions[0].choices[word]
        action = next(a for a in sub._actions if flag in a.option_strings)
        assert action.help and action.help != argparse.SUPPRESS, (command, flag)


@pytest.fixture
def https_extender(certs: Certificates) -> Iterator[ExtenderApp]:
    app = ExtenderApp(
        ExtenderConfig(
            matcher_target="127.0.0.1:1",
            listen="127.0.0.1:0",
            freeze_gc=False,
            tls=ServerTls(cert=certs.server.cert, key=certs.server.key),
        )
    )
    app.start()
    try:
        yield app
    finally:
        app.stop()


def test_extender_serves_https_and_picks_up_a_rotated_certificate(
    https_extender: ExtenderApp, certs: Certificates
) -> None:
    port = https_extender.port
    verify = ssl.create_default_context(cafile=str(certs.pki.ca))
    with httpx.Client(verify=verify, timeout=5) as https:
        assert https.get(f"https://localhost:{port}/healthz").status_code == 200
        first = serial_of(certs.server.cert.read_bytes())
        assert presented_serial(port, certs.pki.ca, alpn="http/1.1") == first
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the HTTPS port
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        certs.pki.server(cert_path=certs.server.cert, key_path=certs.server.key)
        bump(certs.server.cert, certs.server.key)
        second = serial_of(certs.server.cert.read_bytes())
        assert second != first
        assert presented_serial(port, certs.pki.ca, alpn="http/1.1") == second
    with httpx.Client(verify=verify, timeout=5) as fresh:  # still serving after the failed handshake
        assert fresh.get(f"https://localhost:{port}/healthz").status_code == 200


def test_extender_mutual_tls_needs_the_schedulers_certificate(certs: Certificates) -> None:
    app = ExtenderApp(
        ExtenderConfig(
            matcher_target="127.0.0.1:1",
            listen="127.0.0.1:0",
            freeze_gc=False,
            tls=ServerTls(cert=certs.server.cert, key=certs.server.key, client_ca=certs.pki.ca),
        )
    ).start()
    try:
        url = f"https://localhost:{app.port}/healthz"
        anonymous = ssl.create_default_context(cafile=str(certs.pki.ca))
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, verify=anonymous, timeout=5)
        scheduler = ssl.create_default_context(cafile=str(certs.pki.ca))
        scheduler.load_cert_chain(certs.viewer.cert, certs.viewer.key)
        assert httpx.get(url, verify=scheduler, timeout=5).status_code == 200
    finally:
        app.stop()


def test_the_aio_matcher_identifies_callers_by_certificate(
    tls_registry: RunningServer, certs: Certificates, identity_file: Path
) -> None:
    app = MatcherApp(
        MatcherConfig(
            registry_target=f"127.0.0.1:{tls_registry.port}",
            listen="127.0.0.1:0",
            security=ServerSecurity(
                tls=ServerTls(cert=certs.server.cert, key=certs.server.key, client_ca=certs.pki.ca),
                access=policy(identity_file),
            ),
            registry_security=tls_client(certs, token="writer-token"),
        )
    ).start(wait_loaded_seconds=WAIT_SECONDS)
    try:
        status = mpb.GetIndexStatusRequest()
        with channel_to(app, tls_client(certs, cert=certs.viewer.cert, key=certs.viewer.key)) as channel:
            assert mpb_grpc.MatcherServiceStub(channel).GetIndexStatus(status, timeout=5).loaded
        with channel_to(app, tls_client(certs, cert=certs.stranger.cert, key=certs.stranger.key)) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                mpb_grpc.MatcherServiceStub(channel).GetIndexStatus(status, timeout=5)
            info = error_info(caught.value)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert info is not None and info.reason == "CERTIFICATE_UNKNOWN"
    finally:
        app.stop(0)


def test_no_token_reaches_a_log_line_or_an_answer(
    tls_registry: RunningServer, certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    planted = "planted-t0ken-9f3b"
    seen: list[str] = []
    with caplog.at_level("DEBUG"):
        for token in (planted, "reader-token", "writer-token"):
            with channel_to(tls_registry, tls_client(certs, token=token)) as channel:
                for method in REGISTRY_METHODS:
                    code, reason = refusal(channel, method)
                    seen.append(f"{code} {reason}")
                try:
                    api_grpc.CacheRegistryServiceStub(channel).CreateImageCache(
                        api.CreateImageCacheRequest(image_cache=pb.ImageCache(images=["bad ref!"])), timeout=5
                    )
                except grpc.RpcError as error:
                    seen.append(f"{error.details()} {error_info(error)}")
    text = caplog.text + "\n".join(seen)
    assert "refused" in caplog.text  # the refusals were logged, by method and reason
    for token in (planted, "reader-token", "writer-token"):
        assert token not in text
