"""``WWW-Authenticate`` challenges of OCI registries (RFC 7235 syntax), shared by every registry client.

A registry answers 401 with one or more challenges: ``Basic realm="..."`` or the Docker token
protocol's ``Bearer realm="...",service="...",scope="..."`` (plus ``error="insufficient_scope"``
when a token did not grant enough). Every client of a registry (the cache builder, the node
agent's pass-through) must read them the same way, hence one parser on the ground floor. Pure:
no HTTP library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Challenge", "parse_www_authenticate", "preferred_challenge"]

_AUTH_SCHEME = re.compile(r"[\s,]*([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)")
_AUTH_PARAM = re.compile(r"[\s,]*([A-Za-z0-9!#$%&'*+.^_`|~-]+)\s*=\s*(\"(?:[^\"\\]|\\.)*\"|[^\s,\"]*)")


@dataclass(frozen=True, slots=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: scheme (lower-case) and parameters (keys lower-case)."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)


def parse_www_authenticate(values: Sequence[str]) -> list[Challenge]:
    """Every challenge in the given ``WWW-Authenticate`` header values."""
    challenges: list[Challenge] = []
    for header in values:
        pos = 0
        while pos < len(header):
            scheme = _AUTH_SCHEME.match(header, pos)
            if scheme is None:
                break
            pos = scheme.end()
            params: dict[str, str] = {}
            while (param := _AUTH_PARAM.match(header, pos)) is not None:
                raw = param.group(2)
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                params[param.group(1).lower()] = raw
                pos = param.end()
            challenges.append(Challenge(scheme.group(1).lower(), params))
            if header[pos:].strip(" ,") == "":
                break
    return challenges


def preferred_challenge(challenges: Sequence[Challenge]) -> Challenge | None:
    """The challenge a registry client answers: Bearer before Basic; ``None`` if neither is offered."""
    return next((c for c in challenges if c.scheme == "bearer"), None) or next(
        (c for c in challenges if c.scheme == "basic"), None
    )
