"""Reading credentials out of a dockerconfigjson Secret's type and data: edge cases, secret-free errors.

The docker config inside is parsed by `credentials.parse_docker_config` (tested on its own); these
tests cover what the Secret adds around it, and the resolver's routing of references.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping

import pytest

from services.cache_registry.credential_refs import CredentialRefResolver, resolve_local_credentials
from services.cache_registry.kube_secrets import (
    credentials_from_secret,
    failure_for_api_status,
    split_secret_ref,
)
from services.cache_registry.model import CredentialRef
from services.cache_registry.provider import BuildFailure, RegistryCredential

PASSWORD = "pa55-in-a-Secret"
TYPE = "kubernetes.io/dockerconfigjson"


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _dockerconfigjson(auths: object) -> str:
    return _b64(json.dumps({"auths": auths}))


def test_reads_every_auths_entry() -> None:
    data = {
        ".dockerconfigjson": _dockerconfigjson(
            {
                "https://index.docker.io/v1/": {"auth": _b64(f"alice:{PASSWORD}")},
                "registry.example.com:5000": {"username": "bob", "password": PASSWORD},
            }
        )
    }
    assert credentials_from_secret(secret="ns/pull", secret_type=TYPE, data=data) == {
        "docker.io": RegistryCredential("alice", PASSWORD),
        "registry.example.com:5000": RegistryCredential("bob", PASSWORD),
    }


def test_value_as_bytes_is_accepted() -> None:
    data: Mapping[str, str | bytes] = {
        ".dockerconfigjson": _dockerconfigjson({"r.io": {"auth": _b64("u:p")}}).encode()
    }
    assert credentials_from_secret(secret="ns/pull", secret_type=TYPE, data=data) == {
        "r.io": RegistryCredential("u", "p")
    }


def test_empty_auths_gives_no_credentials() -> None:
    data = {".dockerconfigjson": _b64("{}")}
    assert credentials_from_secret(secret="ns/pull", secret_type=TYPE, data=data) == {}


@pytest.mark.parametrize(
    ("secret_type", "data", "expected"),
    [
        ("Opaque", {".dockerconfigjson": _dockerconfigjson({})}, "has type Opaque"),
        (None, {".dockerconfigjson": _dockerconfigjson({})}, "has type (none)"),
        ("kubernetes.io/dockercfg", {".dockercfg": _b64("{}")}, "has type kubernetes.io/dockercfg"),
        (TYPE, None, "has no .dockerconfigjson key"),
        (TYPE, {}, "has no .dockerconfigjson key"),
        (TYPE, {".dockerconfigjson": ""}, "has no .dockerconfigjson key"),
        (TYPE, {".dockerconfigjson": f"not base64 {PASSWORD}!"}, "is not valid base64"),
        (
            TYPE,
            {".dockerconfigjson": _b64(f'{{"auths": {{"r.io": {{"password": "{PASSWORD}"')},
            "is not valid JSON",
        ),
        (TYPE, {".dockerconfigjson": _b64(f'["{PASSWORD}"]')}, "must be a JSON object"),
        (TYPE, {".dockerconfigjson": _b64(b"\xff\xfe" + PASSWORD.encode())}, "is not UTF-8"),
        (
            TYPE,
            {".dockerconfigjson": _dockerconfigjson({"r.io": PASSWORD})},
            "auths['r.io'] must be an object",
        ),
        (
            TYPE,
            {".dockerconfigjson": _dockerconfigjson({"r.io": {"auth": _b64(PASSWORD)}})},
            'does not decode to "username:password"',
        ),
    ],
)
def test_unusable_secrets_fail_permanently_without_quoting_them(
    secret_type: str | None, data: Mapping[str, str | bytes] | None, expected: str
) -> None:
    with pytest.raises(BuildFailure) as caught:
        credentials_from_secret(secret="team-a/pull", secret_type=secret_type, data=data)
    failure = caught.value
    assert failure.reason == "CREDENTIALS_INVALID" and not failure.retryable
    assert "team-a/pull" in failure.message and expected in failure.message
    assert PASSWORD not in failure.message
    assert failure.__cause__ is None and failure.__context__ is None  # no chained exception holds the bytes


@pytest.mark.parametrize("ref", ["ns/name", "kube-system/regcred"])
def test_split_secret_ref(ref: str) -> None:
    assert "/".join(split_secret_ref(ref)) == ref


@pytest.mark.parametrize("ref", ["name", "/name", "ns/", "a/b/c"])
def test_split_secret_ref_refuses_malformed(ref: str) -> None:
    with pytest.raises(BuildFailure) as caught:
        split_secret_ref(ref)
    assert caught.value.reason == "CREDENTIALS_INVALID"


FORBIDDEN_BODY = json.dumps(
    {
        "kind": "Status",
        "status": "Failure",
        "reason": "Forbidden",
        "code": 403,
        "message": 'secrets "pull" is forbidden: User "registry" cannot get resource "secrets" in API group "" '
        'in the namespace "team-a"',
    }
)


@pytest.mark.parametrize(
    ("status", "body", "reason", "retryable", "says"),
    [
        (404, None, "CREDENTIALS_NOT_FOUND", False, "Secret team-a/pull not found"),
        (
            403,
            FORBIDDEN_BODY,
            "CREDENTIALS_FORBIDDEN",
            False,
            'User "registry" cannot get resource "secrets"',
        ),
        (403, "not json", "CREDENTIALS_FORBIDDEN", False, '"get" on "secrets" in namespace team-a'),
        (401, None, "CREDENTIALS_UNAVAILABLE", False, "rejected the registry's own credentials"),
        (0, None, "KUBERNETES_API_UNAVAILABLE", True, "(no response"),
        (429, None, "KUBERNETES_API_UNAVAILABLE", True, "HTTP 429"),
        (500, None, "KUBERNETES_API_UNAVAILABLE", True, "HTTP 500"),
        (503, None, "KUBERNETES_API_UNAVAILABLE", True, "HTTP 503"),
        (504, None, "KUBERNETES_API_UNAVAILABLE", True, "HTTP 504"),
        (400, None, "CREDENTIALS_UNAVAILABLE", False, "HTTP 400"),
    ],
)
def test_api_errors_map_to_reasons_and_retry_meaning(
    status: int, body: str | None, reason: str, retryable: bool, says: str
) -> None:
    failure = failure_for_api_status(secret="team-a/pull", status=status, reason="Why", body=body)
    assert (failure.reason, failure.retryable) == (reason, retryable)
    assert says in failure.message and "team-a/pull" in failure.message


class RecordingSecrets:
    """A SecretSource answering from a dict (the real reader is tested against a real apiserver)."""

    def __init__(self, secrets: Mapping[str, Mapping[str, RegistryCredential]]) -> None:
        self.secrets = secrets
        self.read: list[str] = []

    def registry_credentials(self, secret: str) -> Mapping[str, RegistryCredential]:
        self.read.append(secret)
        return self.secrets[secret]


def test_resolver_merges_references_in_order() -> None:
    source = RecordingSecrets(
        {
            "a/one": {"r.io": RegistryCredential("one", "1"), "s.io": RegistryCredential("s", "s")},
            "a/two": {"r.io": RegistryCredential("two", "2")},
        }
    )
    resolved = CredentialRefResolver(source)([CredentialRef(secret="a/one"), CredentialRef(secret="a/two")])
    assert resolved == {"r.io": RegistryCredential("two", "2"), "s.io": RegistryCredential("s", "s")}
    assert source.read == ["a/one", "a/two"]


def test_without_kubernetes_access_secret_refs_say_how_to_configure_it() -> None:
    with pytest.raises(BuildFailure) as caught:
        resolve_local_credentials([CredentialRef(secret="team-a/pull")])
    failure = caught.value
    assert failure.reason == "CREDENTIALS_UNAVAILABLE" and not failure.retryable
    assert "team-a/pull" in failure.message
    assert "SNAPCACHE_KUBECONFIG" in failure.message and "SNAPCACHE_KUBE_IN_CLUSTER" in failure.message
