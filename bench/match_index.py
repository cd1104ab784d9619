"""Benchmark `match_index`: the matcher's index - memory per cache, load time, READY-to-match delay.

Same catalogue as `match` (100,000 caches, 1-8 images each, 20,000 Zipf-skewed images) seeded
into a real registry (`snapcache serve` in its own process). Three figures, each against a floor
measured in the same run:

- memory: bytes the loaded index keeps per cache (tracemalloc, after the load and a GC), against
  the 2 KiB target (no floor: an absolute budget);
- load: the matcher's full load (List every page, convert, index) against a plain List of every
  page by the same client stack (alternating rounds, medians);
- delay: caches really built from a local OCI registry become usable (READY with a zone
  AVAILABLE: what a match needs); the time from the registry writing that version (its
  update_time) to the first MatchImageCaches that returns the cache (a client polling the
  matcher process every millisecond) against the time to the same version reaching a bare
  WatchImageCaches client.
  p99 of each over the samples.

    python bench/match_index.py [--caches 100000] [--images 20000] [--rounds 3] [--samples 60]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import grpc
from match_setup import catalogue, registry_and_matcher, seed_registry

from services.matcher.index_sync import IndexSync, SyncSettings
from services.matcher.matching import WALK_FIRST
from snapcache.demo.oci_images import ImageSpec, LayerSpec, build_image, push_image
from snapcache.demo.registry_server import RegistryServer
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc

PAGE_SIZE = 1000
# Between two match polls: a scheduler asks per pod, not in a tight loop, and a client spinning
# on the matcher would mostly measure the two processes fighting over their GILs.
POLL_PAUSE_SECONDS = 0.001


def _channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])


def plain_list(address: str) -> tuple[float, int]:
    """Seconds to List every page (decoded, then dropped), and how many caches."""
    with _channel(address) as channel:
        stub = api_grpc.CacheRegistryServiceStub(channel)
        started = time.perf_counter()
        token, count = "", 0
        while True:
            page = stub.ListImageCaches(api.ListImageCachesRequest(page_size=PAGE_SIZE, page_token=token))
            count += len(page.image_caches)
            token = page.next_page_token
            if not token:
                return time.perf_counter() - started, count


def matcher_load(address: str) -> tuple[float, int]:
    """Seconds for the matcher's full load into a fresh index, and how many caches it holds."""
    with _channel(address) as channel:
        sync = IndexSync(channel, settings=SyncSettings(page_size=PAGE_SIZE))
        started = time.perf_counter()
        sync.load_once()
        elapsed = time.perf_counter() - started
        return elapsed, sync.status().cache_count


