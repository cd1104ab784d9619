"""The CLI's only gRPC client of the cache registry: channel, deadlines, paging, following a cache.

Every unary call carries a deadline (``rpc_timeout``); the watch stream is bounded by the
caller's overall timeout instead, because a build legitimately takes minutes. Failures leave
this module as `RpcFailure`, which knows the address it talked to and renders itself the same
way for every command (``error: CODE REASON: message`` plus one line per field violation), so a
registry that is down reads as "cannot reach the registry at ADDRESS", never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, TypeVar, cast

import grpc
from google.protobuf.message import Message

from snapcache.rpc_errors import error_info, field_violations
from snapcache.tls import PLAINTEXT_CHANNEL, ClientSecurity, open_channel
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb

log = logging.getLogger(__name__)

CACHE_NAME_PREFIX = "imageCaches/"
DEFAULT_RPC_TIMEOUT_SECONDS = 15.0
_RECONNECT_PAUSE_SECONDS = 0.2

# The generated stubs' response types do not survive grpc's untyped classes; `_call` checks them.
_Response = TypeVar("_Response", bound=Message)


def cache_name(text: str) -> str:
    """``imc-xxxxxxxx`` or ``imageCaches/imc-xxxxxxxx`` -> the resource name (the server validates)."""
    return text if text.startswith(CACHE_NAME_PREFIX) else CACHE_NAME_PREFIX + text


def cache_id(name: str) -> str:
    """The id part of a cache or disk name: ``imageCaches/imc-x/disks/d`` -> ``imc-x``."""
    return name.removeprefix(CACHE_NAME_PREFIX).split("/", 1)[0]


@dataclass(eq=False)
class RpcFailure(Exception):
    """A failed call to the registry, with what a person needs to act on it."""

    code: grpc.StatusCode
    message: str
    address: str
    reason: str = ""
    violations: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return self.lines()[0]

    @classmethod
    def from_error(
        cls,
        error: grpc.RpcError,
        *,
        address: str,
        timeout_seconds: float | None,
        service: str = "registry",
        address_option: str = "--registry or SNAPCACHE_REGISTRY",
    ) -> RpcFailure:
        """Read code, ErrorInfo reason and BadRequest violations off a failed call."""
        if not isinstance(error, grpc.Call):
            return cls(grpc.StatusCode.UNKNOWN, str(error) or type(error).__name__, address)
        call = cast(grpc.Call, error)
        code: grpc.StatusCode = call.code()
        details: str = call.details() or ""
        try:
            info = error_info(error)
            violations = tuple(field_violations(error))
        except ValueError:  # rich status disagreeing with the call's own status: keep the call's
            info, violations = None, ()
        reason = info.reason if info is not None else ""
        if info is None and code is grpc.StatusCode.UNAVAILABLE:
            details = (
                f"cannot reach the {service} at {address} (is `snapcache serve` running? "
                f"set {address_option}): {details}"
            )
        elif info is None and code is grpc.StatusCode.DEADLINE_EXCEEDED and timeout_seconds is not None:
            details = f"the {service} at {address} did not answer within {timeout_seconds:g}s"
        elif code is grpc.StatusCode.UNAUTHENTICATED:
            details = f"{details} (give --token, $SNAPCACHE_TOKEN or --client-token-file)"
        elif code is grpc.StatusCode.PERMISSION_DENIED and reason == "ROLE_INSUFFICIENT":
            details = f"{details} (use a token of a writer)"
        return cls(code, details, address, reason, violations)

    def lines(self) -> list[str]:
        """``error: CODE REASON: message`` and one indented line per field violation."""
        head = " ".join(part for part in (self.code.name, self.reason) if part)
        return [f"error: {head}: {self.message}"] + [
            f"  {field_name}: {description}" for field_name, description in self.violations
        ]


class WaitTimeout(Exception):
    """The cache did not settle within the timeout; ``cache`` is the last version seen."""

    def __init__(self, cache: pb.ImageCache, timeout_seconds: float) -> None:
        super().__init__(f"timed out after {timeout_seconds:g}s waiting for {cache.name}")
        self.cache = cache
        self.timeout_seconds = timeout_seconds


class Observer(Protocol):
    """Told about each new version of a followed cache, and about idle heartbeats."""

    def update(self, cache: pb.ImageCache) -> None:
        """A new version of the cache."""

    def tick(self) -> None:
        """Nothing changed; the feed is alive."""


@dataclass(frozen=True)
class Followed:
    """Where following a cache ended: its last version, and whether it is gone."""

    cache: pb.ImageCache
    deleted: bool = False


class RegistryClient:
    """`CacheRegistryService` over one channel, each unary call with a deadline."""

    def __init__(
        self,
        address: str,
        *,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT_SECONDS,
        security: ClientSecurity = PLAINTEXT_CHANNEL,
    ) -> None:
        self.address = address
        self.rpc_timeout = rpc_timeout
        self._channel = open_channel(address, security)
        self._stub = api_grpc.CacheRegistryServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self, method: Callable[..., object], request: Message, *, returns: type[_Response]
    ) -> _Response:
        try:
            response = method(request, timeout=self.rpc_timeout)
        except grpc.RpcError as error:
            raise self._failure(error, self.rpc_timeout) from None
        if not isinstance(response, returns):
            raise TypeError(f"expected {returns.__name__} from the registry, got {type(response).__name__}")
        return response

    # -- caches --

    def create(self, cache: pb.ImageCache, *, cache_id: str = "") -> pb.ImageCache:
        """Create a cache (it comes back CREATING)."""
        return self._call(
            self._stub.CreateImageCache,
            api.CreateImageCacheRequest(image_cache=cache, image_cache_id=cache_id),
            returns=pb.ImageCache,
        )

    def get(self, name: str) -> pb.ImageCache:
        """One cache."""
        return self._call(
            self._stub.GetImageCache, api.GetImageCacheRequest(name=cache_name(name)), returns=pb.ImageCache
        )

    def list_all(self, *, filter_text: str = "", page_size: int = 0) -> api.ListImageCachesResponse:
        """Every page of caches, merged; ``revision`` is the first page's (safe to watch from)."""
        merged = api.ListImageCachesResponse()
        token = ""
        first = True
        while True:
            page = self._call(
                self._stub.ListImageCaches,
                api.ListImageCachesRequest(page_size=page_size, page_token=token, filter=filter_text),
                returns=api.ListImageCachesResponse,
            )
            merged.image_caches.extend(page.image_caches)
            if first:
                merged.revision = page.revision
                first = False
            token = page.next_page_token
            if not token:
                return merged

    def delete(self, name: str, *, force: bool = False) -> pb.ImageCache:
        """Start deleting a cache (it comes back DELETING)."""
        return self._call(
            self._stub.DeleteImageCache,
            api.DeleteImageCacheRequest(name=cache_name(name), force=force),
            returns=pb.ImageCache,
        )

    def events(self, name: str) -> api.ListImageCacheEventsResponse:
        """A cache's whole event log, oldest first, merged from every page."""
        merged = api.ListImageCacheEventsResponse()
        token = ""
        while True:
            page = self._call(
                self._stub.ListImageCacheEvents,
                api.ListImageCacheEventsRequest(parent=cache_name(name), page_token=token),
                returns=api.ListImageCacheEventsResponse,
            )
            merged.events.extend(page.events)
            token = page.next_page_token
            if not token:
                return merged

    # -- disks --

    def provision_disk(self, name: str, *, zone: str, holder: str = "", disk_id: str = "") -> pb.Disk:
        """A disk from the cache's snapshot in ``zone``."""
        return self._call(
            self._stub.ProvisionDisk,
            api.ProvisionDiskRequest(parent=cache_name(name), zone=zone, holder=holder, disk_id=disk_id),
            returns=pb.Disk,
        )

    def release_disk(self, disk_name: str) -> bool:
        """Release a disk; False if it was released already."""
        return self._call(
            self._stub.ReleaseDisk, api.ReleaseDiskRequest(name=disk_name), returns=api.ReleaseDiskResponse
        ).released

    # -- following one cache --

    def follow(
        self,
        cache: pb.ImageCache,
        *,
        settled: Callable[[pb.ImageCache], bool],
        timeout_seconds: float,
        observer: Observer,
    ) -> Followed:
        """Watch ``cache`` from its revision until ``settled`` says so, it is deleted, or time runs out.

        A stream the server ends (a restart, a shutdown) is resumed from the last revision seen;
        a compacted revision is recovered by reading the cache again. Raises `WaitTimeout` and
        `RpcFailure`.
        """
        deadline = time.monotonic() + timeout_seconds
        latest = cache
        position = cache.revision
        observer.update(latest)
        if settled(latest):
            return Followed(latest)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(latest, timeout_seconds)
            stream = self._stub.WatchImageCaches(
                api.WatchImageCachesRequest(name=latest.name, start_revision=position), timeout=remaining
            )
            try:
                for response in self._responses(stream, timeout_seconds=remaining):
                    position = max(position, response.revision)
                    if response.type == api.WatchImageCachesResponse.PROGRESS:
                        observer.tick()
                        continue
                    latest = response.image_cache
                    if response.type == api.WatchImageCachesResponse.DELETE:
                        return Followed(latest, deleted=True)
                    observer.update(latest)
                    if settled(latest):
                        return Followed(latest)
            except RpcFailure as failure:
                if failure.code is grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise WaitTimeout(latest, timeout_seconds) from None
                if failure.reason != "REVISION_COMPACTED":
                    raise
                log.info("watch revision %d compacted; reading %s again", position, latest.name)
                latest = self.get(latest.name)
                position = latest.revision
                observer.update(latest)
                if settled(latest):
                    return Followed(latest)
                continue
            finally:
                stream.cancel()
            log.info("the registry ended the watch of %s; resuming from revision %d", latest.name, position)
            time.sleep(_RECONNECT_PAUSE_SECONDS)

    def _responses(
        self, stream: Iterator[api.WatchImageCachesResponse], *, timeout_seconds: float
    ) -> Iterator[api.WatchImageCachesResponse]:
        try:
            yield from stream
        except grpc.RpcError as error:
            raise self._failure(error, timeout_seconds) from None

    def _failure(self, error: grpc.RpcError, timeout_seconds: float) -> RpcFailure:
        return RpcFailure.from_error(error, address=self.address, timeout_seconds=timeout_seconds)


