"""Opaque page tokens (AIP-158): a cursor the client hands back unchanged.

A token is base64url(JSON cursor + checksum). The checksum covers the cursor and the request
scope (method and filter), so a token that was edited, truncated or reused with another filter is
refused with INVALID_ARGUMENT instead of silently returning a wrong page. It is not a secret:
forging a valid token only moves your own cursor.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from snapcache.errors import FieldViolation, InvalidArgument

_VERSION = 1


def _checksum(payload: bytes, scope: str) -> str:
    return hashlib.sha256(payload + b"\x00" + scope.encode()).hexdigest()[:16]


def encode(cursor: Mapping[str, Any], *, scope: str) -> str:
    """An opaque token for ``cursor``, valid only for requests of the same ``scope``."""
    payload = json.dumps({"v": _VERSION, **cursor}, separators=(",", ":"), sort_keys=True).encode()
    body = payload + b"." + _checksum(payload, scope).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def decode(
    token: str, *, scope: str, field: str = "page_token", expect: Mapping[str, type] | None = None
) -> dict[str, Any]:
    """The cursor inside ``token``; INVALID_ARGUMENT if it was not issued for this scope.

    The checksum only tells a token from another scope or a typo; it is no signature, so anyone
    can make one: ``expect`` names the cursor's keys and types (an int in 0..2**63-1, as SQL
    takes), and a cursor with a key of another type is refused like any bad token.
    """

    def bad(why: str) -> InvalidArgument:
        return InvalidArgument(
            reason="INVALID_PAGE_TOKEN",
            message=f"{field}: {why}; start again without a page token",
            violations=(FieldViolation(field, why),),
        )

    if len(token) > 4096:
        raise bad("page token too long")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise bad("page token is not valid") from None
    payload, sep, checksum = raw.rpartition(b".")
    if not sep or checksum.decode("ascii", "replace") != _checksum(payload, scope):
        raise bad("page token is not valid for this request (tampered, or the filter changed)")
    try:
        cursor = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the stack
        raise bad("page token is not valid") from None
    if not isinstance(cursor, dict) or cursor.pop("v", None) != _VERSION:
        raise bad("page token is from an incompatible server version")
    for key, kind in (expect or {}).items():
        if key in cursor and not _is(cursor[key], kind):
            raise bad("page token is not valid")
    return cursor


def _is(value: object, kind: type) -> bool:
    if kind is int:
        return type(value) is int and 0 <= value < 2**63  # not bool; in SQL's range
    return isinstance(value, kind)
