"""`snapcache.tls` without a server: what start-up refuses, and the reload bookkeeping."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

from snapcache.tls import (
    BearerToken,
    CertificateFiles,
    ClientSecurity,
    ServerTls,
    SSLContextFiles,
    TokenFile,
)
from tests.support.certificates import Issued, Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def server(pki: Pki) -> Issued:
    return pki.server()


def bump(*paths: Path) -> None:
    for path in paths:
        os.utime(path, ns=(1, time.time_ns() + 10**9))


def test_server_tls_refuses_a_key_of_another_certificate(pki: Pki, server: Issued) -> None:
    other = pki.server("other")
    with pytest.raises(ValueError, match="do not load as a pair"):
        ServerTls(cert=server.cert, key=other.key).validate()


def test_server_tls_refuses_missing_files_and_a_bad_ca(server: Issued, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a file"):
        ServerTls(cert=tmp_path / "missing.pem", key=server.key).validate()
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="does not load"):
        ServerTls(cert=server.cert, key=server.key, client_ca=bad_ca).validate()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cert": "client.pem"}, "needs both its certificate and its key"),
        ({"key": "client.key"}, "needs both its certificate and its key"),
        ({"token": "t", "token_file": "token"}, "not both"),
        ({"server_name": "registry"}, "needs TLS"),
        ({"token_file": "empty-token"}, "is empty"),
        ({"token_file": "missing-token"}, "cannot read token file"),
    ],
)
def test_client_security_refuses(fields: dict[str, str], message: str, tmp_path: Path) -> None:
    (tmp_path / "empty-token").write_text("\n")
    (tmp_path / "token").write_text("t\n")
    values: dict[str, object] = {
        k: (v if k in ("token", "server_name") else tmp_path / v) for k, v in fields.items()
    }
    with pytest.raises(ValueError, match=message):
        ClientSecurity(**values).validate()  # type: ignore[arg-type]


def test_plaintext_is_the_default_and_tls_follows_a_ca(pki: Pki) -> None:
    assert not ClientSecurity().tls
    assert ClientSecurity(ca=pki.ca).tls
    assert ClientSecurity().token_source() is None
    source = ClientSecurity(token="abc").token_source()
    assert source is not None and source() == "abc"


def test_certificate_files_answer_none_until_a_complete_change(pki: Pki, server: Issued) -> None:
    files = CertificateFiles(ServerTls(cert=server.cert, key=server.key))
    assert files() is None
    staged = pki.server("staged")
    server.key.write_bytes(staged.key.read_bytes())
    bump(server.key)
    assert files() is None  # key without its certificate: keep the pair in force
    server.cert.write_bytes(staged.cert.read_bytes())
    bump(server.cert)
    assert isinstance(files(), grpc.ServerCertificateConfiguration)
    assert files() is None  # once per change


def test_ssl_context_files_give_a_new_context_after_a_rotation(pki: Pki, server: Issued) -> None:
    files = SSLContextFiles(ServerTls(cert=server.cert, key=server.key))
    first = files.context()
    assert files.context() is first
    pki.server(cert_path=server.cert, key_path=server.key)
    bump(server.cert, server.key)
    assert files.context() is not first


def test_token_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one\n")
    token = TokenFile(path)
    assert token() == "one"
    path.write_text("two\n")
    bump(path)
    assert token() == "two"
    path.write_text("")
    bump(path)
    assert token() == "two"  # an empty rewrite keeps the last token


def test_the_bearer_interceptor_adds_the_header_to_the_call_metadata() -> None:
    interceptor = BearerToken(lambda: "abc")
    seen: list[object] = []

    class Details:
        method = "/x/y"
        timeout = None
        metadata = (("x-request-id", "1"),)
        credentials = None
        wait_for_ready = None
        compression = None

    interceptor.intercept_unary_unary(
        lambda details, _request: seen.append(details.metadata), Details(), None
    )
    interceptor.intercept_unary_stream(
        lambda details, _request: seen.append(details.metadata), Details(), None
    )
    assert seen == [[("x-request-id", "1"), ("authorization", "Bearer abc")]] * 2
