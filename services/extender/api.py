"""The extender's wire types: decode ExtenderArgs, encode ExtenderFilterResult and HostPriorityList.

The scheduler's Go structs (k8s.io/kube-scheduler/extender/v1) have no JSON tags, so the keys on
the wire are the capitalised Go field names (`Pod`, `NodeNames`, `FailedNodes`, `Host`, `Score`);
the embedded Pod and NodeList keep Kubernetes camelCase. Everything is checked here, once, so the
core gets typed values and a malformed request is an `InvalidArgument` (HTTP 400), never a crash.
A filter answer always carries the full list of passing nodes: `null` would mean "none passes".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from snapcache.errors import InvalidArgument, invalid
from snapcache.pod_requests import PodInfo

MIN_SCORE: Final = 0  # MinExtenderPriority
MAX_SCORE: Final = 10  # MaxExtenderPriority
_REASON: Final = "INVALID_EXTENDER_ARGS"


@dataclass(frozen=True, slots=True)
class ExtenderArgs:
    """A decoded filter/prioritize request: the pod and either node names or full nodes."""

    pod: PodInfo
    node_names: tuple[str, ...]
    # Full-Nodes mode: the node objects as sent (echoed back in the filter answer) and their labels.
    nodes: tuple[Mapping[str, Any], ...] | None = None
    node_labels: tuple[Mapping[str, str], ...] = ()

    @property
    def full_nodes(self) -> bool:
        """True when the scheduler sent Node objects (nodeCacheCapable: false)."""
        return self.nodes is not None


def _bad(path: str, what: str) -> InvalidArgument:
    return invalid(path, what, reason=_REASON)


def _object(value: Any, path: str, *, required: bool = True) -> Mapping[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise _bad(path, f"must be an object, not {_type(value)}")
    return value


def _string(value: Any, path: str, *, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _bad(path, f"must be a string, not {_type(value)}")
    return value


def _string_map(value: Any, path: str) -> Mapping[str, str]:
    mapping = _object(value, path, required=False)
    for key, item in mapping.items():
        if not isinstance(item, str):
            raise _bad(f"{path}[{key!r}]", f"must be a string, not {_type(item)}")
    return mapping


def _type(value: Any) -> str:
    names: dict[type, str] = {dict: "object", list: "array", str: "string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _containers(spec: Mapping[str, Any], key: str) -> tuple[tuple[str, str], ...]:
    items = spec.get(key)
    if items is None:
        return ()
    if not isinstance(items, list):
        raise _bad(f"Pod.spec.{key}", f"must be an array, not {_type(items)}")
    found = []
    for position, item in enumerate(items):
        container = _object(item, f"Pod.spec.{key}[{position}]")
        name = _string(container.get("name"), f"Pod.spec.{key}[{position}].name")
        image = _string(container.get("image"), f"Pod.spec.{key}[{position}].image")
        found.append((name, image))
    return tuple(found)


def decode_pod(value: Any) -> PodInfo:
    """The pod of an ExtenderArgs."""
    pod = _object(value, "Pod")
    metadata = _object(pod.get("metadata"), "Pod.metadata")
    spec = _object(pod.get("spec"), "Pod.spec", required=False)
    return PodInfo(
        uid=_string(metadata.get("uid"), "Pod.metadata.uid"),
        namespace=_string(metadata.get("namespace"), "Pod.metadata.namespace"),
        name=_string(metadata.get("name"), "Pod.metadata.name"),
        annotations=_string_map(metadata.get("annotations"), "Pod.metadata.annotations"),
        init_images=_containers(spec, "initContainers"),
        images=_containers(spec, "containers"),
    )


def decode_args(body: bytes) -> ExtenderArgs:
    """Parse and check an ExtenderArgs body; `InvalidArgument` says what is wrong."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad("body", f"is not valid JSON ({exc})") from None
    top = _object(document, "body")
    if "Pod" not in top or top["Pod"] is None:
        raise _bad("Pod", "is required")
    pod = decode_pod(top["Pod"])
    names = top.get("NodeNames")
    nodes = top.get("Nodes")
    if names is not None:
        if not isinstance(names, list):
            raise _bad("NodeNames", f"must be an array, not {_type(names)}")
        try:
            "".join(names)  # C speed for 5,000 names; a non-string raises
        except TypeError:
            position, name = next((i, n) for i, n in enumerate(names) if not isinstance(n, str))
            raise _bad(f"NodeNames[{position}]", f"must be a string, not {_type(name)}") from None
        return ExtenderArgs(pod=pod, node_names=tuple(names))
    if nodes is None:
        raise _bad("NodeNames", "one of NodeNames (nodeCacheCapable) or Nodes is required")
    node_list = _object(nodes, "Nodes")
    items = node_list.get("items")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise _bad("Nodes.items", f"must be an array, not {_type(items)}")
    node_names = []
    labels = []
    for position, item in enumerate(items):
        node = _object(item, f"Nodes.items[{position}]")
        metadata = _object(node.get("metadata"), f"Nodes.items[{position}].metadata")
        node_names.append(_string(metadata.get("name"), f"Nodes.items[{position}].metadata.name"))
        labels.append(_string_map(metadata.get("labels"), f"Nodes.items[{position}].metadata.labels"))
    return ExtenderArgs(pod=pod, node_names=tuple(node_names), nodes=tuple(items), node_labels=tuple(labels))


