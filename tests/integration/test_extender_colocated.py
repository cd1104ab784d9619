"""The extender asking a matcher of its own process answers as the one asking over gRPC.

A real registry (harness: real gRPC server, fake provider) with a cache AVAILABLE in zone-a only,
a real matcher following it; two real extenders on port 0: one asks that matcher over gRPC, the
other in process (`ColocatedMatcher`). The same request must get the same JSON from both, each
pod must count one hit at the registry either way, and a matcher that has not loaded its index
fails open in both alike. Last, `snapcache serve --only extender --colocated-matcher` as a
process: its own matcher follows the registry, scores the cache's zone and reports the hit.
"""

from __future__ import annotations

import dataclasses
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.extender.node_index import NodeIndex
from services.extender.server import ExtenderApp, ExtenderConfig
from services.matcher.server import MatcherApp
from snapcache.v1 import cache_registry_pb2 as api
from snapcache_cli.colocated_matcher import ColocatedMatcher
from tests.integration.test_extender_e2e import create_cache, matcher_config
from tests.support.fake_provider import FakeProvider
from tests.support.registry_harness import Harness, build_harness, close_harness
from tests.support.waiting import eventually

ZONES = ("zone-a", "zone-b", "zone-c")
CACHE = "imc-0000000a"  # busybox:1.36 + nginx:1.25, AVAILABLE in zone-a only
NODES = {f"node-{zone[-1]}{i}": zone for zone in ZONES for i in range(3)}
AUTO = {"snapcache.io/use-image-cache": "auto"}
STRICT = {**AUTO, "snapcache.io/image-cache-strict": "true"}


def extender(*, target: str = "", matcher: MatcherApp | None = None) -> ExtenderApp:
    app = ExtenderApp(
        ExtenderConfig(matcher_target=target, listen="127.0.0.1:0", matcher_budget_seconds=1.0),
        matcher=None
        if matcher is None
        else lambda fail_open: ColocatedMatcher(matcher, on_fail_open=fail_open),
    )
    index = NodeIndex(NODES)
    app.scheduling.node_zones = lambda: index  # the node cache's seam (no Kubernetes here)
    return app.start()


@dataclass
class Pair:
    harness: Harness
    matcher: MatcherApp
    remote: ExtenderApp
    colocated: ExtenderApp


def pod(uid: str, annotations: dict[str, str], *images: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "app", "namespace": "default", "uid": uid, "annotations": annotations},
        "spec": {"containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]},
    }


def names_request(pod_document: dict[str, Any]) -> dict[str, Any]:
    return {"Pod": pod_document, "Nodes": None, "NodeNames": sorted(NODES)}


