"""Who may call what: the one method -> role table, the identity file, and the access decision.

Pure (no grpc): the gRPC edge (`snapcache.rpc_auth`) reads a caller's bearer token and verified
client-certificate names off the call and asks `AccessPolicy.authorize`, which answers with the
caller or raises `snapcache.errors.Unauthenticated` / `PermissionDenied`; `snapcache.rpc_errors`
maps those like every other domain error, so a refusal carries an ErrorInfo reason.

Two roles, ordered: ``reader`` may read and match, ``writer`` may do everything. A method missing
from `METHOD_ROLES` is refused to everyone (deny by default); a unit test walks every service of
the generated API so a new RPC cannot ship without a row here.

Identities come from one file of ``token,user,role`` lines (``#`` comments and blank lines
ignored). A line whose first field is ``cert:NAME`` gives a role to a client certificate whose
common name or a subject alternative name is NAME (mutual TLS). Tokens are kept only as SHA-256
digests, so neither a lookup nor a log line ever holds one; the file is read again when it
changes on disk (a bad edit keeps the previous version and is logged, a bad file at start-up
stops start-up).

In a cluster a bearer token the file does not list may be a Kubernetes ServiceAccount token,
checked by a `TokenReview` (`snapcache.token_review`: the TokenReview API). The identity it
proves gets its role from the same file: ``user:NAME,LABEL,ROLE`` for a Kubernetes user name
(``user:system:serviceaccount:NAMESPACE:NAME``), ``group:NAME,LABEL,ROLE`` for a group
(``group:system:serviceaccounts:NAMESPACE``, every ServiceAccount of a namespace). A user line
wins over group lines; among groups the highest role wins. Such a caller's principal is its
Kubernetes user name (LABEL is for the file's readers). A token the API does not accept is
``UNAUTHENTICATED``; an identity the file gives no role is ``PERMISSION_DENIED``; an API that
cannot answer is ``UNAVAILABLE`` (retry).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from snapcache import errors

log = logging.getLogger(__name__)


class Role(enum.IntEnum):
    """What a caller may do; a higher role may do everything a lower one may."""

    READER = 1
    WRITER = 2


_REGISTRY = "snapcache.v1.CacheRegistryService"
_MATCHER = "snapcache.v1.MatcherService"

# The one table: full gRPC method name -> least role allowed to call it.
METHOD_ROLES: Mapping[str, Role] = {
    f"/{_REGISTRY}/GetImageCache": Role.READER,
    f"/{_REGISTRY}/ListImageCaches": Role.READER,
    f"/{_REGISTRY}/WatchImageCaches": Role.READER,
    f"/{_REGISTRY}/ListImageCacheEvents": Role.READER,
    f"/{_REGISTRY}/ListDisks": Role.READER,
    f"/{_REGISTRY}/CreateImageCache": Role.WRITER,
    f"/{_REGISTRY}/UpdateImageCache": Role.WRITER,
    f"/{_REGISTRY}/DeleteImageCache": Role.WRITER,
    f"/{_REGISTRY}/ProvisionDisk": Role.WRITER,
    f"/{_REGISTRY}/ReleaseDisk": Role.WRITER,
    f"/{_REGISTRY}/ReportMatches": Role.WRITER,
    f"/{_MATCHER}/MatchImageCaches": Role.READER,
    f"/{_MATCHER}/GetIndexStatus": Role.READER,
    # probes and grpcurl: usually exempt (EXEMPTABLE_SERVICES); readers' when they are not
    "/grpc.health.v1.Health/Check": Role.READER,
    "/grpc.health.v1.Health/Watch": Role.READER,
    "/grpc.health.v1.Health/List": Role.READER,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Role.READER,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Role.READER,
}

# Services that can be left open to anyone (probes and grpcurl need no token), by short name.
EXEMPTABLE_SERVICES: Mapping[str, frozenset[str]] = {
    "health": frozenset({"grpc.health.v1.Health"}),
    "reflection": frozenset(
        {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
    ),
}
DEFAULT_EXEMPT = ("health", "reflection")

CERTIFICATE_PREFIX = "cert:"
KUBE_USER_PREFIX = "user:"
KUBE_GROUP_PREFIX = "group:"


def exempt_services(names: tuple[str, ...] | list[str]) -> frozenset[str]:
    """Full service names for short names (``health``, ``reflection``); ValueError for others."""
    found: set[str] = set()
    for name in names:
        if name not in EXEMPTABLE_SERVICES:
            raise ValueError(
                f"unknown service {name!r} to exempt from auth: use {sorted(EXEMPTABLE_SERVICES)}"
            )
        found |= EXEMPTABLE_SERVICES[name]
    return frozenset(found)


def token_digest(token: str) -> str:
    """How a token is kept and looked up: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """An identified caller: a user name and its role."""

    user: str
    role: Role


