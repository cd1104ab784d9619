"""A real Docker Registry v2 token server, and docker-registry trusting it (a pytest plugin).

The distribution client's Bearer flow is only worth something if it works against what
registries actually do, so this is the token service a ``docker-registry`` configured with
``auth.token`` really checks tokens from: a threaded HTTP server on 127.0.0.1 answering
``GET /token?service=..&scope=repository:NAME:pull,push`` with basic auth, and RS256 JWTs whose
``x5c`` header carries the self-signed certificate the registry was given as its
``rootcertbundle`` (distribution 2.8 looks for the signing key in ``x5c``, then ``jwk``, then
``kid``; ``x5c`` needs no libtrust key id). Users get what their rules grant, as the token spec
says: a request for more than a user may do still succeeds, with a token carrying only the
granted actions, and the registry refuses the rest with ``insufficient_scope``.

Two knobs exist for expiry tests. ``expires_in`` is the lifetime the server tells clients.
``registry_valid_seconds`` decouples what the registry will accept: distribution 2.8 allows
60 s of clock skew past a token's ``exp`` (its ``Leeway``), so to make a token the client still
trusts go stale at the registry after N seconds, its ``exp`` is set to now + N - 60.

The server records who asked for which scope and what it was granted (never a password), and
keeps a log of request lines, so tests count token fetches and search logs for secrets.

Fixtures (tests using them should be marked ``@pytest.mark.e2e``):

``token_oci_registry`` (session) -> ``TokenOciRegistry``
    A ``docker-registry`` with token auth and its token server. Users: ``reader`` /
    ``READER_PASSWORD`` (pull ``private/*``), ``admin`` / ``ADMIN_PASSWORD`` (pull and push
    everything). Images, pushed through token auth as ``admin``: ``.app`` (``private/app:1.0``,
    3 layers), ``.tool`` (``private/tool:1.0``, 2 layers, shares its base layer with app),
    ``.restricted`` (``restricted/db:1.0``, which ``reader`` may not pull). Do not change its
    knobs or stop it: other tests share it.
``fresh_token_oci_registry`` (function) -> ``TokenOciRegistry``
    The same, for one test, free to stop the token server or change its knobs.
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import json
import shutil
import threading
import time
import uuid
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from services.cache_registry.provider import RegistryCredential
from snapcache.demo.oci_images import ImageSpec, LayerSpec, build_image, push_image
from snapcache.demo.registry_server import REGISTRY_BINARY, RegistryServer, TokenAuth
from snapcache.registry_auth import parse_www_authenticate
from tests.support.oci_fixtures import OciRegistry, PushedRef

SERVICE = "snapcache-test-registry"
ISSUER = "snapcache-test-token-issuer"
READER = "reader"
READER_PASSWORD = "t0ken-Reader-pa55"  # test-only; tests check it never shows in messages or logs
ADMIN = "admin"
ADMIN_PASSWORD = "t0ken-Admin-pa55"
# distribution 2.8 accepts a token this long after its exp (and before its nbf): clock skew
REGISTRY_LEEWAY_SECONDS = 60


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    """An RSA key and the self-signed certificate the registry trusts it by."""

    private_key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @classmethod
    def generate(cls) -> Self:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "snapcache test token issuer")])
        now = dt.datetime.now(dt.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign_jwt(self, claims: Mapping[str, Any]) -> str:
        """An RS256 JWS over ``claims`` with the certificate as its one-element ``x5c`` chain."""
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


@dataclass(frozen=True)
class AccessRule:
    """Actions a user may take on repositories whose name matches ``pattern`` (fnmatch)."""

    pattern: str
    actions: frozenset[str]


@dataclass(frozen=True)
class TokenUser:
    """A user of the token server: password and access rules."""

    password: str
    rules: tuple[AccessRule, ...]

    def granted(self, repository: str, wanted: Sequence[str]) -> list[str]:
        allowed: set[str] = set()
        for rule in self.rules:
            if fnmatch.fnmatchcase(repository, rule.pattern):
                allowed |= rule.actions
        return [action for action in wanted if action in allowed]


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered (no secrets)."""

    user: str  # "" for anonymous or unknown
    scopes: tuple[str, ...]
    status: int
    access: tuple[tuple[str, str, tuple[str, ...]], ...] = ()  # (type, name, actions) granted


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: TokenServer


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = 10  # a stalled client must not pin a handler thread forever

    def do_GET(self) -> None:
        self.server.owner.handle(self)

    def log_message(self, format: str, *args: Any) -> None:
        self.server.owner.log_line(format % args)

    def send_json(
        self, status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class TokenServer:
    """A Docker Registry v2 token server on 127.0.0.1 (real sockets, one thread per request)."""

    def __init__(
        self,
        *,
        users: Mapping[str, TokenUser],
        signing_key: SigningKey,
        service: str = SERVICE,
        issuer: str = ISSUER,
        expires_in: int = 300,
    ) -> None:
        self.users = dict(users)
        self.signing_key = signing_key
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.registry_valid_seconds: float | None = None  # None: as long as expires_in
        self.port = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._log: list[str] = []

    def __repr__(self) -> str:  # passwords stay out of reprs
        return f"TokenServer(realm={self.realm!r}, users={sorted(self.users)}, running={self.running})"

    @property
    def realm(self) -> str:
        """The token endpoint's URL (fixed once the server first started)."""
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> None:
        """Listen (again, on the same port once one was chosen) and serve in a thread."""
        if self._httpd is not None:
            return
        httpd = _HTTPServer(("127.0.0.1", self.port), _Handler)
        httpd.owner = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="token-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening: new connections are refused until ``start()``."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what tests look at --

    @property
    def requests(self) -> list[TokenRequest]:
        """Every request answered so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def issued(self, *, user: str | None = None, scope: str | None = None) -> int:
        """How many tokens were issued (HTTP 200), optionally for one user and one scope."""
        return sum(
            1
            for r in self.requests
            if r.status == 200 and (user is None or r.user == user) and (scope is None or scope in r.scopes)
        )

    def read_log(self) -> str:
        """The request lines logged so far (the access log)."""
        with self._lock:
            return "\n".join(self._log)

    def log_line(self, line: str) -> None:
        with self._lock:
            self._log.append(line)

    # -- the protocol --

    def handle(self, request: _Handler) -> None:
        url = urlsplit(request.path)
        if url.path != "/token":
            request.send_json(404, {"errors": [{"code": "NOT_FOUND", "message": "no such endpoint"}]})
            return
        query = parse_qs(url.query)
        service = query.get("service", [""])[0]
        scopes = tuple(query.get("scope", []))
        if service != self.service:
            self._record(TokenRequest("", scopes, 400))
            request.send_json(400, {"errors": [{"code": "UNSUPPORTED", "message": "unknown service"}]})
            return
        user_name, user = self._authenticate(request.headers.get("Authorization", ""))
        if user is None:
            self._record(TokenRequest(user_name, scopes, 401))
            request.send_json(
                401,
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                {"WWW-Authenticate": 'Basic realm="snapcache-token-server"'},
            )
            return
        access = self._grant(user, scopes)
        now = time.time()
        valid = self.expires_in if self.registry_valid_seconds is None else self.registry_valid_seconds
        claims = {
            "iss": self.issuer,
            "sub": user_name,
            "aud": self.service,
            "exp": int(now + valid) - (0 if self.registry_valid_seconds is None else REGISTRY_LEEWAY_SECONDS),
            "nbf": int(now) - 1,
            "iat": int(now),
            "jti": uuid.uuid4().hex,
            "access": [{"type": t, "name": n, "actions": list(a)} for t, n, a in access],
        }
        token = self.signing_key.sign_jwt(claims)
        self._record(TokenRequest(user_name, scopes, 200, access))
        request.send_json(
            200,
            {
                "token": token,
                "access_token": token,
                "expires_in": self.expires_in,
                "issued_at": dt.datetime.fromtimestamp(now, dt.UTC).isoformat().replace("+00:00", "Z"),
            },
        )

    def _authenticate(self, header: str) -> tuple[str, TokenUser | None]:
        """``(user name, user)``; anonymous is ``("", no rules)``, a bad password ``(name, None)``."""
        if not header:
            return "", TokenUser(password="", rules=())
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return "", None
        try:
            name, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return "", None
        user = self.users.get(name)
        if user is None or user.password != password:
            return name, None
        return name, user

    @staticmethod
    def _grant(user: TokenUser, scopes: Sequence[str]) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        granted: list[tuple[str, str, tuple[str, ...]]] = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            allowed = user.granted(name, [a for a in actions.split(",") if a])
            granted.append((kind, name, tuple(allowed)))
        return tuple(granted)

    def _record(self, entry: TokenRequest) -> None:
        with self._lock:
            self._requests.append(entry)


class RegistryTokenAuth(httpx.Auth):
    """The Docker token flow for pushing with httpx: Bearer tokens for ``pull,push``, per repository.

    Tokens are cached per scope and sent up front, so only a repository's first request (the
    blob ``HEAD``, which has no body) ever meets a 401; upload bodies are streams that could
    not be sent twice.
    """

    requires_response_body = True

    def __init__(self, username: str, password: str) -> None:
        self._basic = httpx.BasicAuth(username, password)
        self._tokens: dict[str, str] = {}

    @staticmethod
    def _scope(url: httpx.URL) -> str:
        path = url.path.removeprefix("/v2/")
        for marker in ("/blobs/", "/manifests/"):
            if marker in path:
                return f"repository:{path.split(marker)[0]}:pull,push"
        return ""

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        scope = self._scope(request.url)
        if scope in self._tokens:
            request.headers["Authorization"] = f"Bearer {self._tokens[scope]}"
        response = yield request
        if response.status_code != 401:
            return
        bearer = [
            c
            for c in parse_www_authenticate(response.headers.get_list("WWW-Authenticate"))
            if c.scheme == "bearer"
        ]
        if not bearer:
            return
        params = {"service": bearer[0].params.get("service", ""), "scope": scope}
        token_request = httpx.Request("GET", bearer[0].params["realm"], params=params)
        token_response = yield next(self._basic.auth_flow(token_request))
        if token_response.status_code != 200:
            raise RuntimeError(f"token server refused a push token (HTTP {token_response.status_code})")
        self._tokens[scope] = str(token_response.json()["token"])
        request.headers["Authorization"] = f"Bearer {self._tokens[scope]}"
        yield request


@dataclass(frozen=True)
class TokenOciRegistry:
    """A registry with token auth, its token server and the images pushed to it."""

    registry: OciRegistry  # its credential is reader's
    tokens: TokenServer
    app: PushedRef
    tool: PushedRef
    restricted: PushedRef

    @property
    def server(self) -> RegistryServer:
        return self.registry.server

    @property
    def host(self) -> str:
        return self.registry.host

    @property
    def credential(self) -> RegistryCredential:
        assert self.registry.credential is not None
        return self.registry.credential


USERS = {
    READER: TokenUser(READER_PASSWORD, (AccessRule("private/*", frozenset({"pull"})),)),
    ADMIN: TokenUser(ADMIN_PASSWORD, (AccessRule("*", frozenset({"pull", "push"})),)),
}


def push_spec(registry: OciRegistry, spec: ImageSpec, auth: RegistryTokenAuth) -> PushedRef:
    """Build the image ``spec`` describes and push it to ``registry`` with a token credential."""
    image = build_image(spec)
    digest = push_image(registry.url, image, auth=auth)
    return PushedRef(
        reference=registry.reference(spec.repository, tag=spec.tag), digest=digest, built=(image,)
    )


@contextmanager
def running_token_registry(directory: Path, signing_key: SigningKey) -> Iterator[TokenOciRegistry]:
    """Start a token server and a registry trusting it, push the images, stop both afterwards."""
    if shutil.which(REGISTRY_BINARY) is None:
        pytest.fail(f"{REGISTRY_BINARY} is not installed (apt-get install docker-registry)")
    directory.mkdir(parents=True, exist_ok=True)
    bundle = directory / "token-root.pem"
    bundle.write_bytes(signing_key.certificate_pem())
    with TokenServer(users=USERS, signing_key=signing_key) as tokens:
        server = RegistryServer(
            directory / "registry",
            token_auth=TokenAuth(realm=tokens.realm, service=SERVICE, issuer=ISSUER, rootcertbundle=bundle),
        )
        server.start()
        try:
            registry = OciRegistry(server, RegistryCredential(READER, READER_PASSWORD))
            auth = RegistryTokenAuth(ADMIN, ADMIN_PASSWORD)
            base = LayerSpec(80 * 1024, seed=401)
            app = push_spec(
                registry,
                ImageSpec(
                    "private/app",
                    "1.0",
                    [base, LayerSpec(48 * 1024, seed=402), LayerSpec(1024**2, compressible=True, seed=403)],
                ),
                auth,
            )
            tool = push_spec(
                registry, ImageSpec("private/tool", "1.0", [base, LayerSpec(32 * 1024, seed=411)]), auth
            )
            restricted = push_spec(
                registry, ImageSpec("restricted/db", "1.0", [LayerSpec(16 * 1024, seed=421)]), auth
            )
            yield TokenOciRegistry(
                registry=registry, tokens=tokens, app=app, tool=tool, restricted=restricted
            )
        finally:
            server.close()


@pytest.fixture(scope="session")
def token_signing_key() -> SigningKey:
    """One RSA key for every token server of the session (generating one takes a moment)."""
    return SigningKey.generate()


@pytest.fixture(scope="session")
def token_oci_registry(
    tmp_path_factory: pytest.TempPathFactory, token_signing_key: SigningKey
) -> Iterator[TokenOciRegistry]:
    """A token-auth registry with ``private/app``, ``private/tool`` and ``restricted/db``, shared."""
    with running_token_registry(tmp_path_factory.mktemp("token-registry"), token_signing_key) as running:
        yield running


@pytest.fixture
def fresh_token_oci_registry(tmp_path: Path, token_signing_key: SigningKey) -> Iterator[TokenOciRegistry]:
    """A token-auth registry for one test: free to stop its token server or change its knobs."""
    with running_token_registry(tmp_path / "token-registry", token_signing_key) as running:
        yield running
