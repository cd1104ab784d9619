"""Never hand a client a complete blob that fails its digest.

A blob is streamed (a layer can be gigabytes; reading it twice, once to check and once to send,
would double the disk traffic and the time to first byte). The length is announced up front, so
a bad blob cannot be turned into an error status once bytes are flowing; instead the last chunk
is held back until the whole content has been hashed. If the digest matches, it is sent and the
response is complete; if not, it is never sent and the connection is closed: the client sees a
truncated body and fails that fetch (containerd and skopeo both check length and digest), then
retries; the mirror has marked the copy bad and the retry gets the blob from elsewhere.
Pure: chunks in, a write callback out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable


class DigestMismatch(Exception):
    """The content did not hash to its digest (or had another size than announced)."""

    def __init__(self, *, digest: str, actual: str, size: int, expected_size: int | None) -> None:
        self.digest = digest
        self.actual = actual
        self.size = size
        self.expected_size = expected_size
        expected = f" (expected {expected_size})" if expected_size is not None else ""
        super().__init__(f"content of {digest} hashes to {actual}, {size} bytes{expected}")


def hasher_for(digest: str) -> hashlib._Hash:
    """A fresh hash object for ``digest``'s algorithm (sha256 or sha512)."""
    algorithm, _, _ = digest.partition(":")
    if algorithm not in ("sha256", "sha512"):
        raise ValueError(f"unsupported digest algorithm {algorithm[:20]!r}")
    return hashlib.new(algorithm)


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    """``algorithm:hex`` of ``data``."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def relay_verified(
    chunks: Iterable[bytes], *, digest: str, expected_size: int | None, write: Callable[[bytes], None]
) -> int:
    """Write ``chunks`` through ``write``, holding the last one back until ``digest`` verified.

    Returns the bytes written. Raises ``DigestMismatch`` with the last chunk unsent when the
    content does not match ``digest`` or ``expected_size`` (checked as soon as it is exceeded).
    """
    hasher = hasher_for(digest)
    algorithm = digest.partition(":")[0]
    held = b""
    size = 0
    for chunk in chunks:
        if not chunk:
            continue
        size += len(chunk)
        hasher.update(chunk)
        if expected_size is not None and size > expected_size:
            raise DigestMismatch(
                digest=digest, actual="(longer than announced)", size=size, expected_size=expected_size
            )
        if held:
            write(held)
        held = chunk
    actual = f"{algorithm}:{hasher.hexdigest()}"
    if actual != digest or (expected_size is not None and size != expected_size):
        raise DigestMismatch(digest=digest, actual=actual, size=size, expected_size=expected_size)
    if held:
        write(held)
    return size
