"""Docker config.json parsing: keys, entry forms, precedence and secret-free errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.cache_registry.credentials import (
    DockerConfigError,
    load_docker_config,
    parse_docker_config,
    registry_host,
)
from services.cache_registry.provider import RegistryCredential

SECRET = "hunter2-very-secret"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _config(auths: object, **extra: object) -> bytes:
    return json.dumps({"auths": auths, **extra}).encode()


@pytest.mark.parametrize(
    ("key", "host"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("docker.io", "docker.io"),
        ("https://registry.example.com", "registry.example.com"),
        ("http://registry.example.com:5000/v2/", "registry.example.com:5000"),
        ("Registry.Example.com:5000", "registry.example.com:5000"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("HTTPS://ghcr.io/", "ghcr.io"),
        ("localhost", "localhost"),
    ],
)
def test_registry_host_normalizes_keys(key: str, host: str) -> None:
    assert registry_host(key) == host


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"auth": _b64("alice:pw")}, RegistryCredential("alice", "pw")),
        ({"auth": _b64("alice:p:w:")}, RegistryCredential("alice", "p:w:")),  # split at the first colon
        ({"username": "bob", "password": "pw2"}, RegistryCredential("bob", "pw2")),
        ({"auth": _b64("alice:pw"), "username": "bob", "password": "x"}, RegistryCredential("alice", "pw")),
        ({"identitytoken": "tok"}, RegistryCredential("", "", "tok")),
        (
            {"auth": _b64("<token>:"), "identitytoken": "refresh"},
            RegistryCredential("<token>", "", "refresh"),
        ),
    ],
)
def test_entry_forms(entry: dict[str, str], expected: RegistryCredential) -> None:
    assert parse_docker_config(_config({"registry.example.com": entry})) == {"registry.example.com": expected}


def test_full_config_with_helpers_ignored() -> None:
    data = _config(
        {
            "https://index.docker.io/v1/": {"auth": _b64("hubuser:hubpw")},
            "https://ghcr.io": {"username": "gh", "password": "ghpw"},
            "quay.io": {},  # placeholder left by a credsStore login: no secret here
            "gcr.io": {"auth": ""},
        },
        credsStore="desktop",
        credHelpers={"123.dkr.ecr.us-east-1.amazonaws.com": "ecr-login"},
    )
    assert parse_docker_config(data) == {
        "docker.io": RegistryCredential("hubuser", "hubpw"),
        "ghcr.io": RegistryCredential("gh", "ghpw"),
    }


def test_bare_host_key_wins_over_url_form_of_same_host() -> None:
    data = _config(
        {
            "https://registry.example.com/v2/": {"auth": _b64("url:form")},
            "registry.example.com": {"auth": _b64("bare:key")},
            "http://registry.example.com": {"auth": _b64("later:url")},
        }
    )
    assert parse_docker_config(data) == {"registry.example.com": RegistryCredential("bare", "key")}


def test_first_url_form_wins_without_bare_key() -> None:
    data = _config(
        {"https://index.docker.io/v1/": {"auth": _b64("a:1")}, "https://docker.io": {"auth": _b64("b:2")}}
    )
    assert parse_docker_config(data)["docker.io"] == RegistryCredential("a", "1")


def test_empty_and_missing_auths() -> None:
    assert parse_docker_config(b"{}") == {}
    assert parse_docker_config(b'{"auths": null}') == {}
    assert parse_docker_config(b'\xef\xbb\xbf{"auths": {}}') == {}  # BOM, as some editors write it


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b'{"auths": {"r.io": {"auth": "' + SECRET.encode() + b'"', "not valid JSON"),
        (b"\xff\xfe" + SECRET.encode(), "not UTF-8"),
        (json.dumps([SECRET]).encode(), "must be a JSON object"),
        (json.dumps({"auths": [SECRET]}).encode(), '"auths" must be an object'),
        (_config({"r.io": SECRET}), "auths['r.io'] must be an object"),
        (_config({"r.io": {"auth": SECRET + "!"}}), "auths['r.io'].auth is not base64"),
        (_config({"r.io": {"auth": _b64(SECRET)}}), 'does not decode to "username:password"'),
        (_config({"r.io": {"password": 42}}), "auths['r.io'].password must be a string"),
    ],
)
def test_errors_name_the_problem_not_the_secret(data: bytes, fragment: str) -> None:
    with pytest.raises(DockerConfigError) as caught:
        parse_docker_config(data)
    message = str(caught.value)
    assert fragment in message
    assert SECRET not in message
    assert SECRET not in repr(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None  # no chained exception carrying the document
    assert isinstance(caught.value, ValueError)


def test_credential_repr_hides_password() -> None:
    credentials = parse_docker_config(_config({"r.io": {"auth": _b64("u:" + SECRET)}}))
    assert SECRET not in repr(credentials)


def test_load_docker_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(_config({"https://r.example.com": {"auth": _b64("u:p")}}))
    assert load_docker_config(path) == {"r.example.com": RegistryCredential("u", "p")}
    assert load_docker_config(str(path)) == {"r.example.com": RegistryCredential("u", "p")}


@given(
    username=st.text(min_size=1).filter(lambda s: ":" not in s),
    password=st.text(),
)
def test_auth_round_trip(username: str, password: str) -> None:
    data = _config({"r.io": {"auth": _b64(f"{username}:{password}")}})
    assert parse_docker_config(data) == {"r.io": RegistryCredential(username, password)}
