"""Keep something in sync with a Kubernetes collection: list, then watch, relist on 410 Gone.

Three wings follow a collection the same way (the extender its nodes, the operator its
ImageCaches, the node agent the pods bound to its node), so the loop is written once, here, the
way client-go's reflector does it:

- a full **list** (raw JSON through orjson: deserializing thousands of models costs seconds),
  handed whole to the target, which replaces what it held;
- a **watch** from the list's resourceVersion, bookmarks on, each event handed to the target;
  a watch that ends (its timeout, a dropped connection) resumes from the last version seen,
  without a list;
- an ERROR event or answer with code **410 Gone** (the version was compacted away) means relist,
  at once and once, not a loop on the dead version;
- anything else (403 without RBAC, 404 without a CRD, the apiserver unreachable, a bug in the
  target) is logged and retried with exponential backoff; a target that raised gets a fresh list,
  since what it holds may be half-applied.

The target decides what an object means to it; this module never interprets one beyond its
metadata. One thread per loop; ``stop`` ends the watch at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import orjson
import urllib3
from kubernetes import watch as kube_watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

GONE = 410


class ListWatchTarget(Protocol):
    """What a `ListWatch` keeps in sync."""

    def replace(self, items: Sequence[Mapping[str, Any]]) -> None:
        """A full list: the collection is exactly these objects now."""

    def apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        """One watch event: ``kind`` is ADDED, MODIFIED or DELETED (bookmarks never reach here)."""


class ListWatch:
    """Follows one collection into a target, in a thread of its own."""

    def __init__(
        self,
        list_call: Callable[..., Any],
        target: ListWatchTarget,
        *,
        what: str,
        list_args: Sequence[Any] = (),
        list_kwargs: Mapping[str, Any] | None = None,
        watch_timeout_seconds: int = 60,
        retry_seconds: float = 1.0,
        max_retry_seconds: float = 30.0,
    ) -> None:
        """``list_call(*list_args, **list_kwargs)`` lists the collection (a generated client's
        ``list_*`` method); ``what`` names it in logs and the thread's name."""
        self._list_call = list_call
        self._list_args = tuple(list_args)
        self._list_kwargs = dict(list_kwargs or {})
        self._target = target
        self.what = what
        self._watch_timeout = watch_timeout_seconds
        self._retry = retry_seconds
        self._max_retry = max_retry_seconds
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: kube_watch.Watch | None = None
        self.make_watch: Callable[[], kube_watch.Watch] = kube_watch.Watch  # a seam for tests
        self.relists = 0  # lists done, the first included

    def synced(self) -> bool:
        """True once the first list has reached the target."""
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        """Wait for the first list."""
        return self._synced.wait(timeout)

    def start(self) -> None:
        """Start following."""
        self._thread = threading.Thread(target=self.run, name=f"list-watch-{self.what}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop following: the watch ends now; waits (bounded) for the thread."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()  # type: ignore[no-untyped-call]
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def run(self) -> None:
        """The loop (what the thread runs): list, watch, resume or relist, until stopped."""
        version = ""
        failures = 0
        while not self._stopping.is_set():
            try:
                if not version:
                    version = self.list_once()
                version = self.watch_once(version)
                failures = 0
                continue
            except ApiException as exc:
                if self._stopping.is_set():
                    break
                if exc.status == GONE:
                    log.info("%s: watch expired (410 Gone); relisting", self.what)
                    version = ""
                    continue
                log.warning("%s: Kubernetes API error %s %s; retrying", self.what, exc.status, exc.reason)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                if self._stopping.is_set():
                    break
                log.warning(
                    "%s: cannot reach the Kubernetes API (%s); retrying", self.what, type(exc).__name__
                )
            except Exception:  # outlive a bug in the target: relist and go on
                log.exception("%s: following failed; relisting", self.what)
                version = ""
            failures += 1
            self._stopping.wait(min(self._retry * 2 ** min(failures - 1, 10), self._max_retry))

    def list_once(self) -> str:
        """One full list into the target; returns its resourceVersion."""
        response = self._list_call(
            *self._list_args, **self._list_kwargs, _preload_content=False, _request_timeout=60
        )
        document = orjson.loads(response.data)
        items = document.get("items") or []
        self._target.replace(items)
        self.relists += 1
        self._synced.set()
        version = str((document.get("metadata") or {}).get("resourceVersion") or "")
        log.info("%s: listed %d at resourceVersion %s", self.what, len(items), version)
        return version

    def watch_once(self, version: str) -> str:
        """One watch from ``version`` until it ends; returns the last version seen.

        Raises ApiException(410) when the apiserver no longer has ``version``."""
        self._watch = self.make_watch()
        for event in self._watch.stream(  # type: ignore[no-untyped-call]
            self._list_call,
            *self._list_args,
            **self._list_kwargs,
            resource_version=version,
            timeout_seconds=self._watch_timeout,
            allow_watch_bookmarks=True,
            _request_timeout=self._watch_timeout + 10,
        ):
            if self._stopping.is_set():
                break
            kind = str(event.get("type"))
            raw: Mapping[str, Any] = event.get("raw_object") or {}
            if kind == "ERROR":
                raise ApiException(status=int(raw.get("code") or 500), reason=str(raw.get("reason")))
            version = str((raw.get("metadata") or {}).get("resourceVersion") or version)
            if kind == "BOOKMARK":
                continue
            self._target.apply(kind, raw)
        return version
