"""Which disks this node should hold: one per cache its pods use, released after a grace period.

The next step of the node agent (not wired yet: the mirror serves whatever disks are under its
root today). Each round, the agent's loop gives this function what its pods want (pod uid ->
the cache the matcher chose for it, from the pod watch) and the disks the node holds, and gets
back which caches need a disk and which disks to release:

- **one disk per cache per node**, shared by every pod that uses the cache: provisioning is
  keyed by a disk id derived from (cache, node), so the registry's idempotent ``ProvisionDisk``
  makes a retried or concurrent call, or an agent restarted mid-call, land on the same disk;
- a disk nobody uses is kept for ``grace_seconds`` (a pod replaced by its Deployment, a Job's
  next pod, a crash-looping pod must not pay a provisioning each time), then released;
- a cache whose provisioning failed is not asked again before its ``retry_at``: meanwhile its
  pods simply pull (the mirror passes through), which is the failure mode the issue asks for.

Pure: plain values in and out; time is a number the caller passes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Final

_NOT_ID: Final = re.compile(r"[^a-z0-9-]+")
_MAX_DISK_ID: Final = 63  # the registry's disk id grammar: 1-63 lowercase letters, digits or '-'
_NODE_HASH: Final = 8


def disk_id_for(*, cache_id: str, node: str) -> str:
    """The id of ``node``'s disk of ``cache_id``: stable, readable, and unique per (cache, node).

    ``imc-0000000b-worker-3-1a2b3c4d``: the cache, the node name made to fit the grammar (cut
    short if need be), and a hash of the full node name, so two names that read the same once
    cut or folded (``a.b`` and ``a-b``) still get two disks.
    """
    digest = hashlib.sha256(node.encode()).hexdigest()[:_NODE_HASH]
    room = _MAX_DISK_ID - len(cache_id) - len(digest) - 2
    slug = _NOT_ID.sub("-", node.lower()).strip("-")[: max(room, 0)].strip("-")
    return "-".join(part for part in (cache_id, slug, digest) if part)


@dataclass(frozen=True, slots=True)
class NodeDisk:
    """A disk this node holds (or is provisioning)."""

    cache_id: str
    disk_id: str
    idle_since: float | None = None  # when the last pod using it went away; None while in use


@dataclass(frozen=True, slots=True)
class DiskPlan:
    """What to do this round."""

    provision: tuple[str, ...] = ()  # caches that need a disk on this node (ids, sorted)
    release: tuple[NodeDisk, ...] = ()  # disks idle past the grace period (or duplicates)
    keep: tuple[NodeDisk, ...] = ()  # disks kept, with their idle clocks brought up to date


def plan_disks(
    *,
    wanted: Mapping[str, str],
    disks: Iterable[NodeDisk],
    now: float,
    grace_seconds: float,
    retry_at: Mapping[str, float] | None = None,
) -> DiskPlan:
    """The round's plan from ``wanted`` (pod uid -> cache id, ``""`` for none) and the node's disks.

    ``retry_at`` maps a cache whose last provisioning failed to when it may be tried again.
    """
    needed = {cache_id for cache_id in wanted.values() if cache_id}
    keep: list[NodeDisk] = []
    release: list[NodeDisk] = []
    covered: set[str] = set()
    for disk in sorted(disks, key=lambda d: (d.cache_id, d.disk_id)):
        if disk.cache_id in needed and disk.cache_id not in covered:
            covered.add(disk.cache_id)
            keep.append(replace(disk, idle_since=None))
            continue
        idle_since = disk.idle_since if disk.idle_since is not None else now
        if now - idle_since >= grace_seconds:
            release.append(disk)
        else:
            keep.append(replace(disk, idle_since=idle_since))
    retry = retry_at or {}
    provision = tuple(sorted(c for c in needed - covered if retry.get(c, now) <= now))
    return DiskPlan(provision=provision, release=tuple(release), keep=tuple(keep))
