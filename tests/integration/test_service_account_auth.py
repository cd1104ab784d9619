"""Kubernetes ServiceAccount tokens as gRPC bearer tokens, checked by the real kube-apiserver's TokenReview.

The suite's kube-apiserver (v1.20.2) signs ServiceAccount tokens (``--service-account-*``); the
test creates ServiceAccounts and mints their tokens through the TokenRequest API, as the kubelet
does for a pod. The registry checks them with the rule deploy/base/registry/rbac.yaml grants
(``create tokenreviews``), bound to a reviewer ServiceAccount of the test, so the deployed RBAC is
what makes the reviews work. Roles come from the identity file's ``user:`` and ``group:`` lines.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from kubernetes import client as k8s

from services.cache_registry.servicer import SERVICE_NAME, CacheRegistryServicer
from services.matcher.server import MatcherApp, MatcherConfig
from snapcache.access import AccessPolicy, Caller, IdentityFile, parse_identities
from snapcache.errors import Unauthenticated, Unavailable
from snapcache.grpc_server import RunningServer, ServerSecurity, ServiceBinding, create_server
from snapcache.rpc_errors import error_info, retry_delay
from snapcache.tls import ClientSecurity, open_channel
from snapcache.token_review import TokenReviewer
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc
from snapcache_cli.main import main
from tests.support.fake_provider import FakeProvider
from tests.support.kube_cluster import KubeCluster, free_port
from tests.support.registry_harness import Harness, build_harness, close_harness

pytestmark = pytest.mark.e2e

REGISTRY_RBAC = Path(__file__).parents[2] / "deploy" / "base" / "registry" / "rbac.yaml"
WAIT_SECONDS = 15.0
FRESH = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Accounts:
    """ServiceAccounts of the test and their tokens (minted by the TokenRequest API)."""

    cluster: KubeCluster
    namespace: str
    team_namespace: str  # every ServiceAccount here is a reader, by a group line
    tokens: dict[str, str]  # reviewer, writer, reader, stranger, member (in the team namespace)
    other_audience: str  # the writer's token, for an audience that is not the apiserver's

    def user(self, name: str) -> str:
        return f"system:serviceaccount:{self.namespace}:{name}"

    def identity_file(self, path: Path) -> Path:
        path.write_text(
            "# static tokens and Kubernetes identities, one file\n"
            "static-writer-token,static,writer\n"
            f"user:{self.user('writer')},writer sa,writer\n"
            f"user:{self.user('reader')},reader sa,reader\n"
            f"group:system:serviceaccounts:{self.team_namespace},the team,reader\n"
        )
        return path

    def reviewer_client(self, token: str | None = None) -> k8s.ApiClient:
        configuration = k8s.Configuration()
        configuration.host = self.cluster.url
        configuration.ssl_ca_cert = str(self.cluster.ca_path)
        configuration.api_key = {"BearerToken": token or self.tokens["reviewer"]}
        configuration.api_key_prefix = {"BearerToken": "Bearer"}
        return k8s.ApiClient(configuration)

    def write_kubeconfig(self, path: Path) -> Path:
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {
                        "server": self.cluster.url,
                        "certificate-authority": str(self.cluster.ca_path),
                    },
                }
            ],
            "users": [{"name": "reviewer", "user": {"token": self.tokens["reviewer"]}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "reviewer"}}],
            "current-context": "test",
        }
        path.write_text(json.dumps(document))
        return path


def mint_token(core: k8s.CoreV1Api, namespace: str, name: str, audiences: list[str] | None = None) -> str:
    """A token of ServiceAccount ``namespace/name`` (TokenRequest API; the apiserver's audience by default)."""
    request = k8s.AuthenticationV1TokenRequest(
        spec=k8s.V1TokenRequestSpec(audiences=audiences or [], expiration_seconds=3600)
    )
    answer = core.create_namespaced_service_account_token(name, namespace, request)
    assert answer.status is not None and answer.status.token
    return str(answer.status.token)


def create_service_account(core: k8s.CoreV1Api, namespace: str, name: str) -> None:
    core.create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=name))
    )


