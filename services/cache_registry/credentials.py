"""Registry credentials from a docker ``config.json`` (or a ``kubernetes.io/dockerconfigjson`` Secret).

Users already have their pull secrets in this format, so the registry accepts it as is and turns
it into the ``host -> RegistryCredential`` map the distribution client wants.

What is read: ``auths.<key>.auth`` (base64 ``user:password``, which wins over separate fields, as
in Docker), ``username``/``password`` and ``identitytoken``. Keys are normalized to the registry
host the client dials: ``https://index.docker.io/v1/``, ``index.docker.io`` and
``registry-1.docker.io`` all mean ``docker.io``; ``https://host``, ``http://host/v2/`` and
``host`` all mean ``host`` (port kept, name lower-cased). When two keys normalize to the same
host, a key written as a bare host wins over a URL form, then the first in the file.

What is not: ``credHelpers`` and ``credsStore`` name programs to run on the user's machine; a
service cannot run them, so they are ignored (the entries they leave, often ``{}``, are skipped).
``registrytoken`` and the legacy ``.dockercfg`` format (no ``auths`` wrapper) are not supported.

Errors never quote the document: a config holds secrets, and error messages end up in logs and
API responses. They name the entry key and the problem only.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.cache_registry.provider import RegistryCredential

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)


class DockerConfigError(ValueError):
    """A docker config cannot be used; the message never contains secret values."""


def registry_host(key: str) -> str:
    """The registry host an ``auths`` key stands for (``https://index.docker.io/v1/`` -> ``docker.io``)."""
    text = key.strip()
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme) :]
            break
    host = text.split("/", 1)[0].lower()
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def _is_bare_host(key: str) -> bool:
    return "://" not in key and "/" not in key


def _string_field(entry: Mapping[str, Any], name: str, key: str) -> str:
    value = entry.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DockerConfigError(f"docker config: auths[{key!r}].{name} must be a string")
    return value


def _decode_auth(encoded: str, key: str) -> tuple[str, str]:
    problem = ""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        problem = "is not base64 of UTF-8 text"
        decoded = ""
    if not problem and ":" not in decoded:
        problem = 'does not decode to "username:password"'
    if problem:  # raised outside the except block so no exception chain carries the value
        raise DockerConfigError(f"docker config: auths[{key!r}].auth {problem}")
    username, password = decoded.split(":", 1)
    return username, password


def _credential(entry: Mapping[str, Any], key: str) -> RegistryCredential | None:
    username = _string_field(entry, "username", key)
    password = _string_field(entry, "password", key)
    identity_token = _string_field(entry, "identitytoken", key)
    auth = _string_field(entry, "auth", key)
    if auth:
        username, password = _decode_auth(auth, key)
    if not (username or password or identity_token):
        return None
    return RegistryCredential(username=username, password=password, identity_token=identity_token)


def parse_docker_config(data: bytes) -> dict[str, RegistryCredential]:
    """Credentials by registry host from the bytes of a docker ``config.json``."""
    problem = ""
    document: Any = None
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        problem = "is not UTF-8"
    except json.JSONDecodeError as exc:  # its message is position only; .doc (the secrets) is dropped
        problem = f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    if problem:
        raise DockerConfigError(f"docker config {problem}")
    if not isinstance(document, dict):
        raise DockerConfigError("docker config must be a JSON object")
    auths = document.get("auths", {})
    if auths is None:
        auths = {}
    if not isinstance(auths, dict):
        raise DockerConfigError('docker config: "auths" must be an object')
    found: dict[str, tuple[bool, RegistryCredential]] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            raise DockerConfigError(f"docker config: auths[{key!r}] must be an object")
        credential = _credential(entry, key)
        host = registry_host(key)
        if credential is None or not host:
            continue
        bare = _is_bare_host(key)
        if host not in found or (bare and not found[host][0]):
            found[host] = (bare, credential)
    return {host: credential for host, (_, credential) in found.items()}


def load_docker_config(path: Path | str) -> dict[str, RegistryCredential]:
    """Credentials by registry host from a docker ``config.json`` file."""
    return parse_docker_config(Path(path).read_bytes())
