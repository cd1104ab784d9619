"""Resolving credential references to credentials, at build time only.

A cache stores where its registry credentials are (a docker config path, a Kubernetes Secret);
the worker asks here for the credentials just before a pull and hands them to the provider. They
are never written to the database, an event or a log line.

Secrets are read through a `SecretSource` (``kube_secrets.KubeSecretReader`` in production), so
this module needs no Kubernetes client; without one, a Secret reference fails the build with
``CREDENTIALS_UNAVAILABLE`` and says how to give the registry access to the Kubernetes API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.cache_registry.credentials import DockerConfigError, load_docker_config
from services.cache_registry.model import CredentialRef
from services.cache_registry.provider import BuildFailure, RegistryCredential

KUBECONFIG_ENV = "SNAPCACHE_KUBECONFIG"
CredentialResolver = Callable[[Sequence[CredentialRef]], Mapping[str, RegistryCredential]]
IN_CLUSTER_ENV = "SNAPCACHE_KUBE_IN_CLUSTER"


class SecretSource(Protocol):
    """Reads the credentials in a ``kubernetes.io/dockerconfigjson`` Secret."""

    def registry_credentials(self, secret: str) -> Mapping[str, RegistryCredential]:
        """Credentials by registry host in Secret ``namespace/name``; raises ``BuildFailure``."""
        ...


def _docker_config_credentials(path: str) -> Mapping[str, RegistryCredential]:
    try:
        return load_docker_config(path)
    except (OSError, DockerConfigError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    raise BuildFailure("CREDENTIALS_UNAVAILABLE", f"cannot read docker config {path}: {why}")


class CredentialRefResolver:
    """Turns a cache's credential references into credentials; later references win per host."""

    def __init__(self, secrets: SecretSource | None = None) -> None:
        self._secrets = secrets

    def __call__(self, refs: Sequence[CredentialRef]) -> Mapping[str, RegistryCredential]:
        found: dict[str, RegistryCredential] = {}
        for ref in refs:
            if ref.secret:
                found.update(self._secret(ref.secret))
            else:
                found.update(_docker_config_credentials(ref.docker_config_path))
        return found

    def _secret(self, secret: str) -> Mapping[str, RegistryCredential]:
        if self._secrets is None:
            raise BuildFailure(
                "CREDENTIALS_UNAVAILABLE",
                f"credentials from Secret {secret} need access to the Kubernetes API, which this "
                f"registry was not given: run it in a pod with {IN_CLUSTER_ENV}=1 (in-cluster "
                f"service account) or set {KUBECONFIG_ENV} to a kubeconfig file",
            )
        return self._secrets.registry_credentials(secret)


def resolve_local_credentials(refs: Sequence[CredentialRef]) -> Mapping[str, RegistryCredential]:
    """Credentials for a build without Kubernetes access: docker config files only."""
    return CredentialRefResolver()(refs)


@dataclass(frozen=True, slots=True)
class BuildCredentials:
    """A build's credentials by registry host, and the reference each host's came from."""

    credentials: Mapping[str, RegistryCredential]
    sources: Mapping[str, CredentialRef]


def resolve_with_sources(resolve: CredentialResolver, refs: Sequence[CredentialRef]) -> BuildCredentials:
    """Resolve ``refs`` one at a time, so each host's credentials are known to come from one of them.

    The same result as resolving them together (later references win per host), plus the
    provenance the matcher's authorization rule needs: an image pulled with a host's credentials
    is private to the users of the reference that supplied them.
    """
    credentials: dict[str, RegistryCredential] = {}
    sources: dict[str, CredentialRef] = {}
    for ref in refs:
        for host, credential in resolve([ref]).items():
            credentials[host] = credential
            sources[host] = ref
    return BuildCredentials(credentials, sources)
