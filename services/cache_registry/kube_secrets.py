"""Registry credentials from Kubernetes ``kubernetes.io/dockerconfigjson`` Secrets.

The only module of the registry that imports the Kubernetes client (checked by ``.importlinter``),
so the rest of the wing stays testable without a cluster and the client's types do not leak.

Each Secret is read just before a build pulls, never cached or stored: a rotated pull secret
takes effect at the next build. Failures are build failures with a reason and retry meaning:

- the Secret (or its namespace) does not exist: ``CREDENTIALS_NOT_FOUND``, permanent;
- the registry may not read it (HTTP 403): ``CREDENTIALS_FORBIDDEN``, permanent, naming the RBAC
  permission to grant; a rejected registry identity (401) is ``CREDENTIALS_UNAVAILABLE``;
- it is not a ``kubernetes.io/dockerconfigjson`` Secret or its ``.dockerconfigjson`` is not a
  usable docker config: ``CREDENTIALS_INVALID``, permanent;
- the API server cannot be reached, times out, answers 5xx or 429: ``KUBERNETES_API_UNAVAILABLE``,
  retryable (the worker retries with backoff).

Messages name the Secret and the problem, never its contents; the client's exceptions (whose text
carries whole response bodies) are never formatted into a message.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from pathlib import Path

import urllib3
from kubernetes import client as kube_client
from kubernetes.client.exceptions import ApiException

from services.cache_registry.credentials import DockerConfigError, parse_docker_config
from services.cache_registry.provider import BuildFailure, RegistryCredential
from snapcache.kube_clients import IN_CLUSTER_CA_FILE, IN_CLUSTER_TOKEN_FILE, kube_api_client

DOCKERCONFIGJSON_TYPE = "kubernetes.io/dockerconfigjson"
DOCKERCONFIGJSON_KEY = ".dockerconfigjson"

# The Kubernetes API, as a pod sees it (what kubernetes.config.load_incluster_config reads).

_UNAVAILABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def split_secret_ref(secret: str) -> tuple[str, str]:
    """``namespace/name`` -> ``(namespace, name)``; validation already refused anything else."""
    namespace, _, name = secret.partition("/")
    if not namespace or not name or "/" in name:
        raise BuildFailure("CREDENTIALS_INVALID", f"{secret!r} is not namespace/name of a Secret")
    return namespace, name


def credentials_from_secret(
    *, secret: str, secret_type: str | None, data: Mapping[str, str | bytes] | None
) -> dict[str, RegistryCredential]:
    """Credentials by registry host from a Secret's ``type`` and ``data`` (base64 values, as served)."""
    if secret_type != DOCKERCONFIGJSON_TYPE:
        raise BuildFailure(
            "CREDENTIALS_INVALID",
            f"Secret {secret} has type {secret_type or '(none)'}; registry credentials must be a "
            f"{DOCKERCONFIGJSON_TYPE} Secret (kubectl create secret docker-registry ...)",
        )
    encoded = (data or {}).get(DOCKERCONFIGJSON_KEY)
    if not encoded:
        raise BuildFailure("CREDENTIALS_INVALID", f"Secret {secret} has no {DOCKERCONFIGJSON_KEY} key")
    problem = ""
    try:
        config = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        problem = f"its {DOCKERCONFIGJSON_KEY} is not valid base64"
        config = b""
    if not problem:
        try:
            return parse_docker_config(config)
        except DockerConfigError as exc:  # its message never quotes the document
            problem = f"its {DOCKERCONFIGJSON_KEY}: {exc}"
    # raised outside the except blocks so no exception chain carries the Secret's bytes
    raise BuildFailure("CREDENTIALS_INVALID", f"Secret {secret} is unusable: {problem}")


def _status_message(body: str | None) -> str:
    """The API server's own ``Status.message`` (it names the user and verb, never object data)."""
    try:
        status = json.loads(body or "")
    except (TypeError, ValueError):
        return ""
    message = status.get("message", "") if isinstance(status, dict) else ""
    return message if isinstance(message, str) else ""


