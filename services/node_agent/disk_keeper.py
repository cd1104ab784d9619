"""Keeps this node's disks in line with what its pods want, through the registry (``disk_plans``).

One ``reconcile`` per round: the plan from the pods' wanted caches and the disks held, then the
registry calls it asks for. A provisioning the registry refuses (the snapshot is not in this
zone yet, the zone is at capacity, the cache is not READY) is retried after ``retry_seconds``
and meanwhile the pods pull through the mirror as if no cache existed; a release that fails is
tried again next round, so a disk is never forgotten while the agent runs. After a restart,
``recover`` finds the node's disks again by their ids (``disk_id_for``: cache and node), from
the names under the disk root, so nothing is leaked by a crash.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from services.node_agent.disk_plans import DiskPlan, NodeDisk, disk_id_for, plan_disks

log = logging.getLogger(__name__)

_CACHE_PREFIX = re.compile(r"imc-[a-z0-9]{8}")


class DiskRefusal(Exception):
    """The registry refused (or could not be reached for) a disk call."""

    def __init__(self, *, code: str, reason: str, message: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code} {reason}: {message}" if reason else f"{code}: {message}")


class DiskPort(Protocol):
    """What the keeper needs of the registry (``registry_disks.RegistryDisks``)."""

    def provision(self, *, cache_id: str, zone: str, disk_id: str) -> str:
        """Make (or find) the disk; return its location. Raises ``DiskRefusal``."""
        ...

    def release(self, *, cache_id: str, disk_id: str) -> bool:
        """Release the disk; ``False`` if it was already gone. Raises ``DiskRefusal``."""
        ...


class DiskKeeper:
    """This node's disks: which it holds, and the registry calls that keep them as the pods want."""

    def __init__(
        self,
        *,
        registry: DiskPort,
        node: str,
        zone: str,
        grace_seconds: float = 300.0,
        retry_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_provisioned: Callable[[str, float], None] = lambda _cache, _seconds: None,
        on_refused: Callable[[str, DiskRefusal], None] = lambda _cache, _refusal: None,
    ) -> None:
        self._registry = registry
        self.node = node
        self.zone = zone
        self._grace = grace_seconds
        self._retry = retry_seconds
        self._clock = clock
        self._disks: dict[str, NodeDisk] = {}  # disk id -> disk
        self._retry_at: dict[str, float] = {}  # cache id -> when to try provisioning again
        self._refusals: dict[str, DiskRefusal] = {}  # cache id -> why its last provisioning failed
        self._on_provisioned = on_provisioned
        self._on_refused = on_refused
        self._lock = threading.Lock()

    @property
    def disk_ids(self) -> frozenset[str]:
        """The disks this node holds (the mirror serves these and no others)."""
        with self._lock:
            return frozenset(self._disks)

    @property
    def cache_ids(self) -> frozenset[str]:
        """The caches this node holds a disk of."""
        with self._lock:
            return frozenset(d.cache_id for d in self._disks.values())

    def disk_of(self, cache_id: str) -> str | None:
        """The id of this node's disk of ``cache_id``, if it holds one."""
        with self._lock:
            return next((d.disk_id for d in self._disks.values() if d.cache_id == cache_id), None)

    def refusal(self, cache_id: str) -> DiskRefusal | None:
        """Why the last provisioning of ``cache_id`` failed; None once one succeeds (or none failed)."""
        with self._lock:
            return self._refusals.get(cache_id)

    def recover(self, names: Iterable[str]) -> list[str]:
        """Adopt the disks among ``names`` (a disk root's entries) that are this node's; return them."""
        adopted = []
        for name in names:
            cache = _CACHE_PREFIX.match(name)
            if cache is not None and disk_id_for(cache_id=cache.group(0), node=self.node) == name:
                with self._lock:
                    self._disks.setdefault(name, NodeDisk(cache_id=cache.group(0), disk_id=name))
                adopted.append(name)
        return adopted

    def reconcile(self, wanted: Mapping[str, str]) -> DiskPlan:
        """One round: ``wanted`` maps each pod on the node (uid) to its cache id (``""``: none)."""
        now = self._clock()
        with self._lock:
            plan = plan_disks(
                wanted=wanted,
                disks=list(self._disks.values()),
                now=now,
                grace_seconds=self._grace,
                retry_at=self._retry_at,
            )
            self._disks = {disk.disk_id: disk for disk in plan.keep}
            wanted_caches = set(wanted.values())
            for cache_id in [c for c in self._refusals if c not in wanted_caches]:
                del self._refusals[cache_id]
                self._retry_at.pop(cache_id, None)
        for disk in plan.release:
            try:
                self._registry.release(cache_id=disk.cache_id, disk_id=disk.disk_id)
            except DiskRefusal as exc:  # kept, so the next round tries again
                log.warning("releasing disk %s failed (%s); will retry", disk.disk_id, exc)
                with self._lock:
                    self._disks.setdefault(disk.disk_id, disk)
                continue
            log.info("released disk %s of %s (unused for %.0f s)", disk.disk_id, disk.cache_id, self._grace)
        for cache_id in plan.provision:
            disk_id = disk_id_for(cache_id=cache_id, node=self.node)
            started = self._clock()
            try:
                location = self._registry.provision(cache_id=cache_id, zone=self.zone, disk_id=disk_id)
            except DiskRefusal as exc:  # its pods pull meanwhile
                log.warning(
                    "no disk of %s in zone %s (%s); pods pull until a retry works", cache_id, self.zone, exc
                )
                with self._lock:
                    self._retry_at[cache_id] = now + self._retry
                    self._refusals[cache_id] = exc
                self._on_refused(cache_id, exc)
                continue
            with self._lock:
                self._disks[disk_id] = NodeDisk(cache_id=cache_id, disk_id=disk_id)
                self._retry_at.pop(cache_id, None)
                self._refusals.pop(cache_id, None)
            self._on_provisioned(cache_id, self._clock() - started)
            log.info(
                "disk %s of %s provisioned at %s in %.2f s",
                disk_id,
                cache_id,
                location,
                self._clock() - started,
            )
        return plan
