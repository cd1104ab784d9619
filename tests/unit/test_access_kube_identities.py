"""Kubernetes identities in the identity file and the access decision (the TokenReview API itself is
exercised against the real kube-apiserver in tests/integration/test_service_account_auth.py)."""

from __future__ import annotations

import pytest

from snapcache import errors
from snapcache.access import (
    AccessPolicy,
    Caller,
    KubeIdentity,
    Principal,
    ReviewNeeded,
    Role,
    kube_principal,
    parse_identities,
)

FILE = """\
static-token,static,writer
user:system:serviceaccount:ops:deployer,deployer,writer
group:system:serviceaccounts:team,the team,reader
group:platform-admins,admins,writer
"""
GET = "/snapcache.v1.CacheRegistryService/GetImageCache"
CREATE = "/snapcache.v1.CacheRegistryService/CreateImageCache"


class ScriptedReview:
    """A `TokenReview` answering from a table, counting the API calls it would make."""

    def __init__(self, known: dict[str, KubeIdentity], cached: dict[str, KubeIdentity] | None = None) -> None:
        self.known = known
        self.remembered = dict(cached or {})
        self.reviews = 0

    def cached(self, token: str) -> KubeIdentity | None:
        return self.remembered.get(token)

    def review(self, token: str) -> KubeIdentity | None:
        self.reviews += 1
        return self.known.get(token)


def test_user_and_group_lines_are_parsed_beside_tokens() -> None:
    identities = parse_identities(FILE)
    assert identities.kube_users == {"system:serviceaccount:ops:deployer": Principal("deployer", Role.WRITER)}
    assert identities.kube_groups["system:serviceaccounts:team"].role is Role.READER
    assert len(identities.tokens) == 1


@pytest.mark.parametrize(
    "text",
    ["user:,x,reader\n", "group:,x,reader\n", "user:a,x,reader\nuser:a,y,writer\n", "group:g,x,boss\n"],
)
def test_bad_kube_lines_are_refused_by_line(text: str) -> None:
    with pytest.raises(ValueError, match="line"):
        parse_identities(text)


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        (KubeIdentity("system:serviceaccount:ops:deployer", ("system:serviceaccounts:team",)), Role.WRITER),
        (KubeIdentity("system:serviceaccount:team:x", ("system:serviceaccounts:team",)), Role.READER),
        (KubeIdentity("alice", ("system:serviceaccounts:team", "platform-admins")), Role.WRITER),
        # a user line wins over groups, even a higher one
        (KubeIdentity("system:serviceaccount:ops:deployer", ("platform-admins",)), Role.WRITER),
    ],
)
def test_roles_of_kube_identities(identity: KubeIdentity, expected: Role) -> None:
    principal = kube_principal(identity, parse_identities(FILE))
    assert principal == Principal(identity.username, expected)


def test_a_user_line_wins_even_when_lower_than_a_group() -> None:
    identities = parse_identities("user:bob,bob,reader\ngroup:admins,admins,writer\n")
    assert kube_principal(KubeIdentity("bob", ("admins",)), identities).role is Role.READER


def test_a_kube_identity_without_a_role_is_permission_denied() -> None:
    with pytest.raises(errors.PermissionDenied) as refused:
        kube_principal(
            KubeIdentity("system:serviceaccount:x:y", ("system:authenticated",)), parse_identities(FILE)
        )
    assert refused.value.reason == "IDENTITY_WITHOUT_ROLE"


def test_the_policy_reviews_only_tokens_the_file_does_not_list() -> None:
    identities = parse_identities(FILE)
    review = ScriptedReview(
        {"sa-token": KubeIdentity("system:serviceaccount:team:x", ("system:serviceaccounts:team",))}
    )
    policy = AccessPolicy(lambda: identities, token_review=review)
    assert policy.authorize(CREATE, Caller(token="static-token")) == Principal("static", Role.WRITER)
    assert review.reviews == 0
    assert policy.authorize(GET, Caller(token="sa-token")) == Principal(
        "system:serviceaccount:team:x", Role.READER
    )
    with pytest.raises(errors.PermissionDenied):
        policy.authorize(CREATE, Caller(token="sa-token"))
    with pytest.raises(errors.Unauthenticated) as bogus:
        policy.authorize(GET, Caller(token="bogus"))
    assert bogus.value.reason == "TOKEN_INVALID"
    with pytest.raises(errors.Unauthenticated):  # an empty token is never sent for review
        policy.authorize(GET, Caller(token=""))
    assert review.reviews == 3


def test_without_remote_calls_only_remembered_tokens_are_decided() -> None:
    identities = parse_identities(FILE)
    member = KubeIdentity("m", ("system:serviceaccounts:team",))
    review = ScriptedReview({"new": member}, cached={"seen": member})
    policy = AccessPolicy(lambda: identities, token_review=review)
    assert policy.authorize(GET, Caller(token="seen"), remote=False) == Principal("m", Role.READER)
    with pytest.raises(ReviewNeeded):
        policy.authorize(GET, Caller(token="new"), remote=False)
    assert review.reviews == 0
    assert policy.authorize(GET, Caller(token="static-token"), remote=False) is not None


def test_without_a_review_an_unknown_token_is_refused_as_before() -> None:
    identities = parse_identities(FILE)
    with pytest.raises(errors.Unauthenticated):
        AccessPolicy(lambda: identities).authorize(GET, Caller(token="sa-token"))


class FailingReview(ScriptedReview):
    def review(self, token: str) -> KubeIdentity | None:
        self.reviews += 1
        raise errors.Unavailable(reason="TOKEN_REVIEW_UNAVAILABLE", message="down")


def test_an_api_failure_is_unavailable_not_a_refusal() -> None:
    identities = parse_identities(FILE)
    policy = AccessPolicy(lambda: identities, token_review=FailingReview({}))
    with pytest.raises(errors.Unavailable):
        policy.authorize(GET, Caller(token="sa-token"))
