"""Which pods use an image cache, how (auto or a manual cache id, strict or not) and their images.

On the ground floor because two wings read the same annotations: the extender (where to schedule
the pod) and the node agent (which disk to provision for it once bound); one grammar, so they
never disagree about a pod.

Annotations, snapcache's first, then Tencent TKE's so manifests written for TKE work unchanged:

- ``snapcache.io/use-image-cache`` / ``eks.tke.cloud.tencent.com/use-image-cache``: ``auto``, a
  cache id ``imc-xxxxxxxx`` (or ``imageCaches/imc-...``), or ``off``/``false`` to opt out of a
  cluster-wide ``auto`` default;
- ``snapcache.io/image-cache-strict: "true"``: only nodes in zones where the cache can be used.

Images are those of init and regular containers (ephemeral containers do not exist at
scheduling time; the node agent reads the same), normalized by the project's one grammar
(`snapcache.images`). Pure: no Kubernetes client; `pod_info` reads a Pod as the API serves it.

A request also carries the pod's namespace and the names in its ``spec.imagePullSecrets`` (the
ServiceAccount admission plugin has added its ServiceAccount's there by the time the pod is
scheduled): the matcher gives a cache holding a private image only to pods that may use the
Secret that pulled it (docs/security.md).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from snapcache.cache_names import parse_cache_name
from snapcache.errors import InvalidArgument
from snapcache.images import InvalidImageReference, parse_image_reference

USE_ANNOTATION: Final = "snapcache.io/use-image-cache"
TKE_USE_ANNOTATION: Final = "eks.tke.cloud.tencent.com/use-image-cache"
STRICT_ANNOTATION: Final = "snapcache.io/image-cache-strict"
MAX_IMAGES: Final = 64  # the matcher's limit
_OFF_VALUES: Final = frozenset({"off", "false", "no", "none", "disabled"})
_TRUE_VALUES: Final = frozenset({"true", "yes", "1"})


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What is read of a pod to know whether and how it uses an image cache."""

    uid: str
    namespace: str
    name: str
    annotations: Mapping[str, str]
    init_images: tuple[tuple[str, str], ...]  # (container name, image) of init containers
    images: tuple[tuple[str, str], ...]  # (container name, image) of regular containers
    image_pull_secrets: tuple[str, ...] = ()  # names in spec.imagePullSecrets, in order, distinct


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _object(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _containers(items: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(items, list):
        return ()
    return tuple(
        (_text(item.get("name")), _text(item.get("image"))) for item in items if isinstance(item, dict)
    )


def pull_secret_names(items: Any) -> tuple[str, ...]:
    """The names in a pod's ``spec.imagePullSecrets`` (``[{"name": ...}]``), distinct, in order.

    Lenient like `pod_info`: an entry that is not an object with a non-empty string name is
    skipped (it names no Secret the kubelet could use either).
    """
    if not isinstance(items, list):
        return ()
    names: dict[str, None] = {}
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        if isinstance(name, str) and name:
            names.setdefault(name, None)
    return tuple(names)


def pod_info(pod: Mapping[str, Any]) -> PodInfo:
    """A Pod object as the API server serves it (JSON), read leniently: what is malformed is empty.

    An empty image is then refused by `pod_images` like any invalid one, so the pod pulls.
    """
    metadata = _object(pod.get("metadata"))
    spec = _object(pod.get("spec"))
    annotations = _object(metadata.get("annotations"))
    return PodInfo(
        uid=_text(metadata.get("uid")),
        namespace=_text(metadata.get("namespace")),
        name=_text(metadata.get("name")),
        annotations={key: value for key, value in annotations.items() if isinstance(value, str)},
        init_images=_containers(spec.get("initContainers")),
        images=_containers(spec.get("containers")),
        image_pull_secrets=pull_secret_names(spec.get("imagePullSecrets")),
    )


class Mode(enum.Enum):
    """How a pod uses image caches."""

    OFF = "off"
    AUTO = "auto"
    MANUAL = "manual"


@dataclass(frozen=True, slots=True)
class PodRequest:
    """A pod's image-cache request; `problem` is set when it asks for a cache but cannot be matched."""

    mode: Mode
    manual_id: str = ""
    strict: bool = False
    images: tuple[str, ...] = ()
    problem: str = ""
    namespace: str = ""  # the pod's: with image_pull_secrets, which private images it may use
    image_pull_secrets: tuple[str, ...] = ()

    @property
    def wants_cache(self) -> bool:
        """True when the matcher should be asked."""
        return self.mode is not Mode.OFF and not self.problem


def parse_default_mode(text: str) -> Mode:
    """The cluster-wide default for pods without an annotation: ``off`` or ``auto``."""
    value = text.strip().lower()
    if value == "off":
        return Mode.OFF
    if value == "auto":
        return Mode.AUTO
    raise ValueError(f"the default image-cache mode must be off or auto, not {text!r}")


def pod_request(pod: PodInfo, *, default_mode: Mode) -> PodRequest:
    """Read the pod's annotations and images into a request."""
    annotation = USE_ANNOTATION if USE_ANNOTATION in pod.annotations else TKE_USE_ANNOTATION
    raw = pod.annotations.get(annotation)
    strict = pod.annotations.get(STRICT_ANNOTATION, "").strip().lower() in _TRUE_VALUES
    manual_id = ""
    if raw is None:
        mode = default_mode
    else:
        value = raw.strip()
        if value.lower() == "auto":
            mode = Mode.AUTO
        elif value.lower() in _OFF_VALUES or not value:
            return PodRequest(Mode.OFF)
        else:
            try:
                manual_id = parse_cache_name(value, field=annotation)
            except InvalidArgument:
                return PodRequest(
                    Mode.AUTO,
                    strict=strict,
                    problem=f"annotation {annotation}={value[:80]!r} is neither auto nor an image cache "
                    "id (imc-xxxxxxxx)",
                )
            mode = Mode.MANUAL
    if mode is Mode.OFF:
        return PodRequest(Mode.OFF)
    images, problem = pod_images(pod)
    return PodRequest(
        mode,
        manual_id=manual_id,
        strict=strict,
        images=images,
        problem=problem,
        namespace=pod.namespace,
        image_pull_secrets=pod.image_pull_secrets,
    )


def pod_images(pod: PodInfo) -> tuple[tuple[str, ...], str]:
    """The pod's distinct normalized images (init containers first) and a problem, if any."""
    seen: dict[str, None] = {}
    for kind, containers in (("init container", pod.init_images), ("container", pod.images)):
        for name, image in containers:
            try:
                seen.setdefault(str(parse_image_reference(image)), None)
            except InvalidImageReference as exc:
                return (), f"image of {kind} {name[:63]!r} is not valid: {exc}"
    if not seen:
        return (), "the pod has no container images"
    if len(seen) > MAX_IMAGES:
        return (), f"the pod has {len(seen)} distinct images; an image cache holds at most {MAX_IMAGES}"
    return tuple(seen), ""