def failure_for_api_status(
    *, secret: str, status: int, reason: str = "", body: str | None = None
) -> BuildFailure:
    """The build failure for an API error reading ``secret`` (HTTP ``status``, 0: no response)."""
    namespace, name = split_secret_ref(secret)
    answer = (f"HTTP {status}" if status else "no response") + (f" {reason}" if reason else "")
    if status == 404:
        return BuildFailure(
            "CREDENTIALS_NOT_FOUND",
            f"Secret {secret} not found: create a {DOCKERCONFIGJSON_TYPE} Secret {name} in "
            f"namespace {namespace}, or fix the reference",
        )
    if status == 403:
        said = _status_message(body)
        return BuildFailure(
            "CREDENTIALS_FORBIDDEN",
            f"the registry may not read Secret {secret}: grant its identity RBAC permission "
            f'"get" on "secrets" in namespace {namespace} (a Role and RoleBinding)'
            + (f"; the API server said: {said}" if said else ""),
        )
    if status == 401:
        return BuildFailure(
            "CREDENTIALS_UNAVAILABLE",
            f"the Kubernetes API rejected the registry's own credentials (HTTP 401) reading Secret "
            f"{secret}: check its kubeconfig or service account token",
        )
    if status == 0 or status in _UNAVAILABLE_STATUSES:
        return BuildFailure(
            "KUBERNETES_API_UNAVAILABLE",
            f"the Kubernetes API did not serve Secret {secret} ({answer})",
            retryable=True,
        )
    return BuildFailure(
        "CREDENTIALS_UNAVAILABLE",
        f"the Kubernetes API refused to serve Secret {secret} ({answer})",
    )


class KubeSecretReader:
    """Reads ``dockerconfigjson`` Secrets through the Kubernetes API; thread-safe, close when done."""

    def __init__(self, api_client: kube_client.ApiClient, *, timeout_seconds: float = 10.0) -> None:
        self._api = api_client
        self._timeout = timeout_seconds
        self.server = str(api_client.configuration.host)

    @classmethod
    def from_kubeconfig(cls, path: Path | str, *, context: str | None = None) -> KubeSecretReader:
        """A reader using a kubeconfig file (outside a cluster); a bad file fails here, at start-up."""
        return cls(kube_api_client(kubeconfig=path, context=context))

    @classmethod
    def in_cluster(
        cls,
        *,
        token_file: str = IN_CLUSTER_TOKEN_FILE,
        ca_file: str = IN_CLUSTER_CA_FILE,
        environ: Mapping[str, str] | None = None,
    ) -> KubeSecretReader:
        """A reader using the pod's service account; fails outside a pod."""
        return cls(kube_api_client(in_cluster=True, token_file=token_file, ca_file=ca_file, environ=environ))

    def registry_credentials(self, secret: str) -> dict[str, RegistryCredential]:
        """The credentials in Secret ``namespace/name``; raises ``BuildFailure`` (module docstring)."""
        namespace, name = split_secret_ref(secret)
        try:
            found = kube_client.CoreV1Api(self._api).read_namespaced_secret(
                name, namespace, _request_timeout=self._timeout
            )
        except ApiException as exc:
            failure = failure_for_api_status(
                secret=secret, status=exc.status or 0, reason=str(exc.reason or ""), body=exc.body
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            failure = BuildFailure(
                "KUBERNETES_API_UNAVAILABLE",
                f"cannot reach the Kubernetes API at {self.server} to read Secret {secret} "
                f"({type(exc).__name__})",
                retryable=True,
            )
        else:
            return credentials_from_secret(secret=secret, secret_type=found.type, data=found.data)
        raise failure  # outside the except blocks: no chained client exception carries a body

    def close(self) -> None:
        """Release the client's connections."""
        self._api.close()  # type: ignore[no-untyped-call]
