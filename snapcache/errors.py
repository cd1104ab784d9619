"""The domain error hierarchy: one table of what can go wrong, free of any transport.

Every error carries an UPPER_SNAKE ``reason`` (stable, machine-readable, documented in the
README) and a human message. ``InvalidArgument`` also carries field violations. The gRPC edge
(`snapcache.rpc_errors`) and the extender's HTTP edge map these classes to codes; nothing else
decides codes, so a reason means the same thing on every wire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

ERROR_DOMAIN = "snapcache.io"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: its path (``image_cache.images[2]``) and why."""

    field: str
    description: str


@dataclass(eq=False)
class SnapcacheError(Exception):
    """Base of every error the services answer with on purpose."""

    reason: str
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)

    def __str__(self) -> str:
        return self.message


@dataclass(eq=False)
class InvalidArgument(SnapcacheError):
    """The request is malformed, whatever the state of the system."""

    violations: Sequence[FieldViolation] = ()


class NotFound(SnapcacheError):
    """The named resource does not exist."""


class AlreadyExists(SnapcacheError):
    """A resource with the client-chosen id exists already."""


class FailedPrecondition(SnapcacheError):
    """The system is not in a state that allows the request (illegal state transition)."""


class Aborted(SnapcacheError):
    """A concurrent change won the race (stale etag / revision); retry read-modify-write."""


class OutOfRange(SnapcacheError):
    """A position (such as a watch revision) is past what the server still holds."""


class ResourceExhausted(SnapcacheError):
    """A quota or capacity is used up, or the server sheds load."""


class Unavailable(SnapcacheError):
    """A dependency is down; the same request may succeed later."""


class PermissionDenied(SnapcacheError):
    """The caller is known but not allowed to do this."""


class Unauthenticated(SnapcacheError):
    """The caller could not be identified."""


def invalid(field_path: str, description: str, *, reason: str = "INVALID_FIELD") -> InvalidArgument:
    """An ``InvalidArgument`` about a single field, the most common case."""
    return InvalidArgument(
        reason=reason,
        message=f"{field_path}: {description}",
        violations=(FieldViolation(field_path, description),),
    )
