"""A token-auth docker-registry that serves some repositories to anyone, as Docker Hub does.

Docker Hub, GHCR and Harbor answer every request with a Bearer challenge, and their token
services hand anonymous clients a token granting pull on public repositories only. The
registry's anonymous-access check (a HEAD of the manifest with an anonymous token) must tell such
a public repository from a private one behind the same challenge, so this is that registry: the
real ``docker-registry`` trusting `tests.support.token_auth`'s token server, whose anonymous user
here, like every signed-in user, may pull ``public/*``. Users as in `token_auth`: ``reader`` pulls
``private/*``, ``admin`` everything.

``running_public_token_registry(directory, signing_key)`` yields a ``PublicTokenRegistry`` with
``.public`` (``public/base:1.0``) and ``.private`` (``private/app:1.0``), pushed as ``admin``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.cache_registry.provider import RegistryCredential
from snapcache.demo.oci_images import ImageSpec, LayerSpec
from snapcache.demo.registry_server import REGISTRY_BINARY, RegistryServer, TokenAuth
from tests.support.oci_fixtures import OciRegistry, PushedRef
from tests.support.token_auth import (
    ADMIN,
    ADMIN_PASSWORD,
    ISSUER,
    READER,
    READER_PASSWORD,
    SERVICE,
    USERS,
    AccessRule,
    RegistryTokenAuth,
    SigningKey,
    TokenServer,
    TokenUser,
    push_spec,
)

PUBLIC_PULL = AccessRule("public/*", frozenset({"pull"}))


class PublicPullTokenServer(TokenServer):
    """The test token server where everyone, anonymous or signed in, may pull ``public/*``."""

    def _authenticate(self, header: str) -> tuple[str, TokenUser | None]:
        if not header:
            return "", TokenUser(password="", rules=(PUBLIC_PULL,))
        name, user = super()._authenticate(header)
        if user is None:
            return name, None
        return name, TokenUser(password=user.password, rules=(*user.rules, PUBLIC_PULL))


@dataclass(frozen=True)
class PublicTokenRegistry:
    """The registry, its token server and one public and one private image."""

    registry: OciRegistry  # its credential is reader's
    tokens: TokenServer
    public: PushedRef
    private: PushedRef

    @property
    def host(self) -> str:
        return self.registry.host

    @property
    def credential(self) -> RegistryCredential:
        assert self.registry.credential is not None
        return self.registry.credential


@contextmanager
def running_public_token_registry(directory: Path, signing_key: SigningKey) -> Iterator[PublicTokenRegistry]:
    """Start the token server and the registry, push the two images; stop both afterwards."""
    if shutil.which(REGISTRY_BINARY) is None:
        pytest.fail(f"{REGISTRY_BINARY} is not installed (apt-get install docker-registry)")
    directory.mkdir(parents=True, exist_ok=True)
    bundle = directory / "token-root.pem"
    bundle.write_bytes(signing_key.certificate_pem())
    with PublicPullTokenServer(users=USERS, signing_key=signing_key) as tokens:
        server = RegistryServer(
            directory / "registry",
            token_auth=TokenAuth(realm=tokens.realm, service=SERVICE, issuer=ISSUER, rootcertbundle=bundle),
        )
        server.start()
        try:
            registry = OciRegistry(server, RegistryCredential(READER, READER_PASSWORD))
            auth = RegistryTokenAuth(ADMIN, ADMIN_PASSWORD)
            public = push_spec(
                registry, ImageSpec("public/base", "1.0", [LayerSpec(24 * 1024, seed=501)]), auth
            )
            private = push_spec(
                registry, ImageSpec("private/app", "1.0", [LayerSpec(24 * 1024, seed=502)]), auth
            )
            yield PublicTokenRegistry(registry=registry, tokens=tokens, public=public, private=private)
        finally:
            server.close()
