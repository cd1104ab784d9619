"""Metrics and request logs of the registry, matcher and extender, scraped and captured as operators would.

The registry is the test harness's (real gRPC server, fake provider) with its `RegistryMetrics`
served by the same `MetricsEndpoint` production uses; the matcher is the real `MatcherApp`
following it. Every assertion reads `/metrics` over HTTP before and after an action, so a metric
that never moves fails.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cache_registry.provider import BuildFailure
from services.cache_registry.servicer import SERVICE_NAME, CacheRegistryServicer
from services.extender.decisions import DecisionCache
from services.extender.http_app import ExtenderHTTPServer, ExtenderRoutes, serve_in_thread
from services.extender.matches import MatchAnswer
from services.extender.metrics import ExtenderMetrics
from services.extender.scheduling import NoEvents, Scheduling
from services.matcher.index_sync import SyncSettings
from services.matcher.server import MatcherApp, MatcherConfig
from snapcache.access import AccessPolicy, IdentityFile
from snapcache.grpc_server import RunningServer, ServerSecurity, ServiceBinding, create_server
from snapcache.metrics_endpoint import MetricsEndpoint
from snapcache.pod_requests import Mode
from snapcache.rpc_observer import REQUEST_LOG, REQUEST_LOGGER, RpcMetrics
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc
from snapcache_cli.log_format import JsonLinesFormatter
from tests.support.registry_harness import Harness

WAIT_SECONDS = 10.0
PLANTED_TOKEN = "planted-token-6f1c0d9e"
PLANTED_BODY = "registry.example/planted-body-7ad2"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def value(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent): every given label must match."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        sample, _, number = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', sample.partition("{")[2]))
        if sample.partition("{")[0] == name and all(found.get(k) == v for k, v in labels.items()):
            return float(number)
    return 0.0


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def registry_port(harness: Harness) -> Iterator[int]:
    endpoint = MetricsEndpoint(harness.metrics.registry)
    try:
        yield endpoint.serve("127.0.0.1:0")
    finally:
        endpoint.stop()


def create(h: Harness, *images: str, cache_id: str) -> pb.ImageCache:
    cache = pb.ImageCache(images=list(images))
    return h.stub.CreateImageCache(api.CreateImageCacheRequest(image_cache=cache, image_cache_id=cache_id))


CREATE = "CacheRegistryService/CreateImageCache"


def test_registry_metrics_move_with_requests_builds_zones_and_disks(
    harness: Harness, registry_port: int
) -> None:
    before = scrape(registry_port)
    assert value(before, "snapcache_registry_database_up") == 1.0
    created = create(harness, "nginx:1.25", "redis:7", cache_id="imc-web00001")
    harness.settle()
    after = scrape(registry_port)
    assert value(after, "snapcache_registry_grpc_requests_total", method=CREATE, code="OK") == 1.0
    assert value(after, "snapcache_registry_grpc_request_duration_seconds_count", method=CREATE) == 1.0
    assert value(after, "snapcache_registry_builds_total", result="succeeded") == 1.0
    assert value(after, "snapcache_registry_build_duration_seconds_count", result="succeeded") == 1.0
    assert value(after, "snapcache_registry_pulled_bytes_total") == 200.0  # the fake's 100 bytes an image
    assert value(after, "snapcache_registry_caches", state="READY") == 1.0
    zone = harness.provider.zones()[0].name
    assert value(after, "snapcache_registry_zone_caches", zone=zone, state="AVAILABLE") == 1.0
    assert value(after, "snapcache_registry_disks", zone=zone) == 0.0

    harness.stub.ProvisionDisk(api.ProvisionDiskRequest(parent=created.name, zone=zone, disk_id="node-1"))
    assert value(scrape(registry_port), "snapcache_registry_disks", zone=zone) == 1.0

    # an error is counted by its code, the duplicate create as ALREADY_EXISTS
    with pytest.raises(grpc.RpcError):
        harness.stub.GetImageCache(api.GetImageCacheRequest(name="imageCaches/imc-missing1"))
    with pytest.raises(grpc.RpcError):
        create(harness, "nginx:1.25", cache_id="imc-web00001")
    errors = scrape(registry_port)
    get = "CacheRegistryService/GetImageCache"
    assert value(errors, "snapcache_registry_grpc_requests_total", method=get, code="NOT_FOUND") == 1.0
    assert (
        value(errors, "snapcache_registry_grpc_requests_total", method=CREATE, code="ALREADY_EXISTS") == 1.0
    )
    assert value(errors, "snapcache_registry_grpc_requests_total", method=CREATE, code="OK") == 1.0


def test_registry_counts_failed_builds(harness: Harness, registry_port: int) -> None:
    harness.provider.fail_pull = BuildFailure("IMAGE_NOT_FOUND", "image not found")
    create(harness, "nope:1", cache_id="imc-nope0001")
    harness.settle()
    text = scrape(registry_port)
    assert value(text, "snapcache_registry_builds_total", result="failed") == 1.0
    assert value(text, "snapcache_registry_builds_total", result="succeeded") == 0.0
    assert value(text, "snapcache_registry_caches", state="FAILED") == 1.0


@pytest.fixture
def matcher(harness: Harness) -> Iterator[MatcherApp]:
    app = MatcherApp(
        MatcherConfig(
            registry_target=f"127.0.0.1:{harness.server.port}",
            listen="127.0.0.1:0",
            hit_flush_seconds=0.1,
            metrics_listen="127.0.0.1:0",
            status_check_seconds=0.1,
            sync=SyncSettings(live_window_seconds=1.0, backoff_initial_seconds=0.05, backoff_max_seconds=0.2),
        )
    )
    app.start(wait_loaded_seconds=WAIT_SECONDS)
    try:
        yield app
    finally:
        app.stop(0)


MATCH = "MatcherService/MatchImageCaches"


def test_matcher_metrics_move_with_decisions_hits_and_errors(harness: Harness, matcher: MatcherApp) -> None:
    create(harness, "nginx:1.25", cache_id="imc-web00001")
    harness.settle()
    eventually(lambda: matcher.sync.status().ready_count == 1, "the READY cache in the index")
    port = matcher.metrics_port
    before = scrape(port)
    with grpc.insecure_channel(f"127.0.0.1:{matcher.port}") as channel:
        stub = mpb_grpc.MatcherServiceStub(channel)
        hit = stub.MatchImageCaches(mpb.MatchImageCachesRequest(images=["nginx:1.25"]))
        assert hit.decision == mpb.MatchImageCachesResponse.MATCHED
        stub.MatchImageCaches(mpb.MatchImageCachesRequest(images=["nginx:1.25"], validate_only=True))
        miss = stub.MatchImageCaches(mpb.MatchImageCachesRequest(images=["busybox:1"]))
        assert miss.decision == mpb.MatchImageCachesResponse.NO_MATCH
        with pytest.raises(grpc.RpcError) as caught:
            stub.MatchImageCaches(mpb.MatchImageCachesRequest(images=[]))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(port)
    matched = {"decision": "MATCHED", "action": "USE_CACHE"}
    assert (
        value(after, "snapcache_matcher_answers_total", **matched)
        - value(before, "snapcache_matcher_answers_total", **matched)
        == 2.0
    )
    no_match = {"decision": "NO_MATCH", "action": "PULL_IMAGES"}
    assert value(after, "snapcache_matcher_answers_total", **no_match) == 1.0
    assert value(after, "snapcache_matcher_hits_total") - value(before, "snapcache_matcher_hits_total") == 1.0
    saved = value(after, "snapcache_matcher_saved_bytes_total") - value(
        before, "snapcache_matcher_saved_bytes_total"
    )
    assert saved == 100.0  # the fake provider's compressed size of nginx:1.25
    assert value(after, "snapcache_matcher_grpc_requests_total", method=MATCH, code="OK") == 3.0
    assert value(after, "snapcache_matcher_grpc_requests_total", method=MATCH, code="INVALID_ARGUMENT") == 1.0
    assert value(after, "snapcache_matcher_grpc_request_duration_seconds_count", method=MATCH) == 4.0
    # the index's own metrics are there too (one registry, one endpoint)
    assert value(after, "snapcache_matcher_index_ready_caches") == 1.0


@pytest.fixture
def secured_registry(harness: Harness, tmp_path: Path) -> Iterator[tuple[RunningServer, RpcMetrics]]:
    identities = tmp_path / "tokens.csv"
    identities.write_text(f"{PLANTED_TOKEN},walter,writer\n")
    binding = ServiceBinding(
        SERVICE_NAME,
        api_grpc.add_CacheRegistryServiceServicer_to_server,
        CacheRegistryServicer(harness.registry),
    )
    metrics = harness.metrics.rpc
    server = create_server(
        "127.0.0.1:0",
        [binding],
        max_workers=4,
        security=ServerSecurity(access=AccessPolicy(IdentityFile(identities))),
        metrics=metrics,
    )
    try:
        yield server, metrics
    finally:
        server.stop(0)


def test_one_log_line_per_call_with_id_code_latency_and_principal_never_a_secret(
    secured_registry: tuple[RunningServer, RpcMetrics], caplog: pytest.LogCaptureFixture
) -> None:
    server, _metrics = secured_registry
    caplog.set_level(logging.DEBUG, logger=REQUEST_LOGGER)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = api_grpc.CacheRegistryServiceStub(channel)
        auth = [("authorization", f"Bearer {PLANTED_TOKEN}")]
        stub.CreateImageCache(
            api.CreateImageCacheRequest(
                image_cache=pb.ImageCache(images=[PLANTED_BODY]), image_cache_id="imc-secret01"
            ),
            metadata=[*auth, ("x-request-id", "req-42")],
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetImageCache(api.GetImageCacheRequest(name="imageCaches/imc-nonexist"), metadata=auth)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetImageCache(
                api.GetImageCacheRequest(name="imageCaches/imc-nonexist"),
                metadata=[("authorization", f"Bearer {PLANTED_TOKEN}-wrong")],
            )
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

    REQUEST_LOG.flush()  # lines are written by a background thread, off the request path
    records = [r for r in caplog.records if r.name == REQUEST_LOGGER]
    assert len(records) == 4, [r.getMessage() for r in records]
    lines = [json.loads(JsonLinesFormatter().format(r)) for r in records]
    create_line, missing, unauthenticated, health = lines
    assert create_line["request_id"] == "req-42"
    assert create_line["method"] == "/snapcache.v1.CacheRegistryService/CreateImageCache"
    assert create_line["code"] == "OK" and create_line["principal"] == "walter"
    assert isinstance(create_line["latency_ms"], float) and create_line["latency_ms"] >= 0
    assert create_line["level"] == "INFO"
    assert create_line["message"].startswith("req-42 /snapcache.v1.CacheRegistryService/CreateImageCache OK ")
    assert create_line["message"].endswith(" principal=walter")  # the text format shows it too
    assert missing["code"] == "NOT_FOUND" and missing["principal"] == "walter"
    assert missing["request_id"] and missing["request_id"] != create_line["request_id"]  # made here
    assert unauthenticated["code"] == "UNAUTHENTICATED" and "principal" not in unauthenticated
    assert health["method"] == "/grpc.health.v1.Health/Check" and health["level"] == "DEBUG"
    everything = caplog.text + "\n".join(json.dumps(line) for line in lines)
    assert PLANTED_TOKEN not in everything
    assert "planted-body" not in everything


def test_extender_logs_one_line_per_request_and_times_each_verb(caplog: pytest.LogCaptureFixture) -> None:
    metrics = ExtenderMetrics(node_cache_synced=lambda: True, node_cache_size=lambda: 0)
    scheduling = Scheduling(
        match=lambda query: MatchAnswer.unknown("no matcher in this test"),
        node_zones=dict,
        decisions=DecisionCache(ttl_seconds=1),
        events=NoEvents(),
        default_mode=Mode.AUTO,
    )
    server = ExtenderHTTPServer(
        ("127.0.0.1", 0),
        ExtenderRoutes(scheduling=scheduling, metrics=metrics),
        max_body_bytes=64 * 1024,
        socket_timeout=5,
    )
    thread = serve_in_thread(server)
    caplog.set_level(logging.DEBUG, logger=REQUEST_LOGGER)
    pod = {
        "metadata": {"name": "p", "uid": "u", "annotations": {"secret": PLANTED_TOKEN}},
        "spec": {"containers": [{"name": "c", "image": "nginx:1.25"}]},
    }
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with httpx.Client(timeout=5) as client:
            ok = client.post(
                f"{base}/prioritize",
                json={"Pod": pod, "NodeNames": ["n1"]},
                headers={"X-Request-Id": "sched-1"},
            )
            bad = client.post(f"{base}/filter", content=b"{not json")
            client.get(f"{base}/healthz")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert (ok.status_code, bad.status_code) == (200, 400)
    REQUEST_LOG.flush()
    lines = [json.loads(JsonLinesFormatter().format(r)) for r in caplog.records if r.name == REQUEST_LOGGER]
    prioritize, refused, health = lines
    assert prioritize["request_id"] == "sched-1" and prioritize["method"] == "POST /prioritize"
    assert prioritize["code"] == 200 and prioritize["latency_ms"] >= 0 and prioritize["level"] == "INFO"
    assert refused["code"] == 400 and refused["request_id"] and refused["request_id"] != "sched-1"
    assert health["method"] == "GET /healthz" and health["level"] == "DEBUG"
    assert PLANTED_TOKEN not in caplog.text + json.dumps(lines)
    text = metrics.render().decode()
    assert value(text, "snapcache_extender_request_duration_seconds_count", verb="prioritize") == 1.0
    assert value(text, "snapcache_extender_request_duration_seconds_count", verb="filter") == 1.0
    assert value(text, "snapcache_extender_requests_total", verb="filter", code="400") == 1.0
