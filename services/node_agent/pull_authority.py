"""Who may have a private image from a disk: whoever the image's own registry lets pull it.

A disk holds what the cache registry pulled, private images included (built with credentials
the registry was given). Served to anyone who reaches the mirror, such an image would be handed
to pods that could not pull it themselves. The rule (docs/security.md, the matcher's
``pull_access``) decides which pods get a disk; the mirror enforces it per request, keeping the
upstream registry the authority:

- a repository the cache recorded as private (``CachedImage.requires_credentials``) is served
  from a disk only to a request carrying an ``Authorization`` the registry accepts for it;
- the check is one ``HEAD`` of the very path asked for (manifest or blob) at the registry with
  the client's ``Authorization``: a 2xx allows, anything else refuses. Verdicts are cached per
  (credential, repository): an allowed one for ``allow_seconds`` (a pull's many blob requests
  pay one check), a refused one for ``refuse_seconds``;
- a request refused here, or without credentials, is simply not answered from the disk: it
  passes through to the registry, which answers it (its 401 challenge relayed, so the client
  learns how to authenticate, or its refusal). Nothing private is ever answered from a disk on
  the agent's own say-so; a registry that cannot be reached refuses.

Pure: the registry check is a callable, time a clock. Credentials are kept only as SHA-256 hashes.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable

from snapcache.images import ImageReference

# (registry, path under /v2/, the client's Authorization) -> True only if the registry allows it
RegistryCheck = Callable[[str, str, str], bool]


class PullAuthority:
    """Private repositories on this node's disks, and cached verdicts of the registry on requests."""

    def __init__(
        self,
        check: RegistryCheck,
        *,
        allow_seconds: float = 60.0,
        refuse_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        max_verdicts: int = 4096,
    ) -> None:
        self._check = check
        self._allow_seconds = allow_seconds
        self._refuse_seconds = refuse_seconds
        self._clock = clock
        self._max = max_verdicts
        self._private: frozenset[str] = frozenset()
        self._verdicts: dict[tuple[str, str], tuple[bool, float]] = {}
        self._lock = threading.Lock()

    @property
    def private(self) -> frozenset[str]:
        """``registry/repository`` names served from disks only to clients the registry allows."""
        return self._private

    def set_private(self, names: Iterable[str]) -> None:
        """Replace the private repositories (when the node's disks change)."""
        self._private = frozenset(names)

    def allows(self, image: ImageReference, path: str, authorization: str) -> bool:
        """May this request be answered from a disk? ``path`` is what it asks for, under /v2/."""
        if image.name not in self._private:
            return True
        if not authorization:
            return False
        key = (hashlib.sha256(authorization.encode()).hexdigest(), image.name)
        now = self._clock()
        with self._lock:
            cached = self._verdicts.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        allowed = self._check(image.registry, path, authorization)
        with self._lock:
            if len(self._verdicts) >= self._max:
                self._verdicts = {k: v for k, v in self._verdicts.items() if v[1] > now}
                if len(self._verdicts) >= self._max:
                    self._verdicts.clear()
            ttl = self._allow_seconds if allowed else self._refuse_seconds
            self._verdicts[key] = (allowed, now + ttl)
        return allowed
