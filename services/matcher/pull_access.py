"""Who may use a cached private image: a cache never bypasses a registry's authorization.

A cache built with a namespace's pull secret holds images that only that secret's users could
pull. Mounting the cache for any other pod would hand them the images without the registry's
consent (the multi-tenant hole reported against Spegel and ECI-style shared caches). So the
registry records, per cached image, whether its registry refused an anonymous pull
(``requires_credentials``) and which credential references pulled it (``authorized_by``), and the
matcher applies one rule (docs/security.md):

    a private image covers a pod's image only if the pod may use every credential that
    authorized its pull: each is a Secret in the pod's namespace named in the pod's
    ``spec.imagePullSecrets``.

That is the permission the kubelet itself checks: a pod pulls with the pull secrets it names,
from its own namespace. Public images match for everyone.

Credentials from a docker config on the registry's host (``docker_config_path``) are the
operator's, like a kubelet's node credentials. No pod names them, so by default their images
match no pod; the operator may declare them shared with every pod (the matcher's
``share_node_credentials`` setting), resolved when a cache enters the index, not per request.

Cost: an entry holding no private image has ``private = None`` and pays one attribute check per
judged cache; the rule runs only for caches that hold private images.

Messages say what the pod lacks and no more: a Secret is named only when it is in the pod's own
namespace; a Secret of another namespace (its name or namespace) is never revealed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

# what the index holds and what the pod asks for, as this module only passes them through (the
# index's HeldImage and match_requests' PodImage; typed generically so the index, which files
# grants, is not imported back)
Held = TypeVar("Held")
Asked = TypeVar("Asked")


@dataclass(frozen=True, slots=True)
class Grant:
    """The credentials that authorized a private image's pull; a pod must be allowed every one."""

    secrets: tuple[tuple[str, str], ...]  # (namespace, name) of Kubernetes Secrets
    # Credentials no pod can be allowed: the registry's own docker config (not shared), or a
    # reference the matcher cannot read. Matches nobody.
    nobody: bool = False


class CredentialSource(Protocol):
    """A credential reference as the registry records it (the API's RegistryCredentialRef)."""

    @property
    def secret(self) -> str: ...
    @property
    def docker_config_path(self) -> str: ...


def grant_of(refs: Iterable[CredentialSource], *, share_node_credentials: bool) -> Grant | None:
    """The grant for an image pulled with ``refs``; None when every pod may use it.

    An image marked private with no reference at all (which a registry never records) is
    nobody's: the safe reading of a record that cannot be checked.
    """
    secrets: list[tuple[str, str]] = []
    nobody = False
    seen = False
    for ref in refs:
        seen = True
        if ref.secret:
            namespace, slash, name = ref.secret.partition("/")
            if slash and namespace and name:
                secrets.append((namespace, name))
            else:
                nobody = True
        elif not share_node_credentials:
            nobody = True
    if not seen:
        return Grant((), nobody=True)
    if not secrets and not nobody:
        return None  # node credentials only, shared by the operator
    return Grant(tuple(dict.fromkeys(secrets)), nobody=nobody)


def refusal(grant: Grant, *, namespace: str, pull_secrets: frozenset[str]) -> str:
    """Why a pod in ``namespace`` naming ``pull_secrets`` may not use the image; "" if it may."""
    if grant.nobody:
        return (
            "pulled with credentials no pod may use from a cache (the registry's own docker config, "
            "not shared with pods)"
        )
    if not namespace:
        return "private, and the request names no pod namespace and pull secrets to check access with"
    for secret_namespace, _ in grant.secrets:
        if secret_namespace != namespace:
            return f"pulled with credentials that pods in namespace {namespace} may not use"
    for _, name in grant.secrets:
        if name not in pull_secrets:
            return f"pulled with Secret {name}, which the pod does not list in imagePullSecrets"
    return ""


def first_refusal(
    private: Mapping[Held, Grant],
    covered: Iterable[tuple[Asked, Held]],
    *,
    namespace: str,
    pull_secrets: frozenset[str],
) -> tuple[Asked, str] | None:
    """The first of the pod's covered images it may not use from the cache, and why; None if none.

    ``private`` maps the cache's private images to their grants; ``covered`` pairs each pod image
    the cache holds with the held image it matched.
    """
    for image, held in covered:
        grant = private.get(held)
        if grant is None:
            continue
        why = refusal(grant, namespace=namespace, pull_secrets=pull_secrets)
        if why:
            return image, why
    return None