# How kube-scheduler's encoding/json writes a NodeNames request: struct fields in declaration
# order, no spaces. Inside a JSON string a quote is always escaped, so this byte sequence can only
# be a key: the top-level one, or one nested in the pod.
_NODE_NAMES_TAIL: Final = b',"Nodes":null,"NodeNames":['
_POD_HEAD: Final = b'{"Pod":'


def peek_pod(body: bytes) -> PodInfo | None:
    """The pod of a NodeNames request without decoding its (thousands of) node names.

    None when the body does not have the exact shape the scheduler writes, or the pod is not
    valid; the caller then decodes the whole request with `decode_args`, which says what is wrong.
    Lets a pod that uses no cache be answered in a few microseconds whatever the cluster's size.
    The node names are not read: for such a pod nothing in them could change the answer (`[]`),
    so a damaged list after a valid pod gets that same answer instead of a 400.
    """
    if body[-1:].isspace():
        body = body.rstrip()
    if not body.startswith(_POD_HEAD) or not body.endswith(b"]}"):
        return None
    # The first occurrence is the top-level key unless the pod nests one; then the text before it
    # is not a whole JSON value, and the last occurrence (only names follow the real one) is tried.
    # A whole JSON value cannot be a proper prefix of another, so a parse means the real pod.
    for cut in (body.find(_NODE_NAMES_TAIL), body.rfind(_NODE_NAMES_TAIL)):
        if cut < 0:
            return None
        try:
            return decode_pod(orjson.loads(body[len(_POD_HEAD) : cut]))
        except orjson.JSONDecodeError:
            continue
        except InvalidArgument:
            return None
    return None


def encode_filter_result(
    args: ExtenderArgs, *, passing: Sequence[int], failed: Mapping[str, str], error: str = ""
) -> bytes:
    """ExtenderFilterResult with the passing nodes (indexes into the request's nodes).

    NodeNames mode answers `NodeNames`; full-Nodes mode answers `Nodes` (the scheduler reads only
    that one there). A rejected node is in both `FailedNodes` (what 1.20 reads) and
    `FailedAndUnresolvableNodes` (newer schedulers: preemption cannot help).
    """
    result: dict[str, Any] = {
        "Nodes": None,
        "NodeNames": None,
        "FailedNodes": dict(failed),
        "FailedAndUnresolvableNodes": dict(failed),
        "Error": error,
    }
    if args.nodes is not None:
        result["Nodes"] = {"metadata": {}, "items": [args.nodes[i] for i in passing]}
    else:
        result["NodeNames"] = [args.node_names[i] for i in passing]
    return orjson.dumps(result)


# Characters of node names (DNS subdomains) that need no JSON escaping.
_PLAIN_NAME_CHARS: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:"
# A dict, not a tuple: a score outside 0-10 is a KeyError rather than a negative index.
_SCORE_JOINS: Final = {score: f'","Score":{score}}},{{"Host":"' for score in range(MIN_SCORE, MAX_SCORE + 1)}


def encode_host_priorities(hosts: Sequence[str], scores: Sequence[int]) -> bytes:
    """HostPriorityList: `[{"Host": name, "Score": int}]`; a float would void the whole answer.

    An empty list is a valid answer: the scheduler adds the scores of the hosts listed, so every
    node not listed gets 0 from the extender. Scores outside 0-10 are refused (`ValueError`).
    """
    if len(hosts) != len(scores):
        raise ValueError("one score per host")
    if not hosts:
        return b"[]"
    # 5,000 dicts through orjson cost ~1 ms; the same text joined from plain names, a quarter.
    if "".join(hosts).encode().translate(None, _PLAIN_NAME_CHARS):  # a name that needs escaping
        return orjson.dumps([{"Host": h, "Score": int(s)} for h, s in zip(hosts, scores, strict=True)])
    parts: list[str] = [""] * (2 * len(hosts))
    parts[::2] = hosts
    try:
        parts[1::2] = map(_SCORE_JOINS.__getitem__, scores)
    except KeyError:
        raise ValueError(f"scores must be integers {MIN_SCORE} to {MAX_SCORE}") from None
    text = '[{"Host":"' + "".join(parts)
    return (text[: -len(',{"Host":"')] + "]").encode()
