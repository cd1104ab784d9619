"""The lifecycle worker: builds, zone hydration, expiry, deletion, clean-up of failed caches.

Work is found in the database, not in memory, so it survives restarts: a cache in CREATING with no
live lease is built (again), resuming from the blobs its builder disk already holds. Each piece of
work is claimed with a lease on the cache row (owner + expiry, renewed while the work runs), so two
workers on one database never build the same cache; a worker that dies loses its lease when it
expires and another takes over.

Every long provider call happens outside a transaction; results are written back guarded by the
cache's build id, so a build overtaken by a newer spec or a delete is discarded, never applied.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial

from services.cache_registry import lifecycle, store
from services.cache_registry.credential_refs import CredentialResolver, resolve_with_sources
from services.cache_registry.database import Database
from services.cache_registry.feed import CommitSignal
from services.cache_registry.lifecycle import Trigger
from services.cache_registry.model import (
    BuildPhase,
    BuildProgress,
    CachedImage,
    CacheId,
    CacheState,
    CredentialRef,
    EventType,
    ImageCache,
    ZoneAvailability,
    ZoneState,
)
from services.cache_registry.provider import (
    BuildFailure,
    Platform,
    Provider,
    PulledImage,
    PullOptions,
    PullProgress,
)
from services.cache_registry.service import Clock, target_zones
from snapcache.errors import SnapcacheError
from snapcache.images import parse_image_reference

log = logging.getLogger(__name__)

# Our own generator: jitter must not draw from (or disturb) the process-wide `random` state.
_JITTER = random.Random()

# Lost zone copies: how many a reconcile pass re-copies at most, and the share of all copies
# above which the provider's view is distrusted instead (checked once there are enough copies).
LOST_ZONES_PER_PASS = 100
LOST_ZONE_MAX_SHARE = 0.5
LOST_ZONE_MIN_SAMPLE = 10

GIB = 1024**3
# (result: "succeeded" | "retrying" | "failed", seconds the attempt took, compressed bytes pulled)
BuildObserver = Callable[[str, float, int], None]


@dataclass(frozen=True)
class WorkerSettings:
    """Tunables of background lifecycle work."""

    owner: str  # this worker's identity in leases (host/pid/random)
    lease_seconds: float = 30.0
    poll_seconds: float = 2.0
    max_concurrent_builds: int = 2
    max_build_attempts: int = 3  # transient failures (registry unreachable) retry with backoff
    retry_base_seconds: float = 2.0
    failed_cache_ttl: timedelta = timedelta(hours=24)  # ECI keeps failed caches 24 h
    change_log_keep: int = 100_000
    progress_interval_seconds: float = 0.5
    orphan_grace_seconds: float = 60.0
    wire_fill_batch: int = 500  # caches encoded per transaction when filling in wire forms


class _LeaseLost(Exception):
    pass


# Look at expired leases this long after they run out (clock steps between replicas and the
# database's rounding of timestamps).
_LEASE_MARGIN_SECONDS = 0.05


def _access(
    pulled: PulledImage, sources: Mapping[str, CredentialRef]
) -> tuple[bool, tuple[CredentialRef, ...]]:
    """Whether a pulled image is private, and the reference whose credentials pulled it.

    Private when the build used credentials for its registry host and the provider did not see
    that registry serve it anonymously (`PulledImage.anonymous_pull_allowed`, False when unsure).
    """
    source = sources.get(pulled.reference.registry)
    if source is None or pulled.anonymous_pull_allowed:
        return False, ()
    return True, (source,)


class LifecycleWorker:
    """Runs lifecycle work in background threads until stopped."""

    def __init__(
        self,
        *,
        database: Database,
        provider: Provider,
        signal: CommitSignal,
        clock: Clock,
        settings: WorkerSettings,
        resolve_credentials: CredentialResolver,
        encoder: store.CacheEncoder | None = None,
        on_build: BuildObserver | None = None,
    ) -> None:
        self._db = database
        self._on_build = on_build  # metrics: one call per finished build attempt
        self._provider = provider
        self._signal = signal
        self._clock = clock
        self._settings = settings
        self._resolve_credentials = resolve_credentials
        self._zones = tuple(z.name for z in provider.zones())
        self._pool = ThreadPoolExecutor(
            max_workers=settings.max_concurrent_builds, thread_name_prefix="build"
        )
        self._running: dict[str, Future[None]] = {}
        self._lost: set[str] = set()  # running work whose lease the keeper could not renew
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._keeper: threading.Thread | None = None
        self._orphans_seen: dict[str, float] = {}
        self._last_housekeeping = 0.0
        self._encoder = encoder  # the wire form written with each version (see store)
        self._wire_filled = encoder is None

    # --- running -----------------------------------------------------------------------------

    def start(self) -> None:
        """Reconcile with the provider, then start the loop thread."""
        self.reconcile(startup=True)
        self._thread = threading.Thread(target=self._loop, name="lifecycle", daemon=True)
        self._thread.start()
        self._keeper = threading.Thread(target=self._keep_leases, name="lease-keeper", daemon=True)
        self._keeper.start()

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop taking work and wait for running work (which stops at its next check)."""
        self._stop.set()
        self._signal.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._keeper is not None:
            self._keeper.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            seen = self._signal.generation
            wait = self._settings.poll_seconds
            try:
                wait = self.run_once()
            except SnapcacheError as exc:
                log.warning("lifecycle pass failed: %s", exc.message)
            except Exception:
                log.exception("lifecycle pass failed")
            self._signal.wait(seen=seen, timeout=wait)

    def _keep_leases(self) -> None:
        """Renew the lease of every running piece of work, whatever it is doing.

        Progress renews leases too, but a pull can stall (a registry that stops answering) for
        longer than a lease: without this, another replica would take the build over while this
        one still runs it. A lease this replica cannot renew (the database says another owner
        has it) stops that work at its next check.
        """
        period = max(self._settings.lease_seconds / 3, 0.05)
        while not self._stop.wait(period):
            for cache_id, future in list(self._running.items()):
                if future.done() or cache_id in self._lost:
                    continue
                try:
                    self._renew(cache_id)
                except _LeaseLost:
                    log.warning("lease on %s taken by another owner; stopping that work", cache_id)
                    self._lost.add(cache_id)
                except SnapcacheError as exc:  # the database is away: progress will try again
                    log.warning("lease on %s not renewed: %s", cache_id, exc.message)
                except Exception:
                    log.exception("lease keeper failed on %s", cache_id)

    def run_once(self) -> float:
        """One pass: start due work, run housekeeping now and then; return when to look again.

        That is `poll_seconds`, or sooner when another owner's lease on work runs out (a replica
        that died): its work is taken over as soon as the lease allows, not at the next poll.
        """
        self._running = {k: f for k, f in self._running.items() if not f.done()}
        self._lost &= self._running.keys()
        now = self._clock()
        with self._db.transaction(write=False) as session:
            due = store.caches_needing_work(session, now=now, owner=self._settings.owner)
            expiry = store.earliest_foreign_lease_expiry(session, owner=self._settings.owner)
        for cache_id in due:
            if cache_id in self._running or self._stop.is_set():
                continue
            self._running[cache_id] = self._pool.submit(self._work_on, CacheId(cache_id))
        if time.monotonic() - self._last_housekeeping > 30:
            self._last_housekeeping = time.monotonic()
            self.housekeeping()
        wait = self._settings.poll_seconds
        if expiry is not None:
            wait = min(wait, max((expiry - now).total_seconds(), 0.0) + _LEASE_MARGIN_SECONDS)
        return wait

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Block until no work is running (tests and the CLI's one-shot mode)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(f.done() for f in self._running.values()):
                return
            time.sleep(0.02)

    # --- dispatch ----------------------------------------------------------------------------

    def _work_on(self, cache_id: CacheId) -> None:
        settings = self._settings
        now = self._clock()
        with self._db.transaction() as session:
            if not store.claim_lease(
                session,
                cache_id=cache_id,
                owner=settings.owner,
                now=now,
                until=now + timedelta(seconds=settings.lease_seconds),
            ):
                return
            cache = store.get_cache(session, cache_id=cache_id)
        if cache is None:
            return
        try:
            if cache.state is CacheState.DELETING:
                self._delete(cache)
            elif (
                cache.expire_time is not None
                and cache.expire_time <= now
                and lifecycle.can(cache.state, Trigger.EXPIRE)
            ):
                self._expire(cache)
            elif cache.state in lifecycle.BUILDING_STATES:
                self._build(cache)
            elif any(z.state is ZoneState.HYDRATING for z in cache.zones):
                self._hydrate(cache)
        except _LeaseLost:
            log.info("lease on %s lost; leaving the work to its new owner", cache_id)
        except SnapcacheError as exc:
            log.warning("lifecycle work on %s failed: %s", cache_id, exc.message)
        except Exception:
            log.exception("lifecycle work on %s failed", cache_id)
        finally:
            with self._db.transaction() as session:
                store.release_lease(session, cache_id=cache_id, owner=settings.owner)
            self._signal.notify()

    # --- builds ------------------------------------------------------------------------------

    def _build(self, cache: ImageCache) -> None:
        build_id = cache.build_id
        disk_id = f"{cache.cache_id}-{build_id}"
        attempt = cache.progress.attempt + 1
        capacity = cache.spec.cache_size_gib * GIB
        cache = self._write(
            cache,
            build_id,
            lambda c: replace(c, progress=BuildProgress(phase=BuildPhase.PULLING, attempt=attempt)),
            event=(
                EventType.NORMAL,
                "BuildStarted",
                f"builder started (attempt {attempt}): {len(cache.spec.images)} image(s) onto a "
                f"{cache.spec.cache_size_gib} GiB disk",
                {"builder_disk": disk_id},
            ),
        )
        reporter: _ProgressReporter | None = None
        started = time.monotonic()
        try:
            self._provider.create_builder_disk(disk_id=disk_id, capacity_bytes=capacity)
            build_credentials = resolve_with_sources(
                self._resolve_credentials, cache.spec.registry_credentials
            )
            options = PullOptions(
                platform=_platform(cache.spec.platform),
                credentials=build_credentials.credentials,
                plain_http_registries=frozenset(cache.spec.plain_http_registries),
                insecure_registries=frozenset(cache.spec.insecure_registries),
            )
            reporter = _ProgressReporter(self, cache, build_id, attempt)
            pulled = self._provider.pull_images(
                disk_id=disk_id,
                images=[parse_image_reference(i) for i in cache.spec.images],
                options=options,
                capacity_bytes=capacity,
                on_progress=reporter,
                cancelled=reporter.cancelled,
            )
            cache = reporter.latest
            final_progress = reporter.last
            now = self._clock()
            access = [_access(p, build_credentials.sources) for p in pulled]
            with self._db.transaction() as session:
                for given, image, (private, _) in zip(cache.spec.images, pulled, access, strict=True):
                    store.append_event(
                        session,
                        cache_id=cache.cache_id,
                        now=now,
                        type=EventType.NORMAL,
                        reason="ImagePulled",
                        message=f"pulled {given} ({image.manifest_digest}, {image.compressed_bytes} bytes, "
                        f"{image.uncompressed_bytes} bytes unpacked"
                        + (f"; layer diffs {image.layer_diffs})" if image.layer_diffs else ")"),
                        attributes={
                            "image": given,
                            "normalized_image": str(image.reference),
                            "digest": image.manifest_digest,
                            "index_digest": image.index_digest,
                            "platform": str(image.platform),
                            "compressed_bytes": str(image.compressed_bytes),
                            "uncompressed_bytes": str(image.uncompressed_bytes),
                            "requires_credentials": "true" if private else "false",
                            # "stored", "stored for K of M layers", "skipped: needs N more bytes"
                            **({"layer_diffs": image.layer_diffs} if image.layer_diffs else {}),
                        },
                    )
            cache = self._write(
                cache,
                build_id,
                lambda c: replace(c, progress=replace(c.progress, phase=BuildPhase.SNAPSHOTTING)),
            )
            snapshot_id = f"snap-{cache.cache_id}-{build_id}"
            snapshot = self._provider.create_snapshot(disk_id=disk_id, snapshot_id=snapshot_id)
            cache = self._write(
                cache,
                build_id,
                lambda c: replace(c, progress=replace(c.progress, phase=BuildPhase.RELEASING_BUILDER)),
                event=(
                    EventType.NORMAL,
                    "SnapshotCreated",
                    f"snapshot {snapshot_id} created "
                    f"({snapshot.size_bytes} bytes, {snapshot.blob_count} blobs)",
                    {"snapshot_id": snapshot_id, "size_bytes": str(snapshot.size_bytes)},
                ),
            )
            self._provider.release_builder_disk(disk_id=disk_id)
            previous_snapshot = cache.snapshot_id
            zones = target_zones(cache, self._zones)

            def finish(c: ImageCache) -> ImageCache:
                now = self._clock()
                return replace(
                    c,
                    state=lifecycle.next_state(c.state, Trigger.BUILD_SUCCEEDED),
                    state_reason="",
                    state_message="",
                    progress=replace(
                        c.progress,
                        phase=BuildPhase.DONE,
                        bytes_done=final_progress.bytes_total,
                        bytes_total=final_progress.bytes_total,
                    ),
                    cached_images=tuple(
                        CachedImage(
                            image=given,
                            normalized_image=str(p.reference),
                            manifest_digest=p.manifest_digest,
                            index_digest=p.index_digest,
                            platform=str(p.platform),
                            compressed_bytes=p.compressed_bytes,
                            uncompressed_bytes=p.uncompressed_bytes,
                            layer_count=p.layer_count,
                            requires_credentials=private,
                            authorized_by=authorized_by,
                        )
                        for given, p, (private, authorized_by) in zip(
                            c.spec.images, pulled, access, strict=True
                        )
                    ),
                    snapshot_id=snapshot_id,
                    snapshot_size_bytes=snapshot.size_bytes,
                    ready_time=now,
                    zones=tuple(ZoneAvailability(z, ZoneState.HYDRATING, "", now) for z in zones),
                )

            cache = self._write(
                cache,
                build_id,
                finish,
                event=(
                    EventType.NORMAL,
                    "BuilderReleased",
                    f"builder disk {disk_id} released; cache is READY",
                    {},
                ),
            )
            if previous_snapshot and previous_snapshot != snapshot_id:
                self._provider.delete_snapshot(snapshot_id=previous_snapshot)
            self._observe_build("succeeded", started, sum(p.compressed_bytes for p in pulled))
            self._hydrate(cache)
        except BuildFailure as failure:
            if self._stop.is_set():
                # shutting down: keep the builder disk; the next start resumes the build
                log.info("build of %s interrupted by shutdown", cache.cache_id)
                return
            if reporter is not None and reporter.cancelled():
                log.info("build %s of %s superseded; discarding it", build_id, cache.cache_id)
                self._provider.release_builder_disk(disk_id=disk_id)
                return
            retrying = self._build_failed(cache, build_id, disk_id, attempt, failure)
            self._observe_build("retrying" if retrying else "failed", started, 0)
        except _Superseded:
            log.info("build %s of %s superseded; discarding it", build_id, cache.cache_id)
            self._provider.release_builder_disk(disk_id=disk_id)

    def _observe_build(self, result: str, started: float, bytes_pulled: int) -> None:
        if self._on_build is not None:
            self._on_build(result, time.monotonic() - started, bytes_pulled)

    def _build_failed(
        self, cache: ImageCache, build_id: str, disk_id: str, attempt: int, failure: BuildFailure
    ) -> bool:
        """Schedule a retry (True) or fail the cache (False)."""
        settings = self._settings
        if failure.retryable and attempt < settings.max_build_attempts:
            delay = settings.retry_base_seconds * 2 ** (attempt - 1) * _JITTER.uniform(0.8, 1.2)
            self._write(
                cache,
                build_id,
                lambda c: replace(c, progress=replace(c.progress, phase=BuildPhase.QUEUED)),
                event=(
                    EventType.WARNING,
                    "BuildRetrying",
                    f"{failure.message}; retrying in {delay:.0f} s (attempt {attempt} of "
                    f"{settings.max_build_attempts})",
                    {"reason": failure.reason},
                ),
                next_attempt=self._clock() + timedelta(seconds=delay),
            )
            return True  # the builder disk is kept so the retry resumes from the blobs pulled so far
        self._provider.release_builder_disk(disk_id=disk_id)
        self._write(
            cache,
            build_id,
            lambda c: replace(
                c,
                state=lifecycle.next_state(c.state, Trigger.BUILD_FAILED),
                state_reason=failure.reason,
                state_message=failure.message,
                progress=replace(c.progress, phase=BuildPhase.DONE),
            ),
            event=(EventType.WARNING, "BuildFailed", failure.message, {"reason": failure.reason}),
        )
        return False

    # --- zones, expiry, deletion ---------------------------------------------------------------

    def _hydrate(self, cache: ImageCache) -> None:
        for zone in [z.zone for z in cache.zones if z.state is ZoneState.HYDRATING]:
            if self._stop.is_set():
                return
            self._renew(cache.cache_id)
            try:
                self._provider.hydrate_zone(snapshot_id=cache.snapshot_id, zone=zone)
                state, message, reason = ZoneState.AVAILABLE, "", "ZoneAvailable"
                text = f"snapshot available in zone {zone}"
                event_type = EventType.NORMAL
            except SnapcacheError as exc:
                state, message, reason = ZoneState.UNAVAILABLE, exc.message, "ZoneUnavailable"
                text = f"snapshot unavailable in zone {zone}: {exc.message}"
                event_type = EventType.WARNING
            except OSError as exc:
                state, message, reason = (
                    ZoneState.UNAVAILABLE,
                    f"copy failed: {exc.strerror}",
                    "ZoneUnavailable",
                )
                text = f"snapshot unavailable in zone {zone}: {message}"
                event_type = EventType.WARNING

            def mark(
                c: ImageCache,
                zone: str = zone,
                state: ZoneState = state,
                message: str = message,
                snapshot_id: str = cache.snapshot_id,
            ) -> ImageCache:
                if c.snapshot_id != snapshot_id:
                    raise _Superseded
                now = self._clock()
                return replace(
                    c,
                    zones=tuple(
                        ZoneAvailability(z.zone, state, message, now) if z.zone == zone else z
                        for z in c.zones
                    ),
                )

            try:
                cache = self._write(
                    cache,
                    cache.build_id,
                    mark,
                    event=(event_type, reason, text, {"zone": zone}),
                    any_state=True,
                )
            except _Superseded:
                return

    def _expire(self, cache: ImageCache) -> None:
        snapshot_id = cache.snapshot_id

        def expire(c: ImageCache) -> ImageCache:
            return replace(
                c,
                state=lifecycle.next_state(c.state, Trigger.EXPIRE),
                zones=(),
                progress=replace(c.progress, phase=BuildPhase.NONE),
            )

        self._write(
            cache,
            cache.build_id,
            expire,
            event=(EventType.NORMAL, "Expired", "retention period ended; snapshot deleted", {}),
            any_state=True,
        )
        # disks already provisioned keep working (they hold their own references); the snapshot
        # and its zone copies go now so no new disk can come from an expired cache
        if snapshot_id:
            self._provider.delete_snapshot(snapshot_id=snapshot_id)
        self._provider.release_builder_disk(disk_id=f"{cache.cache_id}-{cache.build_id}")

    def _delete(self, cache: ImageCache) -> None:
        with self._db.transaction(write=False) as session:
            disks = store.list_disks(session, cache_id=cache.cache_id)
        for disk in disks:
            self._provider.release_disk(disk_id=disk.disk_id)
        if cache.snapshot_id:
            self._provider.delete_snapshot(snapshot_id=cache.snapshot_id)
        self._provider.release_builder_disk(disk_id=f"{cache.cache_id}-{cache.build_id}")
        with self._db.transaction() as session:
            current = store.get_cache(session, cache_id=cache.cache_id, for_update=True)
            if current is not None and current.state is CacheState.DELETING:
                store.delete_cache(session, cache=current, now=self._clock())
        log.info("image cache %s deleted", cache.cache_id)

    # --- housekeeping --------------------------------------------------------------------------

    def housekeeping(self) -> None:
        """Drop expired failed caches, compact the change feed, reconcile with the provider."""
        if not self._wire_filled:
            self.fill_wire_forms()
        now = self._clock()
        cutoff = now - self._settings.failed_cache_ttl
        with self._db.transaction(write=False) as session:
            stale = store.caches_in_states(
                session, states=(CacheState.FAILED, CacheState.EXPIRED), updated_before=cutoff
            )
        for cache in stale:
            with self._db.transaction() as session:
                current = store.get_cache(session, cache_id=cache.cache_id, for_update=True)
                if current is None or current.version != cache.version:
                    continue
                if store.count_disks(session, cache_id=cache.cache_id):
                    continue
                store.delete_cache(session, cache=current, now=now)
            log.info("removed %s cache %s after the clean-up delay", cache.state.value, cache.cache_id)
        with self._db.transaction() as session:
            store.compact_changes(session, keep=self._settings.change_log_keep)
        self.reconcile(startup=False)

    def fill_wire_forms(self) -> int:
        """Store the wire form of every cache version that lacks it in our format; return how many.

        Rows from before the wire column, or written by another release's encoding, are served by
        decoding them until this pass has run once (at the first housekeeping after start-up).
        A version that changes meanwhile is skipped: its writer stored its own wire form.
        """
        assert self._encoder is not None
        encoder, after, filled = self._encoder, "", 0
        while True:
            if self._stop.is_set():
                return filled
            with self._db.transaction(write=False) as session:
                caches = store.caches_without_wire(
                    session, wire_format=encoder.format, after_id=after, limit=self._settings.wire_fill_batch
                )
            if not caches:
                break
            encoded = [(c, encoder.encode(c)) for c in caches]  # before taking the write lock
            with self._db.transaction() as session:
                for cache, wire in encoded:
                    filled += store.set_wire(session, cache=cache, wire=wire, wire_format=encoder.format)
            after = caches[-1].cache_id
        self._wire_filled = True
        if filled:
            log.info("stored the wire form of %d cache version(s) written without one", filled)
        return filled

    def reconcile(self, *, startup: bool) -> None:
        """Delete what the provider holds but no record owns; at start-up, at once.

        Later passes only delete an orphan seen twice `orphan_grace_seconds` apart, since a
        provision or build in flight creates on the provider just before it records in the database.
        """
        inventory = self._provider.inventory()
        with self._db.transaction(write=False) as session:
            caches = store.provider_refs(session)
            disk_ids = {d.disk_id for d in store.list_disks(session)}
            used_snapshots = {c.snapshot_id for c in caches} | store.disk_snapshot_ids(session)
        used_snapshots.discard("")
        building = lifecycle.BUILDING_STATES
        wanted_builders = {f"{c.cache_id}-{c.build_id}" for c in caches if c.state in building}
        wanted_zone_copies = {
            (c.snapshot_id, zone)
            for c in caches
            for zone, state in c.zones
            if state is not ZoneState.UNAVAILABLE
        }
        provider = self._provider
        orphans: list[tuple[str, Callable[[], None]]] = []
        for disk_id in inventory.builder_disks - wanted_builders:
            orphans.append((f"builder:{disk_id}", partial(provider.release_builder_disk, disk_id=disk_id)))
        for disk_id in inventory.disks - disk_ids:
            orphans.append((f"disk:{disk_id}", partial(provider.release_disk, disk_id=disk_id)))
        for snapshot_id in inventory.snapshots - used_snapshots:
            orphans.append(
                (f"snapshot:{snapshot_id}", partial(provider.delete_snapshot, snapshot_id=snapshot_id))
            )
        for snapshot_id, zone in inventory.zone_snapshots - wanted_zone_copies:
            if snapshot_id in inventory.snapshots - used_snapshots:
                continue  # deleting the snapshot removes its zone copies
            drop_copy = partial(provider.remove_from_zone, snapshot_id=snapshot_id, zone=zone)
            orphans.append((f"zone:{zone}:{snapshot_id}", drop_copy))
        orphans.extend(self._lost_zone_copies(caches, inventory.zone_snapshots))
        now = time.monotonic()
        seen_now: dict[str, float] = {}
        for key, remove in orphans:
            first_seen = self._orphans_seen.get(key, now)
            if startup or now - first_seen >= self._settings.orphan_grace_seconds:
                if not key.startswith("lost:"):  # a lost zone copy logs its own line
                    log.info("reconcile: removing orphaned %s", key)
                remove()
            else:
                seen_now[key] = first_seen
        self._orphans_seen = seen_now
        freed = self._provider.collect_garbage()
        if freed:
            log.info("reconcile: freed %d bytes of unreferenced blobs", freed)

    def _lost_zone_copies(
        self, caches: Sequence[store.ProviderRefs], held: AbstractSet[tuple[str, str]]
    ) -> list[tuple[str, Callable[[], None]]]:
        """Zones the database calls AVAILABLE whose copy the provider no longer has.

        Such a copy was lost (storage wiped, zone rebuilt): copy it again rather than let disks
        fail to provision. Bounded per pass, and not at all when most copies look lost at once:
        that is a provider that cannot see its storage (not mounted, listing failed), and
        re-copying everything would make it worse.
        """
        available = [
            (c.cache_id, c.snapshot_id, zone)
            for c in caches
            for zone, state in c.zones
            if state is ZoneState.AVAILABLE
        ]
        lost = [
            (cache_id, snapshot, zone)
            for cache_id, snapshot, zone in available
            if (snapshot, zone) not in held
        ]
        if not lost:
            return []
        if len(available) >= LOST_ZONE_MIN_SAMPLE and len(lost) > len(available) * LOST_ZONE_MAX_SHARE:
            log.error(
                "reconcile: the provider holds none of %d of %d zone copies; not re-copying "
                "(is its storage mounted?)",
                len(lost),
                len(available),
            )
            return []
        return [
            (f"lost:{zone}:{snapshot}", partial(self._zone_lost, cache_id, snapshot, zone))
            for cache_id, snapshot, zone in lost[:LOST_ZONES_PER_PASS]
        ]

    def _zone_lost(self, cache_id: str, snapshot_id: str, zone: str) -> None:
        """Mark a zone whose copy vanished HYDRATING again, so the next pass copies it anew."""
        now = self._clock()
        with self._db.transaction() as session:
            current = store.get_cache(session, cache_id=cache_id, for_update=True)
            if current is None or current.snapshot_id != snapshot_id:
                return
            if not any(z.zone == zone and z.state is ZoneState.AVAILABLE for z in current.zones):
                return
            message = "the zone's copy of the snapshot was lost; copying it again"
            updated = replace(
                current,
                zones=tuple(
                    ZoneAvailability(z.zone, ZoneState.HYDRATING, message, now) if z.zone == zone else z
                    for z in current.zones
                ),
                update_time=now,
            )
            store.update_cache(
                session, cache=updated, expected_version=current.version, now=now, encoder=self._encoder
            )
            store.append_event(
                session,
                cache_id=cache_id,
                now=now,
                type=EventType.WARNING,
                reason="ZoneLost",
                message=f"snapshot copy in zone {zone} is gone; copying it again",
                attributes={"zone": zone},
            )
        log.warning("reconcile: %s lost its copy in zone %s; copying it again", cache_id, zone)
        self._signal.notify()

    # --- writing back ------------------------------------------------------------------------

    def _renew(self, cache_id: str) -> None:
        now = self._clock()
        with self._db.transaction() as session:
            if not store.claim_lease(
                session,
                cache_id=cache_id,
                owner=self._settings.owner,
                now=now,
                until=now + timedelta(seconds=self._settings.lease_seconds),
            ):
                raise _LeaseLost

    def _write(
        self,
        cache: ImageCache,
        build_id: str,
        change: Callable[[ImageCache], ImageCache],
        *,
        event: tuple[EventType, str, str, dict[str, str]] | None = None,
        next_attempt: datetime | None = None,
        any_state: bool = False,
    ) -> ImageCache:
        """Apply ``change`` to the stored cache if it still runs this build, renewing the lease."""
        now = self._clock()
        with self._db.transaction() as session:
            if not store.claim_lease(
                session,
                cache_id=cache.cache_id,
                owner=self._settings.owner,
                now=now,
                until=now + timedelta(seconds=self._settings.lease_seconds),
            ):
                raise _LeaseLost
            current = store.get_cache(session, cache_id=cache.cache_id, for_update=True)
            if current is None or current.build_id != build_id:
                raise _Superseded
            if not any_state and current.state not in lifecycle.BUILDING_STATES:
                raise _Superseded
            if current.state is CacheState.DELETING:
                raise _Superseded
            updated = replace(change(current), update_time=now)
            stored = store.update_cache(
                session, cache=updated, expected_version=current.version, now=now, encoder=self._encoder
            )
            store.set_next_attempt(session, cache_id=cache.cache_id, at=next_attempt)
            if event is not None:
                event_type, reason, message, attributes = event
                store.append_event(
                    session,
                    cache_id=cache.cache_id,
                    now=now,
                    type=event_type,
                    reason=reason,
                    message=message,
                    attributes=attributes,
                )
        self._signal.notify()
        return stored


class _Superseded(Exception):
    """The cache moved on (new build, delete) while this work ran."""


class _ProgressReporter:
    """Writes pull progress at most every `progress_interval_seconds`; tells the builder to stop."""

    def __init__(self, worker: LifecycleWorker, cache: ImageCache, build_id: str, attempt: int) -> None:
        self._worker = worker
        self._build_id = build_id
        self._attempt = attempt
        self.latest = cache
        self.last = PullProgress(bytes_done=0, bytes_total=0)
        self._last_write = 0.0
        self._stop_reason: str | None = None
        self._lock = threading.Lock()

    def __call__(self, progress: PullProgress) -> None:
        # called from every download thread for every chunk: the common path only stores the
        # figure; at most one thread at a time writes it, and the others never wait for that
        self.last = progress
        interval = self._worker._settings.progress_interval_seconds
        if self._stop_reason is not None or time.monotonic() - self._last_write < interval:
            return
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._last_write = time.monotonic()
            self.latest = self._worker._write(
                self.latest,
                self._build_id,
                lambda c: replace(
                    c,
                    progress=BuildProgress(
                        phase=BuildPhase.PULLING,
                        bytes_done=progress.bytes_done,
                        bytes_total=progress.bytes_total,
                        attempt=self._attempt,
                    ),
                ),
            )
        except (_Superseded, _LeaseLost) as exc:
            self._stop_reason = type(exc).__name__
        except SnapcacheError as exc:
            log.warning("progress not recorded: %s", exc.message)
        finally:
            self._lock.release()

    def cancelled(self) -> bool:
        worker = self._worker
        return self._stop_reason is not None or worker._stop.is_set() or self.latest.cache_id in worker._lost


def _platform(text: str) -> Platform:
    parts = text.split("/")
    return Platform(os=parts[0], architecture=parts[1], variant=parts[2] if len(parts) > 2 else "")
