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

from services.extender.node_index import PLAIN_NAME_CHARS
from snapcache.errors import InvalidArgument, invalid
from snapcache.pod_requests import PodInfo, pull_secret_names

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
        image_pull_secrets=pull_secret_names(spec.get("imagePullSecrets")),
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
        _check_strings(names)
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


def split_node_names(body: bytes) -> tuple[PodInfo, memoryview] | None:
    """The pod of a NodeNames request and the text of its names array, without decoding the names.

    None when the body does not have the exact shape the scheduler writes, or the pod is not
    valid; the caller then decodes the whole request with `decode_args`, which says what is wrong.
    Lets a pod that uses no cache be answered in a few microseconds whatever the cluster's size,
    and lets a pod that does have its matcher call started before the names are decoded.
    """
    if body[-1:].isspace():
        body = body.rstrip()
    if not body.startswith(_POD_HEAD) or not body.endswith(b"]}"):
        return None
    # The first occurrence is the top-level key unless the pod nests one; then the text before it
    # is not a whole JSON value, and the last occurrence (only names follow the real one) is tried.
    # A whole JSON value cannot be a proper prefix of another, so a parse means the real pod.
    cut = body.find(_NODE_NAMES_TAIL)
    for attempt in range(2):
        if attempt:  # scanning 64 KiB of names backwards costs as much as decoding the pod
            last = body.rfind(_NODE_NAMES_TAIL)
            if last == cut:
                return None
            cut = last
        if cut < 0:
            return None
        try:
            pod = decode_pod(orjson.loads(body[len(_POD_HEAD) : cut]))
        except orjson.JSONDecodeError:
            continue
        except InvalidArgument:
            return None
        # a view: copying 64 KiB of names would be a third of the time of a pod that uses no cache
        return pod, memoryview(body)[cut + len(_NODE_NAMES_TAIL) - 1 : -1]
    return None


# In the key of either annotation that asks for a cache (snapcache's and TKE's).
_CACHE_KEY_TEXT: Final = b"use-image-cache"


def names_request_without_cache_key(body: bytes) -> bool:
    """True for a NodeNames request in the scheduler's layout whose pod cannot name a cache.

    The pod's JSON is checked (a body that is not one gets the whole decode and its 400), but
    neither read into a `PodInfo` nor its fields' types checked: without the text of either
    annotation's key, and without a ``\\u`` escape that could spell it, the pod has no such
    annotation. With the cluster's default `off` that settles prioritize: `[]`, whatever the
    fields hold, as a failed prioritize call would (the scheduler ignores it). A third of the
    time of the `split_node_names` path, which is most of what such a pod costs.
    """
    if not body.startswith(_POD_HEAD) or not body.rstrip().endswith(b"]}"):
        return False
    cut = body.find(_NODE_NAMES_TAIL)
    if cut < 0 or body.find(_CACHE_KEY_TEXT, 0, cut) >= 0 or body.find(b"\\u", 0, cut) >= 0:
        return False
    try:
        return isinstance(orjson.loads(memoryview(body)[len(_POD_HEAD) : cut]), dict)
    except orjson.JSONDecodeError:
        return False


def peek_pod(body: bytes) -> PodInfo | None:
    """The pod of a NodeNames request without decoding its names (see `split_node_names`).

    The node names are not read: for a pod that uses no cache nothing in them could change the
    prioritize answer (`[]`), so a damaged list after a valid pod gets that same answer.
    """
    split = split_node_names(body)
    return split[0] if split is not None else None


def decode_node_names(text: bytes | memoryview) -> list[str]:
    """The `NodeNames` array cut out by `split_node_names`; `InvalidArgument` if it is not one of strings."""
    try:
        names = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _bad("body", f"is not valid JSON ({exc})") from None
    if not isinstance(names, list):
        raise _bad("NodeNames", f"must be an array, not {_type(names)}")
    _check_strings(names)
    return names


def _check_strings(names: list[Any]) -> None:
    try:
        "".join(names)  # C speed for 5,000 names; a non-string raises
    except TypeError:
        position, name = next((i, n) for i, n in enumerate(names) if not isinstance(n, str))
        raise _bad(f"NodeNames[{position}]", f"must be a string, not {_type(name)}") from None


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


def encode_all_names_pass(names_text: bytes | memoryview) -> bytes:
    """ExtenderFilterResult passing every node of a NodeNames request: its names array echoed as sent.

    ``names_text`` must be the array `split_node_names` cut out and `decode_node_names` accepted.
    """
    return _ALL_PASS_HEAD + names_text + _ALL_PASS_TAIL


_ALL_PASS_HEAD: Final = b'{"Nodes":null,"NodeNames":'
_ALL_PASS_TAIL: Final = b',"FailedNodes":{},"FailedAndUnresolvableNodes":{},"Error":""}'
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
    if "".join(hosts).encode().translate(None, PLAIN_NAME_CHARS):  # a name that needs escaping
        return orjson.dumps([{"Host": h, "Score": int(s)} for h, s in zip(hosts, scores, strict=True)])
    parts: list[str] = [""] * (2 * len(hosts))
    parts[::2] = hosts
    try:
        parts[1::2] = map(_SCORE_JOINS.__getitem__, scores)
    except KeyError:
        raise ValueError(f"scores must be integers {MIN_SCORE} to {MAX_SCORE}") from None
    text = '[{"Host":"' + "".join(parts)
    return (text[: -len(',{"Host":"')] + "]").encode()


def encode_score_groups(groups: Sequence[tuple[int, Sequence[str]]], *, plain: bool) -> bytes:
    """HostPriorityList from (score, hosts) groups: one string join per group, not a dict per host.

    ``plain``: no host needs JSON escaping (node names are DNS subdomains; the node index knows).
    Scores outside 0-10 are refused (`ValueError`); empty groups are left out.
    """
    if not plain:
        return orjson.dumps([{"Host": h, "Score": int(s)} for s, hosts in groups for h in hosts])
    parts = []
    for score, hosts in groups:
        join = _SCORE_JOINS.get(score) if type(score) is int else None
        if join is None:
            raise ValueError(f"scores must be integers {MIN_SCORE} to {MAX_SCORE}")
        if hosts:
            parts.append(f'{{"Host":"{join.join(hosts)}","Score":{score}}}')
    return f"[{','.join(parts)}]".encode()
