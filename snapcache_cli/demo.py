"""``snapcache demo``: the main job end to end on one offline machine, in a few seconds.

It starts a real OCI registry (Debian's ``docker-registry``) and pushes images the project
builds itself, so no network and no Docker are needed; runs the cache registry in-process on a
free port (or uses a running one with ``--use-running``); creates a cache of those images and
follows its build; shows the READY cache and its events; provisions a disk from the snapshot,
lets ``skopeo`` read an image back from it, releases it; and stops everything it started.
Everything it starts is registered on one `ExitStack`, so a failure at any step still shuts
down what came before it, in reverse order.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from services.cache_registry.server import RegistryConfig
from snapcache.demo.oci_images import PushedImage, push_demo_images
from snapcache.demo.registry_server import REGISTRY_BINARY, RegistryServer, RegistryStartError
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb
from snapcache_cli.cache_commands import build_failure, positive_seconds, wait_until_built
from snapcache_cli.client import CommandFailed, RegistryClient
from snapcache_cli.match_command import DEFAULT_MATCHER, ask_matcher, describe_answer
from snapcache_cli.render import describe_cache, describe_disk, events_table, to_dict
from snapcache_cli.serve import (
    MatcherComponent,
    RegistryComponent,
    start_or_explain,
    stop_all,
    wait_for_signal,
)

DEFAULT_TIMEOUT_SECONDS = 120.0
_SKOPEO_TIMEOUT_SECONDS = 30.0
_HOLDER = "snapcache-demo"


def register(subparsers: Any, *, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add ``demo`` to the top-level subcommands."""
    demo = subparsers.add_parser(
        "demo",
        parents=parents,
        help="run the whole job locally: OCI registry, cache build, disk, in seconds",
        description=(
            "Start a local OCI registry with demo images, build an image cache of them, match a pod "
            "with those images to it, provision a disk from its snapshot and read it back, then stop "
            "everything."
        ),
    )
    demo.add_argument(
        "--workdir",
        type=Path,
        default=None,
        metavar="PATH",
        help="keep the OCI registry and registry data here (default: a temporary directory, removed)",
    )
    demo.add_argument(
        "--use-running",
        action="store_true",
        help="use the cache registry at --registry instead of starting one in-process",
    )
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="leave everything running at the end until Ctrl-C, to explore with `snapcache cache ...`",
    )
    demo.add_argument(
        "--matcher",
        metavar="ADDRESS",
        default=DEFAULT_MATCHER,
        help="with --use-running: the matcher's address (default %(default)s)",
    )
    demo.add_argument("--zone", default="", metavar="ZONE", help="zone for the disk (default: the first)")
    demo.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="give up waiting for the build after this long (default %(default)g)",
    )
    demo.set_defaults(handler=run_demo)


