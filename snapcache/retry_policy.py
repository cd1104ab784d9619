"""How every snapcache client retries: gRPC's built-in retries, for the calls that are safe to repeat.

A refused or failed call is retried by the channel itself (gRFC A6): up to `MAX_ATTEMPTS` in all,
after a random wait of up to 50 ms, 100 ms, 200 ms... capped at 1 s (jittered exponential
backoff), never past the call's deadline, and sooner or later when the server's
`grpc-retry-pushback-ms` says so (snapcache's servers send their jittered RetryInfo delay there
when they refuse a call as OVERLOADED, `snapcache.rpc_admission`). Retried codes: UNAVAILABLE (a
server or its database briefly away) and RESOURCE_EXHAUSTED (a server at its bound of calls in
flight). Only reads are retried
this way, and matching (a pure read of the index); writes are retried by their callers, which
choose ids so a repeat is recognised (ALREADY_EXISTS) rather than applied twice.
"""

from __future__ import annotations

import json
from typing import Any, Final

MAX_ATTEMPTS: Final = 4
RETRIED_CODES: Final = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
IDEMPOTENT_METHODS: Final = {
    "snapcache.v1.CacheRegistryService": (
        "GetImageCache",
        "ListImageCaches",
        "ListImageCacheEvents",
        "ListDisks",
        "WatchImageCaches",  # retried only until its first message, as every stream
    ),
    "snapcache.v1.MatcherService": ("MatchImageCaches", "GetIndexStatus"),
}


def service_config(retried_codes: tuple[str, ...] = RETRIED_CODES) -> dict[str, Any]:
    """The channel's service config: the retry policy for the idempotent methods."""
    return {
        "methodConfig": [
            {
                "name": [{"service": service, "method": method} for method in methods],
                "retryPolicy": {
                    "maxAttempts": MAX_ATTEMPTS,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": list(retried_codes),
                },
            }
            for service, methods in IDEMPOTENT_METHODS.items()
        ]
    }


def channel_options(retried_codes: tuple[str, ...] = RETRIED_CODES) -> list[tuple[str, Any]]:
    """Options that turn the policy on for a channel (``retried_codes``: which failures to retry)."""
    if not retried_codes:
        return []
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(service_config(retried_codes)))]
