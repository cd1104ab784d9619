"""Transport credentials for every gRPC server and channel: TLS, mutual TLS, bearer tokens.

Servers use grpc's dynamic SSL credentials: grpc asks `CertificateFiles` before each new
handshake, and it answers with a fresh configuration only when a file's modification time or
size changed, so a certificate rotated on disk (cert-manager, a renewed Secret) is served to new
connections without a restart, while connections already open keep theirs. A half-written
rotation (a key that does not match its certificate yet) keeps the previous pair and is tried
again at the next handshake. With a client CA the server requires and verifies a client
certificate (mutual TLS); the CA is reloaded the same way. `SSLContextFiles` does the same for
the standard library's servers (the extender's HTTPS).

Channels (`open_channel`) verify the server with a CA file (or the system's roots), may present a
client certificate, and may carry a bearer token on every call. The token is added by a client
interceptor rather than grpc's call credentials so it also works on a plaintext loopback channel;
a token file is read again when it changes, as the server's files are.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar, cast

import grpc

from snapcache import retry_policy

log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int], ...]
_Loaded = TypeVar("_Loaded")


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key, and the CA of client certificates (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def mutual(self) -> bool:
        """True when clients must present a certificate signed by ``client_ca``."""
        return self.client_ca is not None

    def files(self) -> tuple[Path, ...]:
        """The files watched for rotation."""
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)

    def validate(self) -> None:
        """Refuse unreadable files, a key that does not match the certificate, or a bad CA."""
        _check_pair(self.cert, self.key)
        if self.client_ca is not None:
            _check_ca(self.client_ca)


def _check_pair(cert: Path, key: Path) -> None:
    for path in (cert, key):
        if not path.is_file():
            raise ValueError(f"TLS file {path} is not a file")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ValueError(f"TLS certificate {cert} and key {key} do not load as a pair: {exc}") from None


def _check_ca(ca: Path) -> None:
    if not ca.is_file():
        raise ValueError(f"TLS CA {ca} is not a file")
    try:
        ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as exc:
        raise ValueError(f"TLS CA {ca} does not load: {exc}") from None


class _ReloadingFiles(Generic[_Loaded]):
    """Something loaded from a server's TLS files, loaded again when their mtime or size changes."""

    def __init__(self, tls: ServerTls, load: Callable[[], _Loaded]) -> None:
        self.tls = tls
        self._load = load
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.current = load()
        self.reloads = 0

    def _stat(self) -> _Stamp:
        stamps = []
        for path in self.tls.files():
            stat = path.stat()
            stamps.append((stat.st_mtime_ns, stat.st_size))
        return tuple(stamps)

    def changed(self) -> _Loaded | None:
        """The newly loaded value if the files changed and load; None keeps the current one."""
        try:
            stamp = self._stat()
        except OSError:
            return None  # a file replaced by rename is briefly missing
        if stamp == self._stamp:
            return None
        with self._lock:
            if stamp == self._stamp:
                return None
            try:
                self.tls.validate()
                loaded = self._load()
            except (OSError, ValueError) as exc:
                log.warning("TLS files changed but do not load yet; keeping the previous ones: %s", exc)
                return None
            self._stamp = stamp
            self.current = loaded
            self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.tls.cert)
        return loaded