class _Narrator:
    """The demo's story: a headline per step, details indented below it."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def step(self, text: str) -> None:
        self._stream.write(f"\n==> {text}\n")
        self._stream.flush()

    def detail(self, text: str) -> None:
        for line in text.splitlines():
            self._stream.write(f"    {line}\n")
        self._stream.flush()


@dataclass(frozen=True)
class SkopeoCheck:
    """What ``skopeo inspect oci:DISK:REF`` reported for one cached image."""

    image: str
    command: str
    digest: str
    expected: str

    @property
    def matches(self) -> bool:
        """The digest read from the disk is the one the build recorded."""
        return self.digest == self.expected


def _workdir(args: argparse.Namespace, stack: ExitStack) -> Path:
    if args.workdir is None:
        path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="snapcache-demo-")))
    else:
        path = args.workdir.expanduser().resolve()
    # skopeo splits oci:DIR:REF at the first colon, and disks live below this directory
    if ":" in str(path):
        raise CommandFailed(f"the work directory must not contain ':' (got {path})", exit_code=2)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _start_oci_registry(directory: Path, stack: ExitStack) -> RegistryServer:
    server = RegistryServer(directory)
    stack.callback(server.close)
    try:
        server.start()
    except FileNotFoundError:
        raise CommandFailed(
            f"{REGISTRY_BINARY!r} is not on PATH: install Debian's docker-registry package "
            "(scripts/bootstrap does)"
        ) from None
    except RegistryStartError as exc:
        raise CommandFailed(f"the local OCI registry did not start: {exc}") from exc
    return server


def _push(server: RegistryServer) -> list[PushedImage]:
    try:
        return push_demo_images(server.url)
    except (RuntimeError, OSError) as exc:
        raise CommandFailed(f"pushing the demo images to {server.url} failed: {exc}") from exc


def _skopeo_checks(cache: pb.ImageCache, disk: pb.Disk) -> list[SkopeoCheck] | None:
    """Read each cached image back from the disk with skopeo; ``None`` when that is not possible."""
    skopeo = shutil.which("skopeo")
    if skopeo is None or not Path(disk.location).is_dir():
        return None
    checks = []
    for image in cache.cached_images:
        target = f"oci:{disk.location}:{image.normalized_image}"
        command = [skopeo, "inspect", "--format", "{{.Digest}}", target]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=_SKOPEO_TIMEOUT_SECONDS, check=False
            )
        except subprocess.TimeoutExpired:
            raise CommandFailed(
                f"skopeo inspect {target} did not finish in {_SKOPEO_TIMEOUT_SECONDS:g}s"
            ) from None
        if done.returncode != 0:
            raise CommandFailed(f"skopeo inspect {target} failed:\n{done.stderr.strip()}")
        checks.append(
            SkopeoCheck(
                image=image.image,
                command=f"skopeo inspect oci:{disk.location}:{image.normalized_image}",
                digest=done.stdout.strip(),
                expected=image.manifest_digest,
            )
        )
    return checks


def _pick_zone(cache: pb.ImageCache, wanted: str) -> str:
    available = [z.zone for z in cache.zone_availability if z.state == pb.ZoneAvailability.AVAILABLE]
    if wanted:
        if wanted not in available:
            raise CommandFailed(
                f"zone {wanted!r} has no copy of the snapshot (available: {', '.join(available) or 'none'})"
            )
        return wanted
    if not available:
        raise CommandFailed(f"{cache.name} is READY but no zone has its snapshot available")
    return available[0]


def _match_pod(
    address: str, images: Sequence[str], expected: str, *, timeout_seconds: float
) -> mpb.MatchImageCachesResponse:
    """Ask the matcher until its index has the READY cache (it follows the registry's feed)."""
    request = mpb.MatchImageCachesRequest(images=images, validate_only=False)
    deadline = time.monotonic() + timeout_seconds
    while True:
        answer = ask_matcher(address, request, timeout_seconds=timeout_seconds)
        if answer.image_cache == expected:
            return answer
        if time.monotonic() > deadline:
            raise CommandFailed(
                f"the matcher did not match {expected} within {timeout_seconds:g}s: {answer.message}"
            )
        time.sleep(0.05)


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; every failure becomes a clear `CommandFailed` or `RpcFailure`."""
    began = time.monotonic()
    as_json = args.output == "json"
    say = _Narrator(sys.stderr if as_json else sys.stdout)
    with ExitStack() as stack:
        workdir = _workdir(args, stack)

        say.step(f"Starting a local OCI registry ({REGISTRY_BINARY})")
        oci = _start_oci_registry(workdir / "oci-registry", stack)
        say.detail(f"{oci.url} (storage {oci.storage_dir})")

        say.step("Pushing the demo images (built here, no network needed)")
        pushed = _push(oci)
        images = [f"{oci.host}/{p.repository}:{p.tag}" for p in pushed]
        for image, push in zip(images, pushed, strict=True):
            kind = f"index of {len(push.images)} platforms" if push.is_index else "manifest"
            say.detail(f"{image}  {push.digest}  ({kind})")

        if args.use_running:
            address, matcher_address = args.registry, args.matcher
            say.step(f"Using the running cache registry at {address} and matcher at {matcher_address}")
        else:
            say.step("Starting the cache registry and the matcher in-process")
            component = RegistryComponent(
                RegistryConfig(data_dir=workdir / "registry-data", listen="127.0.0.1:0")
            )
            matcher = MatcherComponent(listen="127.0.0.1:0", registry=lambda: component.address)
            for where in start_or_explain([component, matcher]):
                say.detail(where)
            stack.callback(stop_all, [component, matcher])
            address = component.address
            matcher_address = matcher.address
        client = stack.enter_context(RegistryClient(address, rpc_timeout=args.rpc_timeout))

        say.step("Creating an image cache of the demo images")
        created = client.create(
            pb.ImageCache(
                images=images,
                display_name="snapcache demo",
                labels={"app": "snapcache-demo"},
                plain_http_registries=[oci.host],
            )
        )
        say.detail(f"{created.name} is {pb.ImageCache.State.Name(created.state)}; following its build")
        cache = wait_until_built(client, created, timeout_seconds=args.timeout, also_zones=True)
        events = client.events(cache.name)
        if cache.state != pb.ImageCache.READY:
            say.detail(describe_cache(cache, now=datetime.now(UTC)))
            say.detail(events_table(events.events))
            raise build_failure(cache)

        say.step(f"The cache is READY ({cache.name})")
        say.detail(describe_cache(cache, now=datetime.now(UTC)))
        say.step("Its events")
        say.detail(events_table(events.events))

        say.step("Matching a pod that runs these images (what the scheduler extender asks)")
        answer = _match_pod(matcher_address, images, cache.name, timeout_seconds=args.timeout)
        say.detail(describe_answer(answer))

        zone = _pick_zone(cache, args.zone)
        say.step(f"Provisioning a disk from the snapshot in zone {zone}")
        disk = client.provision_disk(cache.name, zone=zone, holder=_HOLDER)
        try:
            say.detail(describe_disk(disk))
            checks = _skopeo_checks(cache, disk)
            if checks is None:
                say.step("skopeo is not on PATH (or the disk is not a local directory): not reading it back")
            else:
                say.step("Reading the images back from the disk with skopeo")
                for check in checks:
                    verdict = "matches the build" if check.matches else f"EXPECTED {check.expected}"
                    say.detail(f"{check.command}\n  -> {check.digest}  ({verdict})")
                wrong = [c for c in checks if not c.matches]
                if wrong:
                    raise CommandFailed(
                        "the disk does not hold what the build recorded: "
                        + ", ".join(f"{c.image} is {c.digest}, not {c.expected}" for c in wrong)
                    )
        finally:
            say.step(f"Releasing the disk {disk.name}")
            released = client.release_disk(disk.name)
            say.detail("released" if released else "was already released")

        if args.keep_running:
            say.step("Everything keeps running; press Ctrl-C to stop")
            say.detail(f"snapcache --registry {address} cache list")
            say.detail(f"snapcache --registry {address} cache get {cache.name}")
            say.detail(f"snapcache match --matcher {matcher_address} {' '.join(images)}")
            say.detail(f"OCI registry: {oci.url}")
            wait_for_signal()
        say.step("Shutting down")

    if as_json:
        summary = {
            "image_cache": to_dict(cache),
            "events": [to_dict(event) for event in events.events],
            "match": to_dict(answer),
            "disk": to_dict(disk),
            "disk_released": released,
            "skopeo": [{"image": c.image, "digest": c.digest, "matches": c.matches} for c in checks or []],
        }
        print(json.dumps(summary, indent=2))
    say.detail(f"demo finished in {time.monotonic() - began:.1f}s; everything it started is stopped")
    return 0
