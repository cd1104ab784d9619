"""containerd's per-registry ``hosts.toml``: send a registry's pulls to the node agent's mirror first.

containerd (``config_path`` under ``[plugins."io.containerd.grpc.v1.cri".registry]``) reads
``<config_path>/<registry host>/hosts.toml``. Each file written here says: for this registry, try
the mirror (``pull`` and ``resolve``: manifests by tag and by digest, blobs) and fall back to the
registry itself, the ``server``. containerd adds ``?ns=<registry>`` to what it sends the mirror,
which is how one mirror serves every registry. When the mirror is down or answers an error,
containerd tries the next host, the real registry: the agent can only make pulls faster, never
make them fail. Pure: the text only; the agent's edge writes the files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Final

from snapcache.images import DEFAULT_REGISTRY

DOCKER_HUB_ENDPOINT: Final = "registry-1.docker.io"
# The first line of every file the agent writes: how it knows a file is its own to replace.
MARKER: Final = "# Written by snapcache node-agent"


def upstream_url(registry: str, *, plain_http: bool = False) -> str:
    """The URL a registry host is reached at: Docker Hub's API endpoint for ``docker.io``."""
    host = DOCKER_HUB_ENDPOINT if registry == DEFAULT_REGISTRY else registry
    return f"{'http' if plain_http else 'https'}://{host}"


def _string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def hosts_toml(*, registry: str, mirror_url: str, plain_http: bool = False) -> str:
    """The ``hosts.toml`` of ``registry``: the mirror for pull and resolve, the registry as fallback."""
    return (
        f"{MARKER}: {registry} is pulled through the node's mirror first.\n"
        f"server = {_string(upstream_url(registry, plain_http=plain_http))}\n"
        "\n"
        f"[host.{_string(mirror_url)}]\n"
        '  capabilities = ["pull", "resolve"]\n'
    )


def hosts_files(
    registries: Iterable[str], *, mirror_url: str, plain_http: frozenset[str] = frozenset()
) -> dict[str, str]:
    """``{directory name: hosts.toml text}`` for Docker Hub and every registry given."""
    return {
        registry: hosts_toml(registry=registry, mirror_url=mirror_url, plain_http=registry in plain_http)
        for registry in sorted({DEFAULT_REGISTRY, *registries})
    }
