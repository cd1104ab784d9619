"""``snapcache cache ...``: create, list, get, events and delete image caches over gRPC.

Each handler turns arguments into one request (or a few pages of one), and prints the answer:
a table or description by default, protobuf JSON with ``-o json``. Failures propagate as
`RpcFailure`/`CommandFailed`/`WaitTimeout` for `main` to print, so every command reports them
alike.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from snapcache.v1 import image_cache_pb2 as pb
from snapcache_cli.client import (
    CACHE_NAME_PREFIX,
    CommandFailed,
    RegistryClient,
    WaitTimeout,
    cache_name,
    client_security,
)
from snapcache_cli.progress import ProgressDisplay
from snapcache_cli.render import (
    all_zones_settled,
    cache_table,
    describe_cache,
    events_table,
    state_name,
    to_json,
)

DEFAULT_WAIT_TIMEOUT_SECONDS = 600.0
_BUILDING = (pb.ImageCache.CREATING, pb.ImageCache.UPDATING)


def connect(args: argparse.Namespace) -> RegistryClient:
    """The client for ``--registry`` with the ``--rpc-timeout`` deadline and the TLS/token options."""
    return RegistryClient(args.registry, rpc_timeout=args.rpc_timeout, security=client_security(args))


def _label(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def positive_seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def register(subparsers: Any, *, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add ``cache`` and its actions to the top-level subcommands."""
    cache = subparsers.add_parser(
        "cache", parents=parents, help="create, list, inspect and delete image caches"
    )
    actions = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")

    create = actions.add_parser(
        "create",
        parents=parents,
        help="create an image cache (and optionally wait until it is READY)",
        description="Create an image cache of IMAGE... and start its build.",
    )
    create.add_argument("images", nargs="+", metavar="IMAGE", help="image reference, e.g. nginx:1.25")
    create.add_argument("--id", dest="cache_id", metavar="ID", help="client-chosen id, imc-xxxxxxxx")
    create.add_argument("--size", type=int, metavar="GIB", help="cache disk size in GiB (default 20)")
    create.add_argument("--retention-days", type=int, metavar="N", help="keep N days (default: forever)")
    create.add_argument("--display-name", default="", help="a human-readable name")
    create.add_argument(
        "--label", type=_label, action="append", default=[], metavar="K=V", help="a label (repeatable)"
    )
    create.add_argument(
        "--plain-http", action="append", default=[], metavar="HOST", help="registry reached over HTTP"
    )
    create.add_argument(
        "--insecure", action="append", default=[], metavar="HOST", help="registry whose TLS is not verified"
    )
    create.add_argument(
        "--docker-config",
        action="append",
        default=[],
        metavar="PATH",
        help="docker config.json with credentials, read by the registry service",
    )
    create.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NS/NAME",
        help="Kubernetes dockerconfigjson Secret with credentials",
    )
    create.add_argument("--platform", default="", metavar="OS/ARCH", help="default linux/amd64")
    create.add_argument(
        "--zone",
        action="append",
        default=[],
        metavar="ZONE",
        help="zone for the snapshot (repeatable)",
    )
    create.add_argument("--wait", action="store_true", help="follow the build until READY or FAILED")
    create.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_WAIT_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="give up waiting after this long (default %(default)g)",
    )
    create.set_defaults(handler=run_create)

    listing = actions.add_parser("list", parents=parents, help="list image caches (all pages)")
    listing.add_argument(
        "--filter", default="", metavar="EXPR", help='e.g. state = READY AND labels.team = "a"'
    )
    listing.add_argument("--page-size", type=int, default=0, metavar="N", help="caches per request")
    listing.set_defaults(handler=run_list)

    get = actions.add_parser("get", parents=parents, help="describe one image cache")
    get.add_argument("cache", metavar="ID", help="imc-xxxxxxxx or imageCaches/imc-xxxxxxxx")
    get.set_defaults(handler=run_get)

    events = actions.add_parser("events", parents=parents, help="show a cache's event log")
    events.add_argument("cache", metavar="ID", help="imc-xxxxxxxx or imageCaches/imc-xxxxxxxx")
    events.set_defaults(handler=run_events)

    delete = actions.add_parser("delete", parents=parents, help="delete an image cache")
    delete.add_argument("cache", metavar="ID", help="imc-xxxxxxxx or imageCaches/imc-xxxxxxxx")
    delete.add_argument("--force", action="store_true", help="release its live disks too")
    delete.add_argument("--wait", action="store_true", help="wait until it is gone")
    delete.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_WAIT_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="give up waiting after this long (default %(default)g)",
    )
    delete.set_defaults(handler=run_delete)