def index_memory(address: str) -> tuple[int, int]:
    """Bytes the loaded index keeps (tracemalloc after GC), and how many caches it holds."""
    with _channel(address) as channel:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        sync = IndexSync(channel, settings=SyncSettings(page_size=PAGE_SIZE))
        sync.load_once()
        with sync.reading() as index:  # as the follower leaves it: common images' postings ordered
            index.warm(min_size=WALK_FIRST)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        count = sync.status().cache_count
        del sync
    return after - before, count


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def ready_to_match(registry: str, matcher: str, oci: RegistryServer, samples: int) -> dict[str, float]:
    """Build ``samples`` one-image caches; per cache, usable version -> Watch client, -> first match."""
    tags = [f"t{i}" for i in range(samples)]
    built = build_image(ImageSpec("bench/tiny", "t0", [LayerSpec(4096, seed=1)]))
    for tag in tags:
        push_image(oci.url, built, tag=tag)
    images = {f"{oci.host}/bench/tiny:{tag}": tag for tag in tags}

    watch_seen: dict[str, float] = {}
    ready_time: dict[str, float] = {}
    stop = threading.Event()
    channel = _channel(registry)
    stub = api_grpc.CacheRegistryServiceStub(channel)
    head = stub.ListImageCaches(api.ListImageCachesRequest(page_size=1)).revision
    feed = stub.WatchImageCaches(api.WatchImageCachesRequest(start_revision=head))

    def watch() -> None:
        try:
            for change in feed:
                cache = change.image_cache
                usable = cache.state == pb.ImageCache.READY and any(
                    z.state == pb.ZoneAvailability.AVAILABLE for z in cache.zone_availability
                )
                if usable and cache.name not in watch_seen:
                    watch_seen[cache.name] = time.time()
                    ready_time[cache.name] = cache.update_time.ToNanoseconds() / 1e9
        except grpc.RpcError:
            if not stop.is_set():
                raise

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    matched_at: dict[str, float] = {}
    with _channel(matcher) as matcher_channel:
        match = mpb_grpc.MatcherServiceStub(matcher_channel)
        for image in images:
            created = stub.CreateImageCache(
                api.CreateImageCacheRequest(
                    image_cache=pb.ImageCache(
                        images=[image], cache_size_gib=1, plain_http_registries=[oci.host]
                    )
                )
            )
            request = mpb.MatchImageCachesRequest(images=[image], validate_only=True)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if match.MatchImageCaches(request).image_cache == created.name:
                    matched_at[created.name] = time.time()
                    break
                time.sleep(POLL_PAUSE_SECONDS)
            else:
                raise TimeoutError(f"{created.name} never matched")
    deadline = time.monotonic() + 10
    while len(watch_seen) < len(matched_at) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    feed.cancel()
    channel.close()
    names = [n for n in matched_at if n in watch_seen]
    to_watch = [(watch_seen[n] - ready_time[n]) * 1000 for n in names]
    to_match = [(matched_at[n] - ready_time[n]) * 1000 for n in names]
    return {
        "samples": float(len(names)),
        "watch_p50_ms": _p(to_watch, 0.5),
        "watch_p99_ms": _p(to_watch, 0.99),
        "match_p50_ms": _p(to_match, 0.5),
        "match_p99_ms": _p(to_match, 0.99),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=60)
    options = parser.parse_args()

    cat = catalogue(caches=options.caches, images=options.images)
    with tempfile.TemporaryDirectory(prefix="bench-match-index-") as tmp:
        data_dir = Path(tmp) / "registry"
        seed_registry(data_dir, cat.caches)
        oci = RegistryServer(Path(tmp) / "oci")
        oci.start()
        try:
            with registry_and_matcher(data_dir) as running:
                memory, held = index_memory(running.registry)
                loads, lists = [], []
                for _ in range(options.rounds):
                    lists.append(plain_list(running.registry)[0])
                    loads.append(matcher_load(running.registry)[0])
                delay = ready_to_match(running.registry, running.matcher, oci, options.samples)
        finally:
            oci.close()

    per_cache = memory / max(held, 1)
    load_ratio = statistics.median(loads) / statistics.median(lists)
    delay_ratio = delay["match_p99_ms"] / delay["watch_p99_ms"]
    print(
        f"memory: {memory / 2**20:.1f} MiB for {held} caches = {per_cache:.0f} bytes per cache (target <= 2048)"
    )
    print(
        f"load: matcher full load {statistics.median(loads):.2f}s vs plain List {statistics.median(lists):.2f}s "
        f"= {load_ratio:.2f} (target <= 1.5); rounds {[round(x, 2) for x in loads]} / {[round(x, 2) for x in lists]}"
    )
    print(
        f"usable -> first match p99 {delay['match_p99_ms']:.1f} ms (p50 {delay['match_p50_ms']:.1f}) vs "
        f"usable -> Watch client p99 {delay['watch_p99_ms']:.1f} ms (p50 {delay['watch_p50_ms']:.1f}) "
        f"= {delay_ratio:.2f}, {delay['samples']:.0f} caches"
    )
    print(
        json.dumps(
            {
                "bench": "match_index",
                "ratio": round(load_ratio, 3),
                "bytes_per_cache": round(per_cache),
                "delay_p99_ratio": round(delay_ratio, 3),
                "match_delay_p99_ms": round(delay["match_p99_ms"], 2),
                "watch_delay_p99_ms": round(delay["watch_p99_ms"], 2),
                "caches": held,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