@pytest.fixture(scope="module")
def accounts(kube_cluster: KubeCluster) -> Iterator[Accounts]:
    namespace = kube_cluster.create_namespace("sa-auth")
    team = kube_cluster.create_namespace("sa-team")
    suffix = uuid.uuid4().hex[:8]
    # the rule deploy/ gives the registry for reviews, bound to this test's reviewer
    documents = [d for d in yaml.safe_load_all(REGISTRY_RBAC.read_text()) if d]
    [role] = [d for d in documents if d["kind"] == "ClusterRole"]
    review_rules = [r for r in role["rules"] if "tokenreviews" in r["resources"]]
    assert review_rules == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}
    ]
    role_name = f"snapcache-test-token-review-{suffix}"
    with kube_cluster.api_client() as client:
        core = k8s.CoreV1Api(client)
        rbac = k8s.RbacAuthorizationV1Api(client)
        for name in ("reviewer", "writer", "reader", "stranger"):
            create_service_account(core, namespace, name)
        create_service_account(core, team, "member")
        rbac.create_cluster_role(
            k8s.V1ClusterRole(
                metadata=k8s.V1ObjectMeta(name=role_name),
                rules=[
                    k8s.V1PolicyRule(api_groups=r["apiGroups"], resources=r["resources"], verbs=r["verbs"])
                    for r in review_rules
                ],
            )
        )
        rbac.create_cluster_role_binding(
            k8s.V1ClusterRoleBinding(
                metadata=k8s.V1ObjectMeta(name=role_name),
                role_ref=k8s.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=role_name
                ),
                subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name="reviewer", namespace=namespace)],
            )
        )
        try:
            tokens = {
                name: mint_token(core, namespace, name)
                for name in ("reviewer", "writer", "reader", "stranger")
            }
            tokens["member"] = mint_token(core, team, "member")
            found = Accounts(
                cluster=kube_cluster,
                namespace=namespace,
                team_namespace=team,
                tokens=tokens,
                other_audience=mint_token(core, namespace, "writer", audiences=["someone-else"]),
            )
            # the binding reaches the authorizer through its informers: wait until a review works
            reviewer = TokenReviewer(found.reviewer_client(), cache_seconds=0)
            deadline = time.monotonic() + WAIT_SECONDS
            while True:
                try:
                    if reviewer.review(tokens["writer"]) is not None:
                        break
                except Unavailable:
                    pass
                assert time.monotonic() < deadline, "the reviewer's grant never took effect"
                time.sleep(0.2)
            yield found
        finally:
            rbac.delete_cluster_role_binding(role_name)
            rbac.delete_cluster_role(role_name)


@pytest.fixture
def harness(sqlite_url: str) -> Iterator[Harness]:
    built = build_harness(sqlite_url, FakeProvider())
    try:
        yield built
    finally:
        close_harness(built)


def serve_registry(harness: Harness, access: AccessPolicy) -> RunningServer:
    binding = ServiceBinding(
        SERVICE_NAME,
        api_grpc.add_CacheRegistryServiceServicer_to_server,
        CacheRegistryServicer(harness.registry),
    )
    return create_server("127.0.0.1:0", [binding], max_workers=8, security=ServerSecurity(access=access))


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    info = error_info(caught.value)
    return caught.value.code(), info.reason if info is not None else ""  # type: ignore[attr-defined]