def _now() -> datetime:
    return datetime.now(UTC)


def print_cache(cache: pb.ImageCache, args: argparse.Namespace, *, stream: TextIO | None = None) -> None:
    """One cache in the chosen output format."""
    out = stream or sys.stdout
    out.write((to_json(cache) if args.output == "json" else describe_cache(cache, now=_now())) + "\n")


def wait_until_built(
    client: RegistryClient,
    cache: pb.ImageCache,
    *,
    timeout_seconds: float,
    also_zones: bool = False,
) -> pb.ImageCache:
    """Follow a build with a progress display on stderr; the cache once it left CREATING/UPDATING.

    With ``also_zones`` a READY cache is followed further until no zone copy is HYDRATING.
    Raises `WaitTimeout` (with the last version seen) and `CommandFailed` if the cache is deleted.
    """

    def settled(current: pb.ImageCache) -> bool:
        if current.state in _BUILDING:
            return False
        return not (also_zones and current.state == pb.ImageCache.READY) or all_zones_settled(current)

    display = ProgressDisplay(sys.stderr)
    try:
        followed = client.follow(cache, settled=settled, timeout_seconds=timeout_seconds, observer=display)
    finally:
        display.close()
    if followed.deleted:
        raise CommandFailed(f"{cache.name} was deleted while waiting for its build")
    return followed.cache


def build_failure(cache: pb.ImageCache) -> CommandFailed:
    """Why a build that ended without READY failed, as the command's error."""
    detail = ": ".join(part for part in (cache.state_reason, cache.state_message) if part)
    return CommandFailed(f"{cache.name} is {state_name(cache)}" + (f": {detail}" if detail else ""))


def run_create(args: argparse.Namespace) -> int:
    """``cache create``."""
    credentials = [
        pb.RegistryCredentialRef(docker_config_path=os.path.abspath(os.path.expanduser(path)))
        for path in args.docker_config
    ] + [pb.RegistryCredentialRef(secret=secret) for secret in args.secret]
    spec = pb.ImageCache(
        images=args.images,
        display_name=args.display_name,
        labels=dict(args.label),
        cache_size_gib=args.size or 0,
        retention_days=args.retention_days or 0,
        registry_credentials=credentials,
        plain_http_registries=args.plain_http,
        insecure_registries=args.insecure,
        platform=args.platform,
        zones=args.zone,
    )
    chosen_id = (args.cache_id or "").removeprefix(CACHE_NAME_PREFIX)
    with connect(args) as client:
        created = client.create(spec, cache_id=chosen_id)
        if not args.wait:
            print_cache(created, args)
            return 0
        try:
            final = wait_until_built(client, created, timeout_seconds=args.timeout)
        except WaitTimeout as timeout:
            print_cache(timeout.cache, args)
            raise
    print_cache(final, args)
    if final.state != pb.ImageCache.READY:
        raise build_failure(final)
    return 0


def run_list(args: argparse.Namespace) -> int:
    """``cache list``: every page, in name order."""
    with connect(args) as client:
        caches = client.list_all(filter_text=args.filter, page_size=args.page_size)
    if args.output == "json":
        print(to_json(caches))
    elif caches.image_caches:
        print(cache_table(caches.image_caches, now=_now()))
    else:
        print("no image caches" + (" match the filter" if args.filter else ""), file=sys.stderr)
    return 0


def run_get(args: argparse.Namespace) -> int:
    """``cache get``."""
    with connect(args) as client:
        cache = client.get(args.cache)
    print_cache(cache, args)
    return 0


def run_events(args: argparse.Namespace) -> int:
    """``cache events``: the whole log, oldest first."""
    with connect(args) as client:
        events = client.events(args.cache)
    print(to_json(events) if args.output == "json" else events_table(events.events))
    return 0


class _Quiet:
    """An observer for deletions: nothing worth drawing."""

    def update(self, cache: pb.ImageCache) -> None:
        """Ignore the new version."""

    def tick(self) -> None:
        """Ignore the heartbeat."""


def run_delete(args: argparse.Namespace) -> int:
    """``cache delete``; with ``--wait`` until the cache and its snapshot are gone."""
    with connect(args) as client:
        deleting = client.delete(args.cache, force=args.force)
        if not args.wait:
            if args.output == "json":
                print(to_json(deleting))
            else:
                print(f"{deleting.name} is {state_name(deleting)}")
            return 0
        followed = client.follow(
            deleting, settled=lambda _: False, timeout_seconds=args.timeout, observer=_Quiet()
        )
    if args.output == "json":
        print(to_json(followed.cache))
    else:
        print(f"{cache_name(args.cache)} deleted")
    return 0
