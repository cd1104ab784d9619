"""Pytest fixtures for real OCI registries with known images (a plugin listed in tests/conftest.py).

Fixtures (session-scoped unless noted; tests that use them should be marked ``@pytest.mark.e2e``):

``oci_registry`` -> ``OciRegistry``
    A public (no auth) ``docker-registry`` on 127.0.0.1, plain HTTP. ``.host``, ``.url``,
    ``.server`` (the ``RegistryServer``: ``log_path``, ``read_log()``, ``storage_dir``),
    ``.reference(repo, tag=..., digest=...)`` -> ``ImageReference`` and ``.pull_options(...)``
    -> ``PullOptions`` with the host listed as plain HTTP (and the credential, if any).
``private_oci_registry`` -> ``OciRegistry``
    The same with basic auth: user ``snap``, password ``PRIVATE_PASSWORD``; ``.credential`` is
    the ``RegistryCredential`` and ``.pull_options()`` includes it.
``pushed_images`` -> ``PushedImages``
    The demo images pushed to ``oci_registry``, plus one private image:
    ``.web`` (``demo/web:1.0``, 3 layers, single amd64 manifest), ``.worker`` (``demo/worker:1.0``,
    2 layers, shares its base layer with web), ``.base`` (``demo/base:1.0``, an OCI index of
    linux/amd64 and linux/arm64/v8), ``.private`` (``private/app:1.0`` in
    ``private_oci_registry``, 2 layers). Each is a ``PushedRef``: ``.reference``, ``.digest``
    (what the tag points at: manifest or index), ``.manifest_digest(platform)``, ``.built``.
``fresh_oci_registry`` (function-scoped) -> ``OciRegistry``
    A registry of its own for tests that stop, kill or corrupt it. Empty: push what you need.

Do not stop or modify the session registries: other tests share them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.cache_registry.provider import Platform, PullOptions, RegistryCredential
from snapcache.demo.oci_images import (
    BuiltImage,
    ImageSpec,
    LayerSpec,
    PushedImage,
    build_image,
    push_demo_images,
    push_image,
)
from snapcache.demo.registry_server import REGISTRY_BINARY, RegistryServer
from snapcache.images import ImageReference

PRIVATE_USER = "snap"
PRIVATE_PASSWORD = "s3cret-Pa55word"  # test-only; tests check it never shows in messages


@dataclass(frozen=True)
class OciRegistry:
    """A running test registry and how to reach it."""

    server: RegistryServer
    credential: RegistryCredential | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry part of image references."""
        return self.server.host

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return self.server.url

    @property
    def auth(self) -> tuple[str, str] | None:
        """``(user, password)`` for pushing, or None for the public registry."""
        if self.credential is None:
            return None
        return (self.credential.username, self.credential.password)

    def reference(self, repository: str, *, tag: str = "", digest: str = "") -> ImageReference:
        """An ``ImageReference`` to an image in this registry."""
        return ImageReference(
            registry=self.host, repository=repository, tag=tag if tag or digest else "latest", digest=digest
        )

    def pull_options(
        self, *, platform: Platform | None = None, credential: RegistryCredential | None = None
    ) -> PullOptions:
        """``PullOptions`` for this registry: plain HTTP, its credential (or the one given)."""
        chosen = credential if credential is not None else self.credential
        return PullOptions(
            platform=platform or Platform(),
            credentials={self.host: chosen} if chosen is not None else {},
            plain_http_registries=frozenset({self.host}),
        )


@dataclass(frozen=True)
class PushedRef:
    """One pushed tag: its reference, what the tag points at, and the images built for it."""

    reference: ImageReference
    digest: str  # the tag's target: a manifest, or an index for multi-arch images
    built: tuple[BuiltImage, ...]
    is_index: bool = False

    def manifest_digest(self, platform: Platform | None = None) -> str:
        """The platform manifest's digest (default linux/amd64)."""
        wanted = platform or Platform()
        for image in self.built:
            os_name, arch, *rest = image.platform
            if (os_name, arch) == (wanted.os, wanted.architecture) and (
                not wanted.variant or (rest and rest[0] == wanted.variant)
            ):
                return image.manifest_digest
        raise KeyError(f"no {wanted} image in {self.reference}")

    @property
    def image(self) -> BuiltImage:
        """The only (or first) platform image."""
        return self.built[0]


@dataclass(frozen=True)
class PushedImages:
    """The images every OCI test can rely on (see the module docstring)."""

    registry: OciRegistry
    private_registry: OciRegistry
    web: PushedRef
    worker: PushedRef
    base: PushedRef
    private: PushedRef
    all_public: tuple[PushedRef, ...] = field(default=())


def _start(directory: Path, *, users: dict[str, str] | None = None) -> RegistryServer:
    if shutil.which(REGISTRY_BINARY) is None:
        pytest.fail(f"{REGISTRY_BINARY} is not installed (apt-get install docker-registry)")
    server = RegistryServer(directory, users=users)
    server.start()
    return server


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OciRegistry]:
    """A public registry shared by the whole session."""
    server = _start(tmp_path_factory.mktemp("oci-registry"))
    try:
        yield OciRegistry(server)
    finally:
        server.close()


@pytest.fixture(scope="session")
def private_oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OciRegistry]:
    """A registry with basic auth (``snap`` / ``PRIVATE_PASSWORD``) shared by the whole session."""
    server = _start(tmp_path_factory.mktemp("oci-registry-private"), users={PRIVATE_USER: PRIVATE_PASSWORD})
    try:
        yield OciRegistry(server, RegistryCredential(username=PRIVATE_USER, password=PRIVATE_PASSWORD))
    finally:
        server.close()


@pytest.fixture
def fresh_oci_registry(tmp_path: Path) -> Iterator[OciRegistry]:
    """A registry for one test, free to stop, kill or corrupt."""
    server = _start(tmp_path / "oci-registry")
    try:
        yield OciRegistry(server)
    finally:
        server.close()


def _pushed_ref(registry: OciRegistry, pushed: PushedImage) -> PushedRef:
    return PushedRef(
        reference=registry.reference(pushed.repository, tag=pushed.tag),
        digest=pushed.digest,
        built=pushed.images,
        is_index=pushed.is_index,
    )


@pytest.fixture(scope="session")
def pushed_images(oci_registry: OciRegistry, private_oci_registry: OciRegistry) -> PushedImages:
    """The demo images in ``oci_registry`` and ``private/app:1.0`` in ``private_oci_registry``."""
    public = {p.repository: _pushed_ref(oci_registry, p) for p in push_demo_images(oci_registry.url)}
    private_image = build_image(
        ImageSpec("private/app", "1.0", [LayerSpec(96 * 1024, seed=301), LayerSpec(64 * 1024, seed=302)])
    )
    digest = push_image(private_oci_registry.url, private_image, auth=private_oci_registry.auth)
    private = PushedRef(
        reference=private_oci_registry.reference("private/app", tag="1.0"),
        digest=digest,
        built=(private_image,),
    )
    return PushedImages(
        registry=oci_registry,
        private_registry=private_oci_registry,
        web=public["demo/web"],
        worker=public["demo/worker"],
        base=public["demo/base"],
        private=private,
        all_public=tuple(public.values()),
    )
