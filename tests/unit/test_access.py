"""The access table and decision (`snapcache.access`), table-driven; the bearer-header reading too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf import descriptor

from snapcache import errors
from snapcache.access import (
    METHOD_ROLES,
    AccessPolicy,
    Caller,
    Identities,
    IdentityFile,
    Principal,
    Role,
    exempt_services,
    parse_identities,
    token_digest,
)
from snapcache.rpc_auth import bearer_token, certificate_names
from snapcache.v1 import cache_registry_pb2, matcher_pb2

API_FILES = (cache_registry_pb2.DESCRIPTOR, matcher_pb2.DESCRIPTOR)
REGISTRY = "/snapcache.v1.CacheRegistryService/"
MATCHER = "/snapcache.v1.MatcherService/"

IDENTITIES = parse_identities(
    """
    # token,user,role
    read-token,rita,reader
    write-token, walter , WRITER
    cert:matcher.snapcache,matcher,writer
    cert:viewer,vera,reader
    """
)


def every_method() -> list[str]:
    """Every RPC of every service of the generated API, as full method names."""
    found = []
    for file in API_FILES:
        for service in file.services_by_name.values():
            found.extend(f"/{service.full_name}/{m.name}" for m in service.methods)
    return found


def test_every_rpc_of_every_service_has_a_role() -> None:
    methods = every_method()
    assert len(methods) >= 13
    assert sorted(set(methods) - set(METHOD_ROLES)) == []
    ours = {m for m in METHOD_ROLES if m.startswith("/snapcache.")}
    assert sorted(ours - set(methods)) == [], "rows for RPCs that no longer exist"


def test_health_and_reflection_have_rows_for_when_they_are_not_exempt() -> None:
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    for file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            for method in service.methods:
                assert METHOD_ROLES[f"/{service.full_name}/{method.name}"] is Role.READER


@pytest.mark.parametrize(
    ("method", "role"),
    [
        (REGISTRY + "GetImageCache", Role.READER),
        (REGISTRY + "ListImageCaches", Role.READER),
        (REGISTRY + "WatchImageCaches", Role.READER),
        (REGISTRY + "ListImageCacheEvents", Role.READER),
        (REGISTRY + "ListDisks", Role.READER),
        (REGISTRY + "CreateImageCache", Role.WRITER),
        (REGISTRY + "UpdateImageCache", Role.WRITER),
        (REGISTRY + "DeleteImageCache", Role.WRITER),
        (REGISTRY + "ProvisionDisk", Role.WRITER),
        (REGISTRY + "ReleaseDisk", Role.WRITER),
        (REGISTRY + "ReportMatches", Role.WRITER),
        (MATCHER + "MatchImageCaches", Role.READER),
        (MATCHER + "GetIndexStatus", Role.READER),
    ],
)
def test_method_roles(method: str, role: Role) -> None:
    assert METHOD_ROLES[method] is role


def test_a_method_that_changes_state_needs_a_writer() -> None:
    # by name, so an RPC added later with a mutating verb cannot be filed as a read by mistake
    mutating = ("Create", "Update", "Delete", "Provision", "Release", "Report")
    for method in every_method():
        name = method.rpartition("/")[2]  # Create..., Update..., not the reads
        expected = Role.WRITER if name.startswith(mutating) else Role.READER
        assert METHOD_ROLES[method] is expected, method


POLICY = AccessPolicy(lambda: IDENTITIES)


@pytest.mark.parametrize(
    ("method", "caller", "outcome"),
    [
        # (method, caller, user allowed or (error class, reason))
        (REGISTRY + "GetImageCache", Caller(token="read-token"), "rita"),
        (REGISTRY + "GetImageCache", Caller(token="write-token"), "walter"),
        (REGISTRY + "CreateImageCache", Caller(token="write-token"), "walter"),
        (
            REGISTRY + "CreateImageCache",
            Caller(token="read-token"),
            (errors.PermissionDenied, "ROLE_INSUFFICIENT"),
        ),
        (
            REGISTRY + "ReportMatches",
            Caller(token="read-token"),
            (errors.PermissionDenied, "ROLE_INSUFFICIENT"),
        ),
        (MATCHER + "MatchImageCaches", Caller(token="read-token"), "rita"),
        (REGISTRY + "GetImageCache", Caller(), (errors.Unauthenticated, "AUTHENTICATION_REQUIRED")),
        (REGISTRY + "GetImageCache", Caller(token="nope"), (errors.Unauthenticated, "TOKEN_INVALID")),
        (REGISTRY + "GetImageCache", Caller(token=""), (errors.Unauthenticated, "TOKEN_INVALID")),
        # a token, when sent, decides even if a certificate would have been enough
        (
            REGISTRY + "GetImageCache",
            Caller(token="nope", certificate_names=("viewer",)),
            (errors.Unauthenticated, "TOKEN_INVALID"),
        ),
        (REGISTRY + "DeleteImageCache", Caller(certificate_names=("matcher.snapcache",)), "matcher"),
        (REGISTRY + "GetImageCache", Caller(certificate_names=("CN", "viewer")), "vera"),
        (
            REGISTRY + "DeleteImageCache",
            Caller(certificate_names=("viewer",)),
            (errors.PermissionDenied, "ROLE_INSUFFICIENT"),
        ),
        (
            REGISTRY + "GetImageCache",
            Caller(certificate_names=("stranger",)),
            (errors.Unauthenticated, "CERTIFICATE_UNKNOWN"),
        ),
        (
            "/snapcache.v1.Other/Thing",
            Caller(token="write-token"),
            (errors.PermissionDenied, "METHOD_NOT_ALLOWED"),
        ),
        ("/snapcache.v1.Other/Thing", Caller(), (errors.Unauthenticated, "AUTHENTICATION_REQUIRED")),
    ],
)
def test_authorize(
    method: str, caller: Caller, outcome: str | tuple[type[errors.SnapcacheError], str]
) -> None:
    if isinstance(outcome, str):
        principal = POLICY.authorize(method, caller)
        assert principal is not None and principal.user == outcome
        return
    error_class, reason = outcome
    with pytest.raises(error_class) as raised:
        POLICY.authorize(method, caller)
    assert raised.value.reason == reason
    assert "nope" not in raised.value.message and "token" not in str(raised.value.metadata)


def test_refusal_metadata_names_the_roles() -> None:
    with pytest.raises(errors.PermissionDenied) as raised:
        POLICY.authorize(REGISTRY + "ProvisionDisk", Caller(token="read-token"))
    assert dict(raised.value.metadata) == {
        "method": REGISTRY + "ProvisionDisk",
        "required_role": "writer",
        "role": "reader",
    }


@pytest.mark.parametrize(
    ("exempt", "method", "open_"),
    [
        (("health", "reflection"), "/grpc.health.v1.Health/Check", True),
        (("health", "reflection"), "/grpc.health.v1.Health/Watch", True),
        (("health", "reflection"), "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True),
        (("health",), "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False),
        ((), "/grpc.health.v1.Health/Check", False),
        (("health", "reflection"), REGISTRY + "GetImageCache", False),
    ],
)
def test_exempt_services(exempt: tuple[str, ...], method: str, open_: bool) -> None:
    policy = AccessPolicy(lambda: IDENTITIES, exempt=exempt_services(exempt))
    if open_:
        assert policy.authorize(method, Caller()) is None
    else:
        with pytest.raises(errors.Unauthenticated):
            policy.authorize(method, Caller())


def test_unknown_exempt_service_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown service"):
        exempt_services(("metrics",))


def test_certificate_role_gives_any_verified_certificate_a_role() -> None:
    policy = AccessPolicy(Identities, certificate_role=Role.READER)
    principal = policy.authorize(REGISTRY + "ListDisks", Caller(certificate_names=("node-7",)))
    assert principal == Principal("node-7", Role.READER)
    with pytest.raises(errors.PermissionDenied):
        policy.authorize(REGISTRY + "ReleaseDisk", Caller(certificate_names=("node-7",)))


def test_tokens_are_kept_as_digests_only() -> None:
    assert "read-token" not in repr(IDENTITIES)
    assert IDENTITIES.tokens[token_digest("read-token")] == Principal("rita", Role.READER)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("secret-1,alice\n", "line 1: expected TOKEN,USER,ROLE"),
        ("secret-1,alice,admin\n", "line 1: unknown role 'admin'"),
        ("# c\nsecret-1,alice,reader\nsecret-1,bob,writer\n", "line 3: token repeated"),
        ("secret-1,,reader\n", "line 1: expected"),
        ("cert:,x,reader\n", "line 1: certificate name"),
        ("secret-1,a,reader,extra\n", "line 1: expected"),
    ],
)
def test_bad_identity_files(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        parse_identities(text)
    assert "secret-1" not in str(raised.value)


def test_identity_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "tokens.csv"
    path.write_text("t1,alice,reader\n")
    identities = IdentityFile(path)
    assert identities().tokens[token_digest("t1")].role is Role.READER
    path.write_text("t1,alice,writer\nt2,bob,reader\n")
    os.utime(path, ns=(1, 10**18))  # a different mtime even on coarse clocks
    assert identities().tokens[token_digest("t1")].role is Role.WRITER
    path.write_text("t1,alice,superuser\n")  # a bad edit: the previous identities stay
    os.utime(path, ns=(1, 2 * 10**18))
    assert token_digest("t2") in identities().tokens


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((), None),
        ((("x-other", "1"),), None),
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer  abc "),), "abc"),
        ((("authorization", "Basic YWJj"),), ""),
        ((("authorization", b"Bearer abc"),), "abc"),
    ],
)
def test_bearer_token(metadata: tuple[tuple[str, str | bytes], ...], token: str | None) -> None:
    assert bearer_token(metadata) == token


def test_certificate_names_common_name_first_without_repeats() -> None:
    context = {
        "x509_common_name": [b"matcher"],
        "x509_subject_alternative_name": [b"matcher", b"matcher.snapcache.svc"],
        "transport_security_type": [b"ssl"],
    }
    assert certificate_names(context) == ("matcher", "matcher.snapcache.svc")
    assert certificate_names({}) == ()


def test_descriptors_are_what_the_table_is_checked_against() -> None:
    # a sanity check that the walk above sees services at all
    services: list[descriptor.ServiceDescriptor] = [s for f in API_FILES for s in f.services_by_name.values()]
    assert {s.full_name for s in services} == {
        "snapcache.v1.CacheRegistryService",
        "snapcache.v1.MatcherService",
    }
