"""containerd's snapshots and leases services, as the snapshot seeder uses them: the edge to the runtime.

gRPC over containerd's socket (``unix:///run/containerd/containerd.sock``), in one containerd
namespace (the CRI plugin's ``k8s.io``) and one snapshotter (the CRI plugin's, ``overlayfs``):
both travel with every call, the namespace as the ``containerd-namespace`` header and the lease
as ``containerd-lease``, which is how containerd ties what a call creates to a lease (its
garbage collector keeps leased snapshots, and drops them once the lease is gone or expired).
The messages are the wire-compatible subset in ``protos/snapcache/containerd``.

Every failure is a ``RuntimeUnavailable`` (the seeder then leaves the image to the kubelet's
pull), except the two answers the seeder acts on: a snapshot not found (``exists`` is False) and
a commit that lost to another writer of the same name (``commit`` is False).
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from snapcache.containerd import leases_pb2, leases_pb2_grpc, snapshots_pb2, snapshots_pb2_grpc

EXPIRE_LABEL: Final = "containerd.io/gc.expire"  # a lease with it is collected once the time has passed


class RuntimeUnavailable(Exception):
    """containerd could not do what was asked (down, refused, or too slow)."""


@dataclass(frozen=True, slots=True)
class Mount:
    """One mount of a prepared snapshot, as containerd describes it (``mount(8)`` terms)."""

    type: str
    source: str
    options: tuple[str, ...]


class ContainerdSnapshots:
    """One containerd namespace's snapshotter and leases, over the runtime's socket."""

    def __init__(
        self,
        address: Path,
        *,
        namespace: str = "k8s.io",
        snapshotter: str = "overlayfs",
        timeout_seconds: float = 10.0,
    ) -> None:
        self.snapshotter = snapshotter
        self._namespace = namespace
        self._timeout = timeout_seconds
        # containerd's socket is local: no proxy, and messages small
        self._channel = grpc.insecure_channel(f"unix://{address}", options=[("grpc.enable_http_proxy", 0)])
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)
        self._leases = leases_pb2_grpc.LeasesStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _metadata(self, lease: str = "") -> tuple[tuple[str, str], ...]:
        if lease:
            return (("containerd-namespace", self._namespace), ("containerd-lease", lease))
        return (("containerd-namespace", self._namespace),)

    def create_lease(self, *, expire_seconds: float, labels: dict[str, str] | None = None) -> str:
        """A new lease that containerd forgets (with what it holds) ``expire_seconds`` from now."""
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=expire_seconds)
        all_labels = {EXPIRE_LABEL: expires.strftime("%Y-%m-%dT%H:%M:%SZ"), **(labels or {})}
        request = leases_pb2.CreateRequest(id=f"snapcache-seed-{uuid.uuid4().hex}", labels=all_labels)
        try:
            response = self._leases.Create(request, timeout=self._timeout, metadata=self._metadata())
        except grpc.RpcError as exc:
            raise _unavailable("create a lease", exc) from None
        return str(response.lease.id)

    def delete_lease(self, lease: str) -> None:
        """Drop a lease: what only it held becomes garbage for containerd's collector."""
        try:
            self._leases.Delete(
                leases_pb2.DeleteRequest(id=lease), timeout=self._timeout, metadata=self._metadata()
            )
        except grpc.RpcError as exc:
            if _code(exc) != grpc.StatusCode.NOT_FOUND:
                raise _unavailable("delete a lease", exc) from None

    def exists(self, name: str) -> bool:
        """Whether a snapshot (committed or active) named ``name`` exists."""
        request = snapshots_pb2.StatSnapshotRequest(snapshotter=self.snapshotter, key=name)
        try:
            self._snapshots.Stat(request, timeout=self._timeout, metadata=self._metadata())
        except grpc.RpcError as exc:
            if _code(exc) == grpc.StatusCode.NOT_FOUND:
                return False
            raise _unavailable(f"stat snapshot {name}", exc) from None
        return True

    def prepare(
        self, key: str, parent: str, *, lease: str, labels: dict[str, str] | None = None
    ) -> list[Mount]:
        """An active snapshot ``key`` on ``parent`` ("" for none), held by ``lease``; its mounts."""
        request = snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}
        )
        try:
            response = self._snapshots.Prepare(request, timeout=self._timeout, metadata=self._metadata(lease))
        except grpc.RpcError as exc:
            raise _unavailable(f"prepare snapshot {key}", exc) from None
        return [Mount(m.type, m.source, tuple(m.options)) for m in response.mounts]

    def commit(self, name: str, key: str, *, lease: str, labels: dict[str, str] | None = None) -> bool:
        """Commit active snapshot ``key`` as ``name``; False when ``name`` exists already."""
        request = snapshots_pb2.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=labels or {}
        )
        try:
            self._snapshots.Commit(request, timeout=self._timeout, metadata=self._metadata(lease))
        except grpc.RpcError as exc:
            if _code(exc) == grpc.StatusCode.ALREADY_EXISTS:
                return False
            raise _unavailable(f"commit snapshot {key} as {name}", exc) from None
        return True

    def remove(self, key: str) -> None:
        """Remove a snapshot; one already gone is not an error."""
        request = snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key)
        try:
            self._snapshots.Remove(request, timeout=self._timeout, metadata=self._metadata())
        except grpc.RpcError as exc:
            if _code(exc) != grpc.StatusCode.NOT_FOUND:
                raise _unavailable(f"remove snapshot {key}", exc) from None


def _code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(exc, "code", None)
    return code() if callable(code) else None


def _unavailable(what: str, exc: grpc.RpcError) -> RuntimeUnavailable:
    details = getattr(exc, "details", None)
    text = details() if callable(details) else str(exc)
    return RuntimeUnavailable(f"containerd could not {what}: {_code(exc)}: {text}")
