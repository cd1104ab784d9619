"""Resolving credential references to credentials, at build time only.

A cache stores where its registry credentials are (a docker config path, a Kubernetes Secret);
the worker asks here for the credentials just before a pull and hands them to the provider. They
are never written to the database, an event or a log line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from services.cache_registry.credentials import DockerConfigError, load_docker_config
from services.cache_registry.model import CredentialRef
from services.cache_registry.provider import BuildFailure, RegistryCredential


def resolve_local_credentials(refs: Sequence[CredentialRef]) -> Mapping[str, RegistryCredential]:
    """Credentials for a build: docker config files here; Kubernetes Secrets need the operator."""
    found: dict[str, RegistryCredential] = {}
    for ref in refs:
        if ref.secret:
            raise BuildFailure(
                "CREDENTIALS_UNAVAILABLE",
                f"credentials from Secret {ref.secret} need the registry to run in a Kubernetes cluster",
            )
        try:
            found.update(load_docker_config(ref.docker_config_path))
        except (OSError, DockerConfigError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise BuildFailure(
                "CREDENTIALS_UNAVAILABLE", f"cannot read docker config {ref.docker_config_path}: {why}"
            ) from None
    return found