@dataclass(frozen=True, slots=True)
class Identities:
    """Token digests and certificate names, each to a principal."""

    tokens: Mapping[str, Principal] = field(default_factory=dict)
    certificates: Mapping[str, Principal] = field(default_factory=dict)
    kube_users: Mapping[str, Principal] = field(default_factory=dict)  # Kubernetes user name ->
    kube_groups: Mapping[str, Principal] = field(default_factory=dict)  # Kubernetes group ->


@dataclass(frozen=True, slots=True)
class KubeIdentity:
    """Who the Kubernetes API says a token belongs to."""

    username: str
    groups: tuple[str, ...] = ()


class TokenReview(Protocol):
    """Checks tokens with the Kubernetes API (`snapcache.token_review.TokenReviewer`)."""

    def cached(self, token: str) -> KubeIdentity | None:
        """The identity of a token accepted recently, without asking the API (None: not known)."""

    def review(self, token: str) -> KubeIdentity | None:
        """Ask the API: the identity, or None for a token it does not accept; `errors.Unavailable`."""


class ReviewNeeded(Exception):
    """`AccessPolicy.authorize(remote=False)` needs to ask the Kubernetes API (a blocking call)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """What a call presented: a bearer token (None: no header) and verified certificate names."""

    token: str | None = None
    certificate_names: tuple[str, ...] = ()


def parse_role(text: str) -> Role:
    """``reader`` / ``writer`` -> `Role`; ValueError for anything else."""
    try:
        return Role[text.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown role {text.strip()!r}: use reader or writer") from None


def parse_identities(text: str, *, source: str = "identity file") -> Identities:
    """Read ``token,user,role`` lines; errors name the line, never the token."""
    tokens: dict[str, Principal] = {}
    certificates: dict[str, Principal] = {}
    named: dict[str, dict[str, Principal]] = {KUBE_USER_PREFIX: {}, KUBE_GROUP_PREFIX: {}}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"{source} line {number}: expected TOKEN,USER,ROLE")
        secret, user, role_text = parts
        try:
            principal = Principal(user=user, role=parse_role(role_text))
        except ValueError as exc:
            raise ValueError(f"{source} line {number}: {exc}") from None
        if secret.startswith(CERTIFICATE_PREFIX):
            name = secret.removeprefix(CERTIFICATE_PREFIX)
            if not name or name in certificates:
                raise ValueError(f"{source} line {number}: certificate name empty or repeated")
            certificates[name] = principal
            continue
        prefix = next((p for p in named if secret.startswith(p)), None)
        if prefix is not None:
            name = secret.removeprefix(prefix)
            if not name or name in named[prefix]:
                raise ValueError(f"{source} line {number}: Kubernetes {prefix[:-1]} name empty or repeated")
            named[prefix][name] = principal
            continue
        digest = token_digest(secret)
        if digest in tokens:
            raise ValueError(f"{source} line {number}: token repeated (of user {tokens[digest].user!r})")
        tokens[digest] = principal
    return Identities(
        tokens=tokens,
        certificates=certificates,
        kube_users=named[KUBE_USER_PREFIX],
        kube_groups=named[KUBE_GROUP_PREFIX],
    )


class IdentityFile:
    """`Identities` read from a file, read again when its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._identities = parse_identities(path.read_text(), source=str(path))

    def _stat(self) -> tuple[int, int]:
        stat = self.path.stat()
        return stat.st_mtime_ns, stat.st_size

    def __call__(self) -> Identities:
        """The current identities (the previous ones if the file is now missing or bad)."""
        try:
            stamp = self._stat()
        except OSError:
            return self._identities
        if stamp == self._stamp:
            return self._identities
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._identities = parse_identities(self.path.read_text(), source=str(self.path))
                    log.info("identity file %s reloaded", self.path)
                except (OSError, ValueError, UnicodeDecodeError) as exc:
                    log.error("identity file %s not reloaded, keeping the previous one: %s", self.path, exc)
                self._stamp = stamp
        return self._identities


