"""``snapcache match IMAGE...``: ask the matcher which cache a pod would get, and why.

A preview by default (the hit is not counted, as TKE's GetMostSuitableImageCache); ``--record``
counts it like a real match. Prints the decision, the ranked candidates with what each holds
and where it can be used, and the rejected caches with their reasons; ``-o json`` prints the
answer as protobuf JSON.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import grpc

from snapcache.tls import PLAINTEXT_CHANNEL, ClientSecurity, open_channel
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc
from snapcache_cli.client import DEFAULT_RPC_TIMEOUT_SECONDS, RpcFailure, client_security
from snapcache_cli.render import format_bytes, format_time, image_label, table, to_json

DEFAULT_MATCHER = "127.0.0.1:50052"
POLICIES = {
    "exact": mpb.EXACT,
    "tke": mpb.EXACT,
    "bytes": mpb.BYTES_COVERED,
    "size": mpb.BYTES_COVERED,
    "images": mpb.IMAGES_COVERED,
    "quantity": mpb.IMAGES_COVERED,
}


def register(subparsers: Any, *, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add ``match`` to the top-level subcommands."""
    command = subparsers.add_parser(
        "match",
        parents=parents,
        help="which cache a pod with these images would get, ranked and explained",
        description="Ask the matcher which image cache a pod with these images would mount, and why.",
    )
    command.add_argument("images", nargs="+", metavar="IMAGE", help="the pod's images")
    command.add_argument(
        "--matcher",
        metavar="ADDRESS",
        default=os.environ.get("SNAPCACHE_MATCHER") or DEFAULT_MATCHER,
        help=f"matcher gRPC address (env SNAPCACHE_MATCHER, default {DEFAULT_MATCHER})",
    )
    command.add_argument("--cache", default="", metavar="ID", help="manual match: imc-xxxxxxxx")
    command.add_argument(
        "--policy",
        choices=sorted(POLICIES),
        default="exact",
        help="exact/tke (default: every image, smaller then newer), bytes/size or images/quantity "
        "(partial matches ranked by bytes or images covered)",
    )
    command.add_argument("--min-images", type=int, default=0, metavar="N", help="fewest images covered")
    command.add_argument("--strict", action="store_true", help="refuse instead of falling back to pulling")
    command.add_argument(
        "--zone", action="append", default=[], metavar="ZONE", help="wanted zone (repeatable)"
    )
    command.add_argument("--max-candidates", type=int, default=0, metavar="N", help="default 5")
    command.add_argument("--max-rejections", type=int, default=0, metavar="N", help="default 10")
    command.add_argument("--record", action="store_true", help="count the hit (default: a preview)")
    command.set_defaults(handler=run_match)


def run_match(args: argparse.Namespace) -> int:
    """Ask, print the answer."""
    request = mpb.MatchImageCachesRequest(
        images=args.images,
        image_cache=args.cache,
        policy=POLICIES[args.policy],
        min_images_covered=args.min_images,
        strict=args.strict,
        zones=args.zone,
        max_candidates=args.max_candidates,
        max_rejections=args.max_rejections,
        validate_only=not args.record,
    )
    timeout = getattr(args, "rpc_timeout", DEFAULT_RPC_TIMEOUT_SECONDS)
    answer = ask_matcher(args.matcher, request, timeout_seconds=timeout, security=client_security(args))
    print(to_json(answer) if args.output == "json" else describe_answer(answer))
    return 0


def ask_matcher(
    address: str,
    request: mpb.MatchImageCachesRequest,
    *,
    timeout_seconds: float,
    security: ClientSecurity = PLAINTEXT_CHANNEL,
) -> mpb.MatchImageCachesResponse:
    """One MatchImageCaches call; a failure becomes an `RpcFailure` that names the matcher."""
    with open_channel(address, security) as channel:
        try:
            answer: mpb.MatchImageCachesResponse = mpb_grpc.MatcherServiceStub(channel).MatchImageCaches(
                request, timeout=timeout_seconds
            )
        except grpc.RpcError as error:
            raise RpcFailure.from_error(
                error,
                address=address,
                timeout_seconds=timeout_seconds,
                service="matcher",
                address_option="--matcher or SNAPCACHE_MATCHER",
            ) from None
    return answer


def _zones_cell(candidate: mpb.MatchCandidate) -> str:
    text = ", ".join(candidate.available_zones)
    if candidate.hydrating_zones:
        text += f" (hydrating: {', '.join(candidate.hydrating_zones)})"
    return text


def describe_answer(answer: mpb.MatchImageCachesResponse) -> str:
    """The answer for people: decision, candidates with their images, rejections."""
    decision = mpb.MatchImageCachesResponse.Decision.Name(answer.decision)
    action = mpb.MatchImageCachesResponse.Action.Name(answer.action)
    staleness = answer.index_staleness.ToTimedelta().total_seconds()
    freshness = "live" if staleness == 0 else f"stale for {staleness:.0f}s"
    lines = [
        f"Decision:  {decision} -> {action}",
        f"Why:       {answer.message}",
        f"Images:    {', '.join(answer.normalized_images)}",
        f"Index:     revision {answer.index_revision}, {freshness}",
    ]
    if answer.candidates:
        lines += ["", "Candidates:"]
        rows = [
            [
                str(c.rank),
                c.image_cache,
                f"{c.rank_key.images_covered}/{len(answer.normalized_images)}",
                format_bytes(c.rank_key.bytes_covered),
                f"{c.rank_key.cache_size_gib} GiB",
                format_time(c.rank_key, "create_time"),
                ", ".join(c.available_zones)
                + (f" (hydrating: {', '.join(c.hydrating_zones)})" if c.hydrating_zones else ""),
            ]
            for c in answer.candidates
        ]
        lines.append(table(["RANK", "CACHE", "IMAGES", "BYTES", "SIZE", "CREATED", "ZONES"], rows))
        best = answer.candidates[0]
        for image in best.covered_images:
            how = mpb.CoveredImage.MatchedBy.Name(image.matched_by).lower()
            stale = "  (possibly stale: matched by tag latest)" if image.possibly_stale else ""
            lines.append(
                f"  {image_label(image.image)} -> {image.cached_image} by {how}, "
                f"{format_bytes(image.compressed_bytes)}{stale}"
            )
        for missing in best.missing_images:
            lines.append(f"  {image_label(missing)} -> not in this cache (pulled)")
    if answer.rejections:
        lines += ["", "Rejected" + (" (more not shown)" if answer.rejections_truncated else "") + ":"]
        rows = [
            [
                r.image_cache,
                mpb.Rejection.Reason.Name(r.reason),
                pb.ImageCache.State.Name(r.state),
                r.message,
            ]
            for r in answer.rejections
        ]
        lines.append(table(["CACHE", "REASON", "STATE", "DETAIL"], rows))
    return "\n".join(lines)
