"""The pass-through edge: what no disk holds comes from the image's real registry, streamed.

Auth, the way the registry's distribution client does it (and with the same challenge parser,
``snapcache.registry_auth``): a request goes out plain; on 401 a ``Bearer`` challenge buys an
anonymous token from its realm for the repository's pull scope, cached per (registry, scope)
until it expires, and the challenge is remembered per registry so later requests send a token up
front instead of paying a 401 each. The agent holds **no credentials of its own**: a private
image is not the node's to hand out to whoever can reach the mirror. A client that authenticates
itself (it answers our relayed 401 with a token or Basic credentials of its own) has its
``Authorization`` forwarded as it is; a 401 the agent cannot answer anonymously is relayed to the
client with the registry's challenge, and containerd then tries the next host, the registry
itself, with the pod's pull secret. So authorization is never widened by the pass-through.

``docker.io`` is reached at ``registry-1.docker.io``; every registry over HTTPS unless listed
as plain HTTP (``--upstream-plain-http``, for test and in-cluster registries).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Final

import httpx

from snapcache.images import DEFAULT_REGISTRY
from snapcache.registry_auth import Challenge, parse_www_authenticate, preferred_challenge

log = logging.getLogger(__name__)

DOCKER_HUB_ENDPOINT: Final = "registry-1.docker.io"
_DEFAULT_TOKEN_SECONDS: Final = 60.0
_TOKEN_MARGIN_SECONDS: Final = 10.0
# What the mirror forwards of the client's request, and relays of the registry's answer.
FORWARDED_REQUEST_HEADERS: Final = ("accept", "range", "if-none-match", "if-modified-since")
RELAYED_RESPONSE_HEADERS: Final = (
    "content-type",
    "content-length",
    "content-range",
    "accept-ranges",
    "docker-content-digest",
    "docker-distribution-api-version",
    "etag",
    "last-modified",
    "www-authenticate",
)


MANIFEST_TYPES: Final = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


class UpstreamUnavailable(Exception):
    """The registry could not be reached (connection failed or timed out)."""


class Upstream:
    """Streams distribution API reads from real registries, with anonymous token auth."""

    def __init__(
        self,
        *,
        plain_http_registries: frozenset[str] = frozenset(),
        timeout_seconds: float = 30.0,
        connect_timeout_seconds: float = 5.0,
        max_connections: int = 32,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._plain_http = frozenset(plain_http_registries)
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_seconds, connect=connect_timeout_seconds),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
            headers={"User-Agent": "snapcache-node-agent"},
        )
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}

    def close(self) -> None:
        """Close pooled connections."""
        self._client.close()

    def endpoint(self, registry: str) -> str:
        """The base URL of ``registry``'s API."""
        host = DOCKER_HUB_ENDPOINT if registry == DEFAULT_REGISTRY else registry
        return f"{'http' if registry in self._plain_http else 'https'}://{host}"

    @contextmanager
    def open(
        self, method: str, registry: str, path: str, *, repository: str = "", headers: Mapping[str, str]
    ) -> Iterator[httpx.Response]:
        """Send ``method /v2/<path>`` to ``registry``; yield the final streaming response (any status).

        ``headers`` are the client's (lower-case names); an ``authorization`` among them is the
        client's own and is forwarded instead of the agent's anonymous token. Without a
        ``repository`` (the /v2/ probe) a challenge is relayed, never answered.
        """
        scope = f"repository:{repository}:pull" if repository else ""
        url = f"{self.endpoint(registry)}/v2/{path}"
        forwarded = {k: v for k, v in headers.items() if k in FORWARDED_REQUEST_HEADERS}
        forwarded["accept-encoding"] = "identity"  # blobs byte for byte: their digest is over them
        client_authorization = headers.get("authorization", "")
        authorization = client_authorization or (self._cached_authorization(registry, scope) if scope else "")
        for attempt in range(2):
            request_headers = dict(forwarded)
            if authorization:
                request_headers["authorization"] = authorization
            request = self._client.build_request(method, url, headers=request_headers)
            try:
                response = self._client.send(request, stream=True, follow_redirects=True)
            except httpx.TransportError as exc:
                raise UpstreamUnavailable(f"{registry}: {type(exc).__name__}") from None
            try:
                if response.status_code == 401 and attempt == 0 and scope and not client_authorization:
                    challenge = preferred_challenge(
                        parse_www_authenticate(response.headers.get_list("www-authenticate"))
                    )
                    token = self._anonymous_token(registry, scope, challenge, rejected=authorization)
                    if token:
                        authorization = token
                        continue
                yield response
                return
            finally:
                response.close()

    def allows(self, registry: str, path: str, authorization: str) -> bool:
        """Does ``registry`` answer ``HEAD /v2/<path>`` with 2xx to this ``Authorization``?

        The pull-authority check for private images on disks: the client's own credentials, no
        anonymous token, no redirect followed (a 3xx to storage is the registry saying yes).
        Unreachable counts as no.
        """
        url = f"{self.endpoint(registry)}/v2/{path}"
        # every manifest type: a registry answers 404 for a manifest whose type the client refuses
        headers = {"authorization": authorization, "accept-encoding": "identity", "accept": MANIFEST_TYPES}
        try:
            response = self._client.head(url, headers=headers, follow_redirects=False)
        except httpx.TransportError as exc:
            log.warning(
                "cannot check a private image's access at %s (%s): refused", registry, type(exc).__name__
            )
            return False
        return 200 <= response.status_code < 400

    def _cached_authorization(self, registry: str, scope: str) -> str:
        with self._lock:
            challenge = self._challenges.get(registry)
            cached = self._tokens.get((registry, scope))
        if challenge is None or challenge.scheme != "bearer":
            return ""
        if cached is not None and cached[1] > time.monotonic():
            return f"Bearer {cached[0]}"
        return self._fetch_token(registry, scope, challenge)

    def _anonymous_token(
        self, registry: str, scope: str, challenge: Challenge | None, *, rejected: str
    ) -> str:
        """After a 401: a fresh anonymous Bearer token (``""``: the challenge cannot be answered so)."""
        with self._lock:
            if challenge is None:
                self._challenges.pop(registry, None)
            else:
                self._challenges[registry] = challenge
            cached = self._tokens.get((registry, scope))
            if cached is not None and f"Bearer {cached[0]}" == rejected:
                del self._tokens[(registry, scope)]
        if challenge is None or challenge.scheme != "bearer":
            return ""  # Basic: only the client's own credentials can answer it
        token_scope = challenge.params.get("scope") or scope
        return self._fetch_token(registry, scope, challenge, token_scope=token_scope)

    def _fetch_token(self, registry: str, scope: str, challenge: Challenge, *, token_scope: str = "") -> str:
        realm = challenge.params.get("realm", "")
        try:
            realm_url = httpx.URL(realm)
        except httpx.InvalidURL:
            return ""
        if realm_url.scheme not in ("http", "https") or not realm_url.host:
            return ""
        params = {
            k: v
            for k, v in (("service", challenge.params.get("service", "")), ("scope", token_scope or scope))
            if v
        }
        try:
            response = self._client.get(realm_url, params=params)
        except httpx.TransportError as exc:
            log.warning("token service of %s unreachable (%s)", registry, type(exc).__name__)
            return ""
        try:
            body = response.json() if response.status_code == 200 else None
        except ValueError:
            body = None
        token, lifetime = "", _DEFAULT_TOKEN_SECONDS
        if isinstance(body, dict):
            token = str(body.get("token") or body.get("access_token") or "")
            expires_in = body.get("expires_in")
            if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
                lifetime = float(expires_in)
        if not token:
            log.info("no anonymous token from %s for %s (HTTP %d)", registry, scope, response.status_code)
            return ""
        margin = min(_TOKEN_MARGIN_SECONDS, lifetime / 4)
        with self._lock:
            self._tokens[(registry, scope)] = (token, time.monotonic() + lifetime - margin)
        return f"Bearer {token}"