def eventually(check: Callable[[], object], *, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_service_account_tokens_get_their_roles_from_the_identity_file(
    accounts: Accounts, harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    reviewer = TokenReviewer(accounts.reviewer_client())
    access = AccessPolicy(
        IdentityFile(accounts.identity_file(tmp_path / "identities.csv")), token_review=reviewer
    )
    registry = serve_registry(harness, access)
    tokens = accounts.tokens
    matcher = MatcherApp(
        MatcherConfig(
            registry_target=f"127.0.0.1:{registry.port}",
            listen="127.0.0.1:0",
            hit_flush_seconds=0.1,
            status_check_seconds=0.1,
            security=ServerSecurity(access=access),
            # the matcher follows the registry and reports hits as the writer ServiceAccount
            registry_security=ClientSecurity(token=tokens["writer"]),
        )
    )
    matcher.start(wait_loaded_seconds=WAIT_SECONDS)
    channel = grpc.insecure_channel(f"127.0.0.1:{registry.port}", options=FRESH)
    stub = api_grpc.CacheRegistryServiceStub(channel)
    name = "imageCaches/imc-5a000001"

    def create(token: str, cache_id: str) -> pb.ImageCache:
        request = api.CreateImageCacheRequest(
            image_cache=pb.ImageCache(images=["nginx:1.25"]), image_cache_id=cache_id
        )
        return stub.CreateImageCache(request, metadata=bearer(token), timeout=10)

    try:
        # a writer ServiceAccount may create
        assert create(tokens["writer"], "imc-5a000001").name == name
        harness.settle()
        # a reader may get and list, not create
        get = api.GetImageCacheRequest(name=name)
        assert stub.GetImageCache(get, metadata=bearer(tokens["reader"]), timeout=10).name == name
        listed = stub.ListImageCaches(
            api.ListImageCachesRequest(), metadata=bearer(tokens["reader"]), timeout=10
        )
        assert [c.name for c in listed.image_caches] == [name]
        assert refused(lambda: create(tokens["reader"], "imc-5a000002")) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "ROLE_INSUFFICIENT",
        )
        # a ServiceAccount of the team namespace is a reader through its group
        assert stub.GetImageCache(get, metadata=bearer(tokens["member"]), timeout=10).name == name
        assert (
            refused(lambda: create(tokens["member"], "imc-5a000003"))[0] == grpc.StatusCode.PERMISSION_DENIED
        )
        # a valid identity the file gives no role, a bogus token, a token for another audience
        assert refused(lambda: create(tokens["stranger"], "imc-5a000004")) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "IDENTITY_WITHOUT_ROLE",
        )
        for bad in ("not-a-token", tokens["writer"][:-4] + "AAAA", accounts.other_audience):
            assert refused(lambda bad=bad: create(bad, "imc-5a000005")) == (  # type: ignore[misc]
                grpc.StatusCode.UNAUTHENTICATED,
                "TOKEN_INVALID",
            )
        # the static token file still works beside them
        assert create("static-writer-token", "imc-5a000006").name == "imageCaches/imc-5a000006"

        # the grpc.aio matcher: the reader matches (the review runs off its event loop)
        with open_channel(
            f"127.0.0.1:{matcher.port}", ClientSecurity(token=tokens["reader"]), options=FRESH
        ) as mc:
            match = mpb_grpc.MatcherServiceStub(mc)
            request = mpb.MatchImageCachesRequest(images=["nginx:1.25"])
            eventually(
                lambda: (
                    match.MatchImageCaches(request, timeout=10).decision
                    == mpb.MatchImageCachesResponse.MATCHED
                ),
                what="the reader's match",
            )
        with open_channel(f"127.0.0.1:{matcher.port}", ClientSecurity(token="bogus"), options=FRESH) as mc:
            assert refused(lambda: mpb_grpc.MatcherServiceStub(mc).MatchImageCaches(request, timeout=10)) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "TOKEN_INVALID",
            )
        # the matcher's hit went back to the registry as the writer ServiceAccount
        eventually(
            lambda: stub.GetImageCache(get, metadata=bearer(tokens["reader"]), timeout=10).match_count,
            what="the hit reported by the matcher",
        )
    finally:
        channel.close()
        matcher.stop(0)
        registry.stop(0)
    logged = "\n".join(r.getMessage() + json.dumps(r.__dict__, default=str) for r in caplog.records)
    for token in tokens.values():
        assert token not in logged
        assert token.split(".")[-1] not in logged  # not even the signature


def test_accepted_tokens_are_remembered_briefly_refusals_never(accounts: Accounts) -> None:
    now = [1000.0]
    reviewer = TokenReviewer(accounts.reviewer_client(), cache_seconds=10, max_cached=2, clock=lambda: now[0])
    writer, reader, member = (accounts.tokens[n] for n in ("writer", "reader", "member"))
    identity = reviewer.review(writer)
    assert identity is not None and identity.username == accounts.user("writer")
    assert f"system:serviceaccounts:{accounts.namespace}" in identity.groups
    assert reviewer.cached(writer) == identity
    assert reviewer.reviews == 1
    # refusals are asked about every time
    assert reviewer.review("bogus") is None and reviewer.review("bogus") is None
    assert reviewer.cached("bogus") is None
    assert reviewer.reviews == 3
    # bounded in size: the least recently used goes first
    reviewer.review(reader)
    reviewer.cached(writer)
    reviewer.review(member)
    assert reviewer.cached(reader) is None and reviewer.cached(writer) is not None
    # bounded in time
    now[0] += 10.5
    assert reviewer.cached(writer) is None and reviewer.cached(member) is None


def test_a_deleted_service_account_is_refused_once_remembered_acceptance_ends(accounts: Accounts) -> None:
    now = [0.0]
    reviewer = TokenReviewer(accounts.reviewer_client(), cache_seconds=5, clock=lambda: now[0])
    with accounts.cluster.api_client() as client:
        core = k8s.CoreV1Api(client)
        create_service_account(core, accounts.namespace, "short-lived")
        token = mint_token(core, accounts.namespace, "short-lived")
        identity = reviewer.review(token)
        assert identity is not None and identity.username == accounts.user("short-lived")
        core.delete_namespaced_service_account("short-lived", accounts.namespace)
    identities = parse_identities(f"group:system:serviceaccounts:{accounts.namespace},everyone,reader\n")
    policy = AccessPolicy(lambda: identities, token_review=reviewer)
    method = "/snapcache.v1.CacheRegistryService/GetImageCache"
    assert policy.authorize(method, Caller(token=token)) is not None  # remembered: at most 5 s more
    now[0] += 6
    deadline = time.monotonic() + WAIT_SECONDS
    while True:  # the apiserver looks the ServiceAccount up (--service-account-lookup)
        try:
            policy.authorize(method, Caller(token=token))
        except Unauthenticated as exc:
            assert exc.reason == "TOKEN_INVALID"
            break
        assert time.monotonic() < deadline, "a deleted ServiceAccount's token was still accepted"
        now[0] += 6
        time.sleep(0.2)


