"""The authorization rule of cached private images (`services.matcher.pull_access`), and the matcher under it.

Table-driven tests of the rule itself, then the matcher: every search path (EXACT small and
walked, partial policies, the miss explanation, manual matches) must refuse a cache holding a
private image the pod may not use, match it for a pod that may, and leave public images alone.
A property test holds the search against the same search over an index from which the caches
the pod may not use were removed: the rule may only take candidates away, never reorder or add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.matcher.index import CacheEntry, CacheState, HeldImage, ImagePool, build_index
from services.matcher.match_requests import Policy, build_request
from services.matcher.matching import Action, Decision, MatchOutcome, RejectReason, match
from services.matcher.messages import entry_from_cache, match_response
from services.matcher.pull_access import Grant, grant_of, refusal
from snapcache.errors import InvalidArgument
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb

NOW = 1_000_000
DIGESTS = ["sha256:" + c * 64 for c in "abcdef0123"]


@dataclass(frozen=True)
class Ref:
    """A credential reference as the registry records it."""

    secret: str = ""
    docker_config_path: str = ""


TEAM_PULL = Ref(secret="team-a/regcred")
NODE = Ref(docker_config_path="/etc/snapcache/docker/config.json")


@pytest.mark.parametrize(
    ("refs", "share", "expected"),
    [
        ([TEAM_PULL], False, Grant((("team-a", "regcred"),))),
        ([TEAM_PULL, Ref(secret="team-a/regcred")], False, Grant((("team-a", "regcred"),))),  # once
        ([TEAM_PULL, Ref(secret="team-b/other")], False, Grant((("team-a", "regcred"), ("team-b", "other")))),
        ([NODE], False, Grant((), nobody=True)),  # the registry's own credentials: no pod by default
        ([NODE], True, None),  # shared by the operator: public
        ([NODE, TEAM_PULL], True, Grant((("team-a", "regcred"),))),  # the Secret still binds
        ([NODE, TEAM_PULL], False, Grant((("team-a", "regcred"),), nobody=True)),
        ([Ref(secret="no-slash")], False, Grant((), nobody=True)),  # unreadable: nobody's
        ([Ref(secret="/name")], True, Grant((), nobody=True)),
        ([], False, Grant((), nobody=True)),  # private with no record of who pulled it
        ([], True, Grant((), nobody=True)),
    ],
)
def test_grants_from_recorded_references(refs: list[Ref], share: bool, expected: Grant | None) -> None:
    assert grant_of(refs, share_node_credentials=share) == expected


TEAM_A = Grant((("team-a", "regcred"),))
TWO_SECRETS = Grant((("team-a", "regcred"), ("team-a", "mirror")))
MIXED = Grant((("team-a", "regcred"), ("team-b", "other")))


@pytest.mark.parametrize(
    ("grant", "namespace", "secrets", "allowed", "says", "never_says"),
    [
        (TEAM_A, "team-a", {"regcred"}, True, "", ()),
        (TEAM_A, "team-a", {"regcred", "more"}, True, "", ()),
        (TEAM_A, "team-a", set(), False, "Secret regcred, which the pod does not list", ()),
        (TEAM_A, "team-a", {"other"}, False, "Secret regcred", ()),
        # another namespace, even naming a Secret of the same name: not its Secret; and the
        # answer names neither the Secret nor its namespace
        (TEAM_A, "team-b", {"regcred"}, False, "pods in namespace team-b may not use", ("team-a", "regcred")),
        (TEAM_A, "", set(), False, "names no pod namespace", ("team-a", "regcred")),
        (TWO_SECRETS, "team-a", {"regcred", "mirror"}, True, "", ()),
        (TWO_SECRETS, "team-a", {"regcred"}, False, "Secret mirror", ()),
        (
            MIXED,
            "team-a",
            {"regcred", "other"},
            False,
            "pods in namespace team-a may not use",
            ("team-b", "other"),
        ),
        (Grant((), nobody=True), "team-a", {"regcred"}, False, "no pod may use", ("config.json",)),
    ],
)
def test_a_pod_may_use_a_private_image_only_with_every_secret_that_pulled_it(
    *,
    grant: Grant,
    namespace: str,
    secrets: set[str],
    allowed: bool,
    says: str,
    never_says: tuple[str, ...],
) -> None:
    why = refusal(grant, namespace=namespace, pull_secrets=frozenset(secrets))
    assert (why == "") is allowed
    assert says in why
    for secret_text in never_says:
        assert secret_text not in why


# ---------------------------------------------------------------------------------------------
# the matcher under the rule


def held(normalized: str, digest: str, *, size: int = 10) -> HeldImage:
    return ImagePool().held_image(
        normalized=normalized,
        manifest_digest=digest,
        index_digest="",
        compressed_bytes=size,
        uncompressed_bytes=size * 2,
    )


APP = held("registry.example.com/team/app:2.0", DIGESTS[0])  # private in the examples below
NGINX = held("docker.io/library/nginx:1.25", DIGESTS[1])  # public
TOOL = held("ghcr.io/org/tool:1.0", DIGESTS[2], size=500)


def cache(
    number: int,
    *images: HeldImage,
    private: dict[HeldImage, Grant] | None = None,
    size: int = 20,
    created: int = 0,
    state: CacheState = CacheState.READY,
) -> CacheEntry:
    return CacheEntry(
        name=f"imageCaches/imc-{number:08d}",
        display_name="",
        state=state,
        cache_size_gib=size,
        create_time_ns=created,
        expire_time_ns=0,
        revision=1,
        images=images,
        available_zones=("zone-a",),
        hydrating_zones=(),
        private=private,
    )


def answer(entries: Sequence[CacheEntry], images: Sequence[str], **kw: object) -> MatchOutcome:
    request = build_request(images=images, **kw)  # type: ignore[arg-type]
    return match(build_index(entries, revision=1, pool=ImagePool()), request, now_ns=NOW)


POD_APP = ["registry.example.com/team/app:2.0", "nginx:1.25"]
TEAM_A_POD = {"namespace": "team-a", "image_pull_secrets": ["regcred"]}


@pytest.mark.parametrize(
    ("pod", "decision", "says"),
    [
        (TEAM_A_POD, Decision.MATCHED, ""),
        ({"namespace": "team-a", "image_pull_secrets": ["other"]}, Decision.NO_MATCH, "Secret regcred"),
        ({"namespace": "team-b", "image_pull_secrets": ["regcred"]}, Decision.NO_MATCH, "namespace team-b"),
        ({}, Decision.NO_MATCH, "names no pod namespace"),
    ],
)
def test_a_cache_holding_a_private_image_is_matched_only_for_pods_allowed_its_secret(
    pod: dict[str, object], decision: Decision, says: str
) -> None:
    entries = [cache(1, APP, NGINX, private={APP: TEAM_A})]
    outcome = answer(entries, POD_APP, **pod)
    assert outcome.decision is decision, outcome.message
    if decision is Decision.NO_MATCH:
        (rejection,) = outcome.rejections
        assert rejection.reason is RejectReason.NOT_AUTHORIZED
        assert says in rejection.message and says in outcome.message
        assert "registry.example.com/team/app:2.0" in rejection.message
        if pod.get("namespace") != "team-a":
            assert "team-a" not in outcome.message and "regcred" not in rejection.message.split(",", 1)[1]


def test_public_images_of_a_cache_with_private_ones_match_for_anyone() -> None:
    entries = [cache(1, APP, NGINX, private={APP: TEAM_A})]
    for pod in ({}, {"namespace": "team-b"}, {"namespace": "team-b", "image_pull_secrets": ["regcred"]}):
        outcome = answer(entries, ["nginx:1.25"], **pod)
        assert outcome.decision is Decision.MATCHED, outcome.message


def test_an_unauthorized_cache_gives_way_to_the_next_best() -> None:
    entries = [
        cache(1, APP, NGINX, private={APP: TEAM_A}, size=10),  # smallest: first for team-a
        cache(2, APP, NGINX, private={APP: Grant((("team-b", "regcred"),))}, size=15),
        cache(3, APP, NGINX, size=30),  # the app pulled anonymously: public
    ]
    assert [c.entry.name[-1] for c in answer(entries, POD_APP, **TEAM_A_POD).candidates] == ["1", "3"]
    team_b = answer(entries, POD_APP, namespace="team-b", image_pull_secrets=["regcred"])
    assert [c.entry.name[-1] for c in team_b.candidates] == ["2", "3"]
    assert {r.entry.name[-1]: r.reason for r in team_b.rejections} == {"1": RejectReason.NOT_AUTHORIZED}
    stranger = answer(entries, POD_APP, namespace="team-c")
    assert [c.entry.name[-1] for c in stranger.candidates] == ["3"]


@pytest.mark.parametrize("policy", [Policy.BYTES_COVERED, Policy.IMAGES_COVERED])
def test_partial_policies_refuse_unauthorized_caches_too(policy: Policy) -> None:
    entries = [
        cache(1, APP, NGINX, TOOL, private={TOOL: TEAM_A}, created=3),
        cache(2, APP, NGINX, created=2),
    ]
    pod = [*POD_APP, "ghcr.io/org/tool:1.0"]
    allowed = answer(entries, pod, policy=policy.value, **TEAM_A_POD)
    assert [c.entry.name[-1] for c in allowed.candidates] == ["1", "2"]
    refused = answer(entries, pod, policy=policy.value, namespace="team-a")
    assert [c.entry.name[-1] for c in refused.candidates] == ["2"]
    assert refused.rejections[0].reason is RejectReason.NOT_AUTHORIZED


def test_the_walk_of_common_images_skips_unauthorized_caches() -> None:
    # More caches hold the pod's images than WALK_FIRST: EXACT walks the rarest posting.
    private = {APP: TEAM_A}
    entries = [cache(n, APP, NGINX, private=private, size=1) for n in range(1, 601)]
    entries.append(cache(999, APP, NGINX, size=2))  # public, bigger: last in TKE's order
    refused = answer(entries, POD_APP, namespace="team-b", max_candidates=1)
    assert [c.entry.name for c in refused.candidates] == ["imageCaches/imc-00000999"]
    allowed = answer(entries, POD_APP, max_candidates=1, **TEAM_A_POD)
    assert allowed.candidates[0].entry.cache_size_gib == 1


def test_a_miss_explains_the_unauthorized_cache() -> None:
    entries = [cache(1, APP, private={APP: TEAM_A})]
    outcome = answer(entries, [*POD_APP, "ghcr.io/org/x:1"], namespace="team-a")
    assert outcome.decision is Decision.NO_MATCH
    assert outcome.rejections[0].reason is RejectReason.MISSING_IMAGES  # images come first


@pytest.mark.parametrize(
    ("pod", "images", "decision"),
    [
        (TEAM_A_POD, POD_APP, Decision.MATCHED),
        ({"namespace": "team-b", "image_pull_secrets": ["regcred"]}, POD_APP, Decision.MANUAL_NOT_AUTHORIZED),
        ({}, POD_APP, Decision.MANUAL_NOT_AUTHORIZED),
        ({}, ["nginx:1.25"], Decision.MATCHED),  # only its public image: anyone
    ],
)
def test_manual_matches_obey_the_rule(pod: dict[str, object], images: list[str], decision: Decision) -> None:
    entries = [cache(1, APP, NGINX, private={APP: TEAM_A})]
    outcome = answer(entries, images, image_cache="imc-00000001", **pod)
    assert outcome.decision is decision, outcome.message
    if decision is Decision.MANUAL_NOT_AUTHORIZED:
        assert outcome.action is Action.PULL_IMAGES
        assert outcome.rejections[0].reason is RejectReason.NOT_AUTHORIZED
        strict = answer(entries, images, image_cache="imc-00000001", strict=True, **pod)
        assert strict.action is Action.REJECT


@pytest.mark.parametrize(
    ("kw", "fields"),
    [
        ({"namespace": "Team_A"}, ["namespace"]),
        ({"namespace": "a" * 64}, ["namespace"]),
        ({"image_pull_secrets": ["regcred"]}, ["image_pull_secrets"]),  # no namespace to find it in
        (
            {"namespace": "team-a", "image_pull_secrets": ["ok", "Bad Name", ""]},
            ["image_pull_secrets[1]", "image_pull_secrets[2]"],
        ),
        ({"namespace": "team-a", "image_pull_secrets": [f"s{i}" for i in range(65)]}, ["image_pull_secrets"]),
    ],
)
def test_bad_pod_identities_name_the_field(kw: dict[str, object], fields: list[str]) -> None:
    with pytest.raises(InvalidArgument) as raised:
        build_request(images=["nginx"], **kw)  # type: ignore[arg-type]
    assert [v.field for v in raised.value.violations] == fields


# ---------------------------------------------------------------------------------------------
# from the registry's records to the index, and back out as the API's answer


def _recorded(
    image: str, digest: str, *, private: bool, refs: Sequence[pb.RegistryCredentialRef] = ()
) -> pb.CachedImage:
    return pb.CachedImage(
        image=image,
        normalized_image=image,
        manifest_digest=digest,
        compressed_bytes=10,
        uncompressed_bytes=20,
        requires_credentials=private,
        authorized_by=list(refs),
    )


def _cache_message(*images: pb.CachedImage) -> pb.ImageCache:
    return pb.ImageCache(
        name="imageCaches/imc-00000001",
        state=pb.ImageCache.READY,
        cache_size_gib=10,
        cached_images=list(images),
        zone_availability=[pb.ZoneAvailability(zone="zone-a", state=pb.ZoneAvailability.AVAILABLE)],
        revision=1,
    )


def test_caches_of_public_images_enter_the_index_without_a_rule() -> None:
    message = _cache_message(_recorded("docker.io/library/nginx:1.25", DIGESTS[1], private=False))
    assert entry_from_cache(message, ImagePool()).private is None


@pytest.mark.parametrize("share", [False, True])
def test_recorded_access_enters_the_index(share: bool) -> None:
    secret = pb.RegistryCredentialRef(secret="team-a/regcred")
    node = pb.RegistryCredentialRef(docker_config_path="/root/.docker/config.json")
    message = _cache_message(
        _recorded("registry.example.com/team/app:2.0", DIGESTS[0], private=True, refs=[secret]),
        _recorded("registry.example.com/ops/agent:1.0", DIGESTS[3], private=True, refs=[node]),
        _recorded("docker.io/library/nginx:1.25", DIGESTS[1], private=False),
    )
    entry = entry_from_cache(message, ImagePool(), share_node_credentials=share)
    assert entry.private is not None
    grants = {held.normalized: grant for held, grant in entry.private.items()}
    expected: dict[str, Grant] = {"registry.example.com/team/app:2.0": TEAM_A}
    if not share:
        expected["registry.example.com/ops/agent:1.0"] = Grant((), nobody=True)
    assert grants == expected
    request = build_request(images=["registry.example.com/ops/agent:1.0"], **TEAM_A_POD)  # type: ignore[arg-type]
    outcome = match(build_index([entry], revision=1, pool=ImagePool()), request, now_ns=NOW)
    assert outcome.decision is (Decision.MATCHED if share else Decision.NO_MATCH)
    response = match_response(outcome, request, revision=1, staleness_seconds=0)
    if not share:
        assert response.rejections[0].reason == mpb.Rejection.NOT_AUTHORIZED
        assert "/root/.docker" not in response.message


# ---------------------------------------------------------------------------------------------
# the rule only takes candidates away


_IMAGES = [
    held("docker.io/library/alpine:3", DIGESTS[4]),
    held("docker.io/library/nginx:1.25", DIGESTS[5], size=30),
    held("ghcr.io/org/tool:1.0", DIGESTS[6], size=5),
    held("registry.example.com/team/app:2.0", DIGESTS[7], size=50),
]
_POD_TEXTS = ["alpine:3", "nginx:1.25", "ghcr.io/org/tool:1.0", "registry.example.com/team/app:2.0"]
_GRANTS = [TEAM_A, Grant((("team-b", "regcred"),)), TWO_SECRETS, Grant((), nobody=True)]
_PODS = [
    {},
    TEAM_A_POD,
    {"namespace": "team-a", "image_pull_secrets": ["regcred", "mirror"]},
    {"namespace": "team-b", "image_pull_secrets": ["regcred"]},
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), count=st.integers(1, 30))
def test_the_rule_removes_exactly_the_caches_the_pod_may_not_use(data: st.DataObject, count: int) -> None:
    entries = []
    for number in range(count):
        images = tuple(image for image in _IMAGES if data.draw(st.booleans())) or (_IMAGES[0],)
        private = {image: data.draw(st.sampled_from(_GRANTS)) for image in images if data.draw(st.booleans())}
        entries.append(
            cache(
                number,
                *images,
                private=private or None,
                size=data.draw(st.integers(1, 3)),
                created=data.draw(st.integers(0, 5)),
                state=data.draw(st.sampled_from([CacheState.READY] * 4 + [CacheState.CREATING])),
            )
        )
    pod = data.draw(st.sampled_from(_PODS))
    policy = data.draw(st.sampled_from(list(Policy)))
    texts = data.draw(st.lists(st.sampled_from(_POD_TEXTS), min_size=1, max_size=4, unique=True))
    request = build_request(images=texts, policy=policy.value, max_candidates=4, max_rejections=100, **pod)  # type: ignore[arg-type]
    namespace = str(pod.get("namespace", ""))
    secrets = frozenset(pod.get("image_pull_secrets", []))

    def refused(entry: CacheEntry) -> bool:
        for image in request.images:
            held_image = entry.held(image.key)
            grant = (entry.private or {}).get(held_image) if held_image is not None else None
            if grant is not None and refusal(grant, namespace=namespace, pull_secrets=secrets):
                return True
        return False

    outcome = match(build_index(entries, revision=1, pool=ImagePool()), request, now_ns=NOW)
    allowed = [entry for entry in entries if not refused(entry)]
    without = match(build_index(allowed, revision=1, pool=ImagePool()), request, now_ns=NOW)
    assert [c.entry.name for c in outcome.candidates] == [c.entry.name for c in without.candidates]
    assert outcome.decision is without.decision
    for rejection in outcome.rejections:
        assert (rejection.reason is RejectReason.NOT_AUTHORIZED) is (
            refused(rejection.entry) and rejection.coverage.count >= request.min_covered
        ), rejection.message
