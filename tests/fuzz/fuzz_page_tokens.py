"""Coverage-guided fuzzing of page-token decoding (`snapcache.page_tokens`) with atheris.

A token is base64url(JSON cursor + checksum), and the checksum is no signature: anyone can make a
token that passes it. So half the inputs are forged that way (the fuzzer's bytes as the payload,
with a correct checksum) and reach the JSON and type checks; the other half are raw token text.
Holds: decoding answers a cursor whose ``after`` is an int in SQL's range, or `InvalidArgument`
with reason INVALID_PAGE_TOKEN; nothing else (no RecursionError, no UnicodeError, no INTERNAL).
"""

from __future__ import annotations

import base64
import sys

import atheris

with atheris.instrument_imports():
    from snapcache import page_tokens
    from snapcache.errors import InvalidArgument

SCOPE = "events:imc-abcdefgh"


def _forged(payload: bytes) -> str:
    body = payload + b"." + page_tokens._checksum(payload, SCOPE).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def test_one_input(data: bytes) -> None:
    """One input: its first byte says forged payload or raw token text."""
    provider = atheris.FuzzedDataProvider(data)
    forge = provider.ConsumeBool()
    if forge:
        token = _forged(provider.ConsumeBytes(provider.remaining_bytes()))
    else:
        token = provider.ConsumeUnicodeNoSurrogates(provider.remaining_bytes())
    try:
        cursor = page_tokens.decode(token, scope=SCOPE, expect={"after": int})
    except InvalidArgument as exc:
        if exc.reason != "INVALID_PAGE_TOKEN":
            raise AssertionError(f"unexpected reason {exc.reason}") from exc
        return
    after = cursor.get("after", 0)
    if type(after) is not int or not 0 <= after < 2**63:
        raise AssertionError(f"decoded a cursor of the wrong type: {cursor!r}")
    if page_tokens.decode(page_tokens.encode(cursor, scope=SCOPE), scope=SCOPE) != cursor:
        raise AssertionError(f"{cursor!r} does not round-trip")


def main() -> None:
    """libFuzzer's command line (``-runs``, ``-max_total_time``, ``-rss_limit_mb``, corpus dirs)."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