def post(app: ExtenderApp, verb: str, document: dict[str, Any]) -> Any:
    response = httpx.post(f"http://127.0.0.1:{app.port}/{verb}", json=document, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def match_count(harness: Harness) -> int:
    cache = harness.stub.GetImageCache(api.GetImageCacheRequest(name=f"imageCaches/{CACHE}"))
    return int(cache.match_count)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    workdir = tmp_path_factory.mktemp("extender-colocated")
    provider = FakeProvider(zone_names=ZONES, fail_zone={"zone-b": "full", "zone-c": "full"})
    harness = build_harness(f"sqlite:///{workdir / 'registry.db'}", provider)
    started: list[Callable[[], None]] = [lambda: close_harness(harness)]
    try:
        create_cache(harness, CACHE, "busybox:1.36", "nginx:1.25")
        matcher = MatcherApp(matcher_config(harness.server.port)).start(wait_loaded_seconds=10)
        started.append(lambda: matcher.stop(0))
        assert matcher.sync.status().loaded
        remote = extender(target=f"127.0.0.1:{matcher.port}")
        started.append(remote.stop)
        colocated = extender(matcher=matcher)
        started.append(colocated.stop)
        yield Pair(harness, matcher, remote, colocated)
    finally:
        for stop in reversed(started):
            stop()


@pytest.mark.parametrize(
    ("annotations", "images"),
    [
        (AUTO, ("busybox:1.36", "nginx:1.25")),  # MATCHED: zone-a scores
        (STRICT, ("busybox:1.36", "nginx:1.25")),  # strict: only zone-a passes the filter
        (AUTO, ("redis:7",)),  # NO_MATCH
        (STRICT, ("redis:7",)),
        ({**AUTO, "snapcache.io/image-cache-id": CACHE}, ("busybox:1.36",)),  # manual
        ({**STRICT, "snapcache.io/image-cache-id": "imc-0000ffff"}, ("busybox:1.36",)),  # not found
        ({}, ("busybox:1.36", "nginx:1.25")),  # not annotated: the matcher is not asked
    ],
)
def test_the_colocated_extender_answers_what_the_remote_one_answers(
    pair: Pair, annotations: dict[str, str], images: tuple[str, ...]
) -> None:
    uid = f"same-{len(annotations)}-{'-'.join(images)}-{sorted(annotations.values())}"
    document = names_request(pod(uid, annotations, *images))
    for verb in ("filter", "prioritize"):
        remote, colocated = post(pair.remote, verb, document), post(pair.colocated, verb, document)
        assert colocated == remote, verb
    scores = {item["Host"]: item["Score"] for item in post(pair.colocated, "prioritize", document)}
    if annotations == AUTO and len(images) == 2:  # the one that must steer: not all zero
        assert {NODES[n] for n, s in scores.items() if s == 10} == {"zone-a"}
        assert {scores.get(n, 0) for n, z in NODES.items() if z != "zone-a"} == {0}  # left out: 0


@pytest.mark.parametrize("side", ["remote", "colocated"])
def test_each_pod_counts_one_hit_whichever_way_the_matcher_is_asked(pair: Pair, side: str) -> None:
    app = pair.remote if side == "remote" else pair.colocated
    before = match_count(pair.harness)
    for number in range(3):  # three pods, each filtered then prioritized twice (a retry)
        document = names_request(pod(f"hits-{side}-{number}", AUTO, "busybox:1.36", "nginx:1.25"))
        for verb in ("filter", "prioritize", "prioritize"):
            post(app, verb, document)
    eventually(lambda: match_count(pair.harness) == before + 3, what="three hits at the registry")
    time.sleep(0.3)  # three of the matcher's flush periods: a fourth hit would be in by now
    assert match_count(pair.harness) == before + 3  # and no more: the retries asked validate_only


def test_an_index_not_loaded_fails_open_as_over_grpc(pair: Pair) -> None:
    # a matcher following a registry that is not there never loads its index
    config = matcher_config(pair.harness.server.port, listen="127.0.0.1:0")
    unloaded = MatcherApp(dataclasses.replace(config, registry_target="127.0.0.1:9"))
    unloaded.start()
    remote = extender(target=f"127.0.0.1:{unloaded.port}")
    colocated = extender(matcher=unloaded)
    try:
        assert not unloaded.sync.status().loaded
        document = names_request(pod("not-loaded", STRICT, "busybox:1.36", "nginx:1.25"))
        for verb in ("filter", "prioritize"):
            assert post(colocated, verb, document) == post(remote, verb, document), verb
        filtered = post(colocated, "filter", names_request(pod("not-loaded-2", STRICT, "busybox:1.36")))
        assert sorted(filtered["NodeNames"]) == sorted(NODES)  # fail open: every node passes
        for app in (remote, colocated):
            metrics = app.metrics.render().decode()
            assert 'snapcache_extender_fail_open_total{code="UNAVAILABLE"}' in metrics, metrics
    finally:
        colocated.stop()
        remote.stop()
        unloaded.stop(0)


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output within {timeout}s")
    return process.stdout.readline()


def node_object(name: str, zone: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}}


@pytest.mark.e2e
def test_serve_only_extender_with_its_own_matcher_scores_and_reports_hits(pair: Pair) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "snapcache_cli.main", "--registry", f"127.0.0.1:{pair.harness.server.port}",
         "serve", "--only", "extender", "--colocated-matcher", "--extender-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        line = _read_line(process, timeout=40)
        assert "matcher in process, following 127.0.0.1:" in line and "1 caches indexed" in line, line
        url = line.split("scheduler extender on ", 1)[1].split()[0]
        before = match_count(pair.harness)
        document = {
            "Pod": pod("serve-process", AUTO, "busybox:1.36", "nginx:1.25"),
            "Nodes": {"items": [node_object(n, z) for n, z in NODES.items()]},
            "NodeNames": None,
        }
        answer = httpx.post(f"{url}/prioritize", json=document, timeout=10)
        assert answer.status_code == 200, answer.text
        scores = {item["Host"]: item["Score"] for item in answer.json()}
        assert {NODES[n] for n, s in scores.items() if s == 10} == {"zone-a"}
        eventually(lambda: match_count(pair.harness) == before + 1, what="the hit at the registry")
        process.terminate()
        _, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err


@pytest.mark.parametrize("only", [[], ["--only", "matcher"], ["--only", "registry"]])
def test_colocated_matcher_is_refused_without_only_extender(only: list[str], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "snapcache_cli.main", "serve", "--data-dir", str(tmp_path), *only,
         "--colocated-matcher"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--colocated-matcher goes with --only extender" in done.stderr
    assert not any(tmp_path.iterdir())  # refused before anything started