def test_an_api_server_that_cannot_answer_is_unavailable_and_not_remembered(
    accounts: Accounts, harness: Harness, tmp_path: Path
) -> None:
    identities = IdentityFile(accounts.identity_file(tmp_path / "identities.csv"))
    dead = k8s.Configuration()
    dead.host = f"https://127.0.0.1:{free_port()}"
    dead.ssl_ca_cert = str(accounts.cluster.ca_path)
    unreachable = TokenReviewer(k8s.ApiClient(dead), timeout_seconds=2)
    # a reviewer whose own credential may not create tokenreviews (RBAC): our fault, not the caller's
    forbidden = TokenReviewer(accounts.reviewer_client(accounts.tokens["stranger"]))
    for reviewer in (unreachable, forbidden):
        registry = serve_registry(harness, AccessPolicy(identities, token_review=reviewer))
        try:
            with grpc.insecure_channel(f"127.0.0.1:{registry.port}", options=FRESH) as channel:
                stub = api_grpc.CacheRegistryServiceStub(channel)
                for attempt in (1, 2):
                    with pytest.raises(grpc.RpcError) as caught:
                        stub.ListImageCaches(
                            api.ListImageCachesRequest(),
                            metadata=bearer(accounts.tokens["writer"]),
                            timeout=10,
                        )
                    info = error_info(caught.value)
                    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
                    assert info is not None and info.reason == "TOKEN_REVIEW_UNAVAILABLE"
                    assert retry_delay(caught.value) == 1.0
                    assert reviewer.reviews == attempt  # asked again: a failure is never remembered
                # a static token needs no review and still works
                assert (
                    stub.ListImageCaches(
                        api.ListImageCachesRequest(), metadata=bearer("static-writer-token"), timeout=10
                    ).image_caches
                    == []
                )
        finally:
            registry.stop(0)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--token-review"], "--token-review needs --token-file"),
        (["--token-review", "--token-file", "IDS"], "--token-review needs Kubernetes access"),
        (
            [
                "--token-review",
                "--token-file",
                "IDS",
                "--kubeconfig",
                "KUBE",
                "--token-review-cache-seconds",
                "-1",
            ],
            "must not be negative",
        ),
    ],
)
def test_serve_refuses_an_incomplete_token_review(
    arguments: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("SNAPCACHE_KUBECONFIG", "SNAPCACHE_KUBE_IN_CLUSTER"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "ids.csv").write_text("static,static,writer\n")
    (tmp_path / "kube.json").write_text(
        json.dumps({"apiVersion": "v1", "kind": "Config", "clusters": [], "users": [], "contexts": []})
    )
    replaced = [
        str(tmp_path / "ids.csv") if a == "IDS" else str(tmp_path / "kube.json") if a == "KUBE" else a
        for a in arguments
    ]
    code = main(["serve", "--data-dir", str(tmp_path), "--matcher-listen", "off", *replaced])
    assert code == 2
    assert message in capsys.readouterr().err


def test_serve_process_checks_service_account_tokens(accounts: Accounts, tmp_path: Path) -> None:
    port = free_port()
    command = [
        sys.executable, "-m", "snapcache_cli.main", "--log-format", "json", "--log-level", "debug", "serve",
        "--only", "registry", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data"),
        "--token-file", str(accounts.identity_file(tmp_path / "identities.csv")),
        "--token-review", "--kubeconfig", str(accounts.write_kubeconfig(tmp_path / "kubeconfig.json")),
    ]  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SNAPCACHE_")}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
    tokens = accounts.tokens
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = api_grpc.CacheRegistryServiceStub(channel)
            request = api.CreateImageCacheRequest(
                image_cache=pb.ImageCache(images=["nginx:1.25"]), image_cache_id="imc-5a0000aa"
            )
            created = stub.CreateImageCache(request, metadata=bearer(tokens["writer"]), timeout=10)
            assert created.name == "imageCaches/imc-5a0000aa"
            get = api.GetImageCacheRequest(name=created.name)
            assert stub.GetImageCache(get, metadata=bearer(tokens["reader"]), timeout=10).name == created.name
            assert refused(
                lambda: stub.CreateImageCache(request, metadata=bearer(tokens["reader"]), timeout=10)
            ) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "ROLE_INSUFFICIENT",
            )
            assert refused(
                lambda: stub.GetImageCache(get, metadata=bearer("bogus-token-5a"), timeout=10)
            ) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "TOKEN_INVALID",
            )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert "auth" in log and accounts.user("writer") in log  # the principal of the create's request line
    for token in tokens.values():
        assert token not in log
    assert "bogus-token-5a" not in log