class CertificateFiles:
    """grpc's certificate-configuration fetcher: a new configuration only when the files changed."""

    def __init__(self, tls: ServerTls) -> None:
        tls.validate()
        self._files = _ReloadingFiles(tls, lambda: self._configuration(tls))
        self.initial = self._files.current

    @staticmethod
    def _configuration(tls: ServerTls) -> grpc.ServerCertificateConfiguration:
        pair = (tls.key.read_bytes(), tls.cert.read_bytes())
        roots = tls.client_ca.read_bytes() if tls.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc before a handshake: None keeps the configuration in force."""
        return self._files.changed()


class SSLContextFiles:
    """An `ssl.SSLContext` for a standard-library server, made again when the files change.

    Ask `context()` for each accepted connection: it costs a stat of each file, and a rotated
    certificate is used from the next connection on, as grpc's servers do.
    """

    def __init__(self, tls: ServerTls, *, alpn: Sequence[str] = ("http/1.1",)) -> None:
        tls.validate()
        self.tls = tls
        self._alpn = list(alpn)
        self._files = _ReloadingFiles(tls, self._build)

    def _build(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls.cert, self.tls.key)
        if self.tls.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(self.tls.client_ca))
        context.set_alpn_protocols(self._alpn)
        return context

    def context(self) -> ssl.SSLContext:
        """The context for a new connection."""
        self._files.changed()
        return self._files.current


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """Credentials that reload ``tls``'s files when they change; mutual TLS with a client CA."""
    files = CertificateFiles(tls)
    # grpc takes None from the fetcher as "unchanged"; its stubs only declare a configuration
    fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], files)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, fetcher, require_client_authentication=tls.mutual
    )


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a server: TLS (CA, client certificate) and a bearer token."""

    ca: Path | None = None  # verify the server with this CA (TLS); None and no cert: plaintext
    cert: Path | None = None  # client certificate for mutual TLS
    key: Path | None = None
    server_name: str = ""  # expected name in the server's certificate, if not the target's host
    token: str = ""
    token_file: Path | None = None

    @property
    def tls(self) -> bool:
        """True when the channel uses TLS."""
        return self.ca is not None or self.cert is not None

    def validate(self) -> None:
        """Refuse half a client certificate, unreadable files, or two sources of a token."""
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both its certificate and its key")
        if self.cert is not None and self.key is not None:
            _check_pair(self.cert, self.key)
        if self.ca is not None:
            _check_ca(self.ca)
        if self.token and self.token_file is not None:
            raise ValueError("give a token or a token file, not both")
        if self.token_file is not None:
            read_token(self.token_file)
        if self.server_name and not self.tls:
            raise ValueError("a TLS server name needs TLS (a CA)")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel's TLS credentials."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca is not None else None,
            private_key=self.key.read_bytes() if self.key is not None else None,
            certificate_chain=self.cert.read_bytes() if self.cert is not None else None,
        )

    def token_source(self) -> Callable[[], str] | None:
        """Where each call's token comes from (None: calls carry none)."""
        if self.token_file is not None:
            return TokenFile(self.token_file)
        if self.token:
            token = self.token
            return lambda: token
        return None


PLAINTEXT_CHANNEL = ClientSecurity()


def read_token(path: Path) -> str:
    """The token in a file (surrounding whitespace dropped); ValueError if it is empty."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read token file {path}: {exc.strerror}") from None
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


class TokenFile:
    """A token read from a file, read again when the file changes (a rotated Secret)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stat()
        self._token = read_token(path)

    def _stat(self) -> tuple[int, int]:
        stat = self.path.stat()
        return stat.st_mtime_ns, stat.st_size

    def __call__(self) -> str:
        try:
            stamp = self._stat()
            if stamp != self._stamp:
                self._token = read_token(self.path)
                self._stamp = stamp
        except (OSError, ValueError) as exc:
            log.warning("token file %s not reloaded, keeping the previous token: %s", self.path, exc)
        return self._token


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer TOKEN`` to every call of a channel."""

    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    def _details(self, details: Any) -> _CallDetails:
        metadata = [*(details.metadata or ()), ("authorization", f"Bearer {self._token()}")]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(
    target: str,
    security: ClientSecurity = PLAINTEXT_CHANNEL,
    *,
    options: Sequence[tuple[str, Any]] = (),
    retried_codes: tuple[str, ...] = retry_policy.RETRIED_CODES,
) -> grpc.Channel:
    """A channel to ``target``: TLS when ``security`` says so, with its token on every call.

    Reads and matches are retried by the channel when they fail with ``retried_codes``
    (`snapcache.retry_policy`).
    """
    all_options = [*retry_policy.channel_options(retried_codes), *options]
    if security.server_name:
        all_options.append(("grpc.ssl_target_name_override", security.server_name))
    if security.tls:
        channel = grpc.secure_channel(target, security.credentials(), options=all_options)
    else:
        channel = grpc.insecure_channel(target, options=all_options)
    token = security.token_source()
    if token is None:
        return channel
    return grpc.intercept_channel(channel, BearerToken(token))