def _path(value: object) -> Path | None:
    return Path(str(value)).expanduser() if value else None


def client_security(args: argparse.Namespace) -> ClientSecurity:
    """How this command reaches a server, from the global ``--tls-ca``/``--token``/... options."""
    security = ClientSecurity(
        ca=_path(getattr(args, "tls_ca", "")),
        cert=_path(getattr(args, "client_cert", "")),
        key=_path(getattr(args, "client_key", "")),
        server_name=getattr(args, "tls_server_name", ""),
        token=getattr(args, "token", ""),
        token_file=_path(getattr(args, "client_token_file", "")),
    )
    try:
        security.validate()
    except ValueError as exc:
        raise CommandFailed(f"invalid client security options: {exc}", exit_code=2) from exc
    return security


class CommandFailed(Exception):
    """A command could not do its job for a reason already explained in ``message``."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def failure_lines(error: RpcFailure | WaitTimeout | CommandFailed) -> list[str]:
    """What stderr says when a command fails: ``error: ...`` first, details indented below."""
    if isinstance(error, RpcFailure):
        return error.lines()
    if isinstance(error, WaitTimeout):
        cache = error.cache
        state = pb.ImageCache.State.Name(cache.state)
        phase = pb.BuildProgress.Phase.Name(cache.progress.phase)
        return [f"error: {error} (still {state}, phase {phase})"]
    return [f"error: {line}" if i == 0 else f"  {line}" for i, line in enumerate(error.message.splitlines())]