def _service_of(method: str) -> str:
    return method.lstrip("/").partition("/")[0]


@dataclass(frozen=True)
class AccessPolicy:
    """Decides each call: exempt, allowed as a principal, or refused with a reason."""

    identities: Callable[[], Identities]
    # role of a client certificate the identity file does not name (None: such a client is unknown)
    certificate_role: Role | None = None
    exempt: frozenset[str] = field(default_factory=lambda: exempt_services(DEFAULT_EXEMPT))
    method_roles: Mapping[str, Role] = field(default_factory=lambda: METHOD_ROLES)
    # Kubernetes tokens for bearer tokens the identity file does not list (None: refused)
    token_review: TokenReview | None = None

    def is_exempt(self, method: str) -> bool:
        """True for methods of services anyone may call."""
        return _service_of(method) in self.exempt

    def identify(self, caller: Caller, *, remote: bool = True) -> Principal:
        """The caller's principal: its token if it sent one, else its certificate.

        ``remote=False``: raise `ReviewNeeded` rather than ask the Kubernetes API.
        """
        current = self.identities()
        if caller.token is not None:
            principal = current.tokens.get(token_digest(caller.token)) if caller.token else None
            if principal is None and caller.token and self.token_review is not None:
                return self._reviewed(caller.token, current, remote=remote)
            if principal is None:
                raise errors.Unauthenticated(
                    reason="TOKEN_INVALID", message="the bearer token is not valid for this server"
                )
            return principal
        if caller.certificate_names:
            for name in caller.certificate_names:
                principal = current.certificates.get(name)
                if principal is not None:
                    return principal
            if self.certificate_role is not None:
                return Principal(user=caller.certificate_names[0], role=self.certificate_role)
            raise errors.Unauthenticated(
                reason="CERTIFICATE_UNKNOWN",
                message=f"client certificate {caller.certificate_names[0]!r} has no role on this server",
            )
        raise errors.Unauthenticated(
            reason="AUTHENTICATION_REQUIRED",
            message="this server needs a bearer token (authorization: Bearer TOKEN) or a client certificate",
        )

    def _reviewed(self, token: str, current: Identities, *, remote: bool) -> Principal:
        assert self.token_review is not None
        identity = self.token_review.cached(token)
        if identity is None:
            if not remote:
                raise ReviewNeeded
            identity = self.token_review.review(token)
        if identity is None:
            raise errors.Unauthenticated(
                reason="TOKEN_INVALID",
                message="the bearer token is not valid for this server (nor accepted by the Kubernetes API)",
            )
        return kube_principal(identity, current)

    def authorize(self, method: str, caller: Caller, *, remote: bool = True) -> Principal | None:
        """The principal allowed to make this call (None for an exempt method), or raise.

        ``remote=False``: raise `ReviewNeeded` where the Kubernetes API would have to be asked
        (an event loop then asks again from a thread).
        """
        if self.is_exempt(method):
            return None
        principal = self.identify(caller, remote=remote)
        required = self.method_roles.get(method)
        if required is None:
            raise errors.PermissionDenied(
                reason="METHOD_NOT_ALLOWED",
                message=f"{method} is not in the access table",
                metadata={"method": method},
            )
        if principal.role < required:
            raise errors.PermissionDenied(
                reason="ROLE_INSUFFICIENT",
                message=f"{method} needs role {required.name.lower()}; "
                f"{principal.user!r} has {principal.role.name.lower()}",
                metadata={
                    "method": method,
                    "required_role": required.name.lower(),
                    "role": principal.role.name.lower(),
                },
            )
        return principal


def kube_principal(identity: KubeIdentity, identities: Identities) -> Principal:
    """The principal of a Kubernetes identity: its user line, else its best group line; or refuse."""
    named = identities.kube_users.get(identity.username)
    if named is not None:
        return Principal(user=identity.username, role=named.role)
    roles = [p.role for group in identity.groups if (p := identities.kube_groups.get(group)) is not None]
    if roles:
        return Principal(user=identity.username, role=max(roles))
    raise errors.PermissionDenied(
        reason="IDENTITY_WITHOUT_ROLE",
        message=f"Kubernetes user {identity.username!r} has no role on this server",
        metadata={"user": identity.username},
    )
