"""Coverage-guided fuzzing of the extender's JSON input (`services.extender.api`) with atheris.

The body kube-scheduler posts is decoded two ways: `decode_args` (the whole ExtenderArgs), and the
fast path `split_node_names` + `decode_node_names`, which cuts the pod out of a NodeNames request
without decoding the names. Holds: `decode_args` answers or raises `InvalidArgument` (a 400, never
a 500); the fast path answers None (not its shape), or a pod and names text whose names decode or
raise `InvalidArgument`; and when the fast path decodes a body whole, `decode_args` agrees with it
on the pod and the names.

Random bytes rarely stay JSON, so half the inputs are JSON documents built from the fuzzer's bytes
in the request's shape (its keys, values of every type, the scheduler's exact encoding), and half
are the raw bytes (seeded with real kube-scheduler 1.20 requests, tests/fixtures/extender, and the
dictionary extender_json.dict).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    from services.extender.api import decode_args, decode_node_names, split_node_names
    from snapcache.errors import InvalidArgument

KEYS = (
    "Pod", "Nodes", "NodeNames", "items", "metadata", "name", "namespace", "uid", "labels",
    "annotations", "spec", "containers", "initContainers", "image", "snapcache.io/use-image-cache",
    "eks.tke.cloud.tencent.com/use-image-cache", "topology.kubernetes.io/zone",
)  # fmt: skip
STRINGS = ("auto", "off", "imc-abcdefgh", "nginx:1.25", "docker.io/library/nginx", "zone-a", "", "node-1")


def _value(provider: atheris.FuzzedDataProvider, depth: int) -> Any:
    kind = provider.ConsumeIntInRange(0, 7 if depth < 6 else 4)
    if kind == 0:
        return None
    if kind == 1:
        return provider.ConsumeBool()
    if kind == 2:
        return provider.ConsumeInt(9)  # past 64 bits too
    if kind == 3:
        return provider.ConsumeRegularFloat()
    if kind == 4:
        if provider.ConsumeBool():
            return STRINGS[provider.ConsumeIntInRange(0, len(STRINGS) - 1)]
        return provider.ConsumeUnicodeNoSurrogates(provider.ConsumeIntInRange(0, 16))
    if kind == 5:
        return [_value(provider, depth + 1) for _ in range(provider.ConsumeIntInRange(0, 4))]
    document = {}
    for _ in range(provider.ConsumeIntInRange(0, 5)):
        key = KEYS[provider.ConsumeIntInRange(0, len(KEYS) - 1)] if provider.ConsumeBool() else "x"
        document[key] = _value(provider, depth + 1)
    return document


def _structured(provider: atheris.FuzzedDataProvider) -> bytes:
    """An ExtenderArgs-shaped body: the scheduler's key order and encoding, values of any type."""
    body: dict[str, Any] = {"Pod": _value(provider, 1)}
    if provider.ConsumeBool():
        body["Nodes"] = None
        body["NodeNames"] = [
            _value(provider, 5) if provider.ConsumeIntInRange(0, 9) == 0 else f"n{i}"
            for i in range(provider.ConsumeIntInRange(0, 6))
        ]
    else:
        body["Nodes"] = _value(provider, 1)
    return json.dumps(body, separators=(",", ":")).encode()


def test_one_input(data: bytes) -> None:
    """One input: its first byte says structured document or raw body."""
    provider = atheris.FuzzedDataProvider(data)
    body = (
        _structured(provider) if provider.ConsumeBool() else provider.ConsumeBytes(provider.remaining_bytes())
    )
    try:
        whole = decode_args(body)
    except InvalidArgument:
        whole = None
    split = split_node_names(body)
    if split is None:
        return
    pod, names_text = split
    try:
        names = decode_node_names(names_text)
    except InvalidArgument:
        return
    if whole is None:
        raise AssertionError(f"the fast path decodes what decode_args refuses: {body[:300]!r}")
    if whole.pod != pod or list(whole.node_names) != names:
        raise AssertionError(f"the fast path and decode_args disagree on {body[:300]!r}")


def main() -> None:
    """libFuzzer's command line (``-runs``, ``-max_total_time``, ``-rss_limit_mb``, corpus dirs)."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
