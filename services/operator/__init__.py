"""The ImageCache operator: ImageCache resources -> the cache registry, and the registry -> their status.

Two directions, both level-based (see `plans` for the decision table):

- **CR -> registry.** A new ImageCache gets the finalizer ``snapcache.io/image-cache``, then a
  registry cache created with an id derived from its uid (`cache_specs.cache_id_for`), labelled
  ``snapcache.io/imagecache-uid`` (and ``snapcache.io/imagecache``: its name). A spec change is
  an UpdateImageCache of the differing fields (FieldMask); changing images, size or platform
  rebuilds. Deleting the resource deletes the cache; the finalizer goes only once the registry
  confirms the cache is gone, and stays, with the Synced condition saying why, while the registry
  refuses (live disks: ``DISKS_IN_USE``; the annotation ``snapcache.io/force-delete: "true"``
  deletes anyway).
- **registry -> CR status.** Driven by the registry's WatchImageCaches feed (`cache_feed`): a
  change of a CR-born cache queues its resource, whose status is recomputed from the cache and
  written as a merge patch when it differs. Nothing is polled; a dropped feed resumes from its
  last revision, and a compacted one (OUT_OF_RANGE) is reloaded and every resource looked at again.

**Restart-safe.** The cache id is a function of the uid, so an operator killed after creating a
cache and restarted finds it (in the feed, or as ALREADY_EXISTS) and adopts it: one build. Every
write is idempotent, and events are derived from the stored status, so a restart announces nothing
twice.

**Caches created through the gRPC API do not appear as ImageCaches.** The registry is the source
of truth and serves API clients that know nothing of Kubernetes (the CLI, grpcurl, other
platforms); mirroring their caches into the cluster would give two writers to one object and an
unowned resource whose deletion semantics nobody chose. The operator only looks at caches carrying
the owner-uid label, and leaves every other cache alone.

**Credentials.** An ImageCache names Secrets (``namespace/name``); the operator passes those
names to the registry, which reads the Secrets when it builds. The operator never reads a Secret
(its RBAC does not allow it), and no password reaches an ImageCache, the registry's database, an
event or a log line.

**The plain Kubernetes client, not kopf.** Half of the operator is a consumer of a gRPC stream,
which kopf does not drive; the other half is one list + watch of one resource, the pattern the
extender's node cache already uses with the ``kubernetes`` client the project depends on. kopf
would add an asyncio runtime beside the threads every other wing uses, aiohttp, its own state
annotations on every resource, and RBAC for CRD discovery and peering (or ``--standalone``); the
reconcile it would host is a function of two snapshots that is simpler to test as one. Only
`kube_resources` imports the client (``.importlinter``).

Modules: `model` (values), `cache_specs` (spec -> cache), `statuses` (cache -> status, events),
`plans` (what to do), `reconciler` (one reconcile, through ports), `cache_book`, `work_queue` —
the pure core —; `kube_resources` and `registry_client` / `cache_feed` (the edges), `metrics`,
and `server` (the wiring).
"""
