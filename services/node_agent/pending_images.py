"""Images a pod on this node will get from a disk that is not attached yet: the mirror waits for them.

The kubelet and the agent see a newly bound pod at the same moment. The agent asks the matcher
and provisions the disk while the kubelet sets up the pod's sandbox, and usually wins; when it
does not, the runtime's first manifest request for the pod's image would pass through to the
registry and the whole image would be downloaded, the disk arriving a moment too late. So each
provisioning round publishes the repositories (``registry/repository``) of the images of the
opted-in pods whose disk is being looked up or provisioned, and the mirror holds a manifest
request for one of them until the round is over (the disk attached, refused, or the pod left to
pull), for at most ``wait_seconds``: a slow provisioning delays a pull by that much at worst, and
never makes it fail. Blobs are not held: the runtime asks for them after the manifest.

Several sources publish, each its own set (``source``): the provisioning rounds (``disks``) and
the snapshot seeder (``runtime``: an image whose layers are being written into containerd, so
that the pull starts once they are there). A repository is pending while any source says so.

Pure: a set and a condition variable, no transport.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable


class PendingImages:
    """The repositories whose disk is on its way, and a wait for them to be settled."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._names: frozenset[str] = frozenset()
        self._by_source: dict[str, frozenset[str]] = {}
        self._changed = threading.Condition()
        self._clock = clock

    @property
    def names(self) -> frozenset[str]:
        """The repositories pending now."""
        return self._names

    def publish(self, names: Iterable[str], *, source: str = "disks") -> None:
        """Replace ``source``'s pending repositories; wake every request waiting for one now settled."""
        with self._changed:
            self._by_source[source] = frozenset(names)
            self._names = frozenset().union(*self._by_source.values())
            self._changed.notify_all()

    def clear(self) -> None:
        """Nothing is pending any more, from any source (the agent is stopping)."""
        with self._changed:
            self._by_source.clear()
            self._names = frozenset()
            self._changed.notify_all()

    def wait(self, name: str, timeout_seconds: float) -> bool | None:
        """Block while ``name`` is pending, at most ``timeout_seconds``.

        ``None``: it was not pending (no wait); ``True``: settled while waiting; ``False``: timed out.
        """
        with self._changed:
            if name not in self._names:
                return None
            deadline = self._clock() + timeout_seconds
            while name in self._names:
                left = deadline - self._clock()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True
