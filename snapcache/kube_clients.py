"""A Kubernetes API client from a kubeconfig file or a pod's service account, for every wing.

One loader, so the registry (Secrets), the extender (nodes, events) and the operator (its custom
resources) accept the same configuration and refuse a broken one the same way: a `ValueError`
naming the file and the problem, raised at start-up rather than at the first request. Each wing
still talks to the API through its own module (see `.importlinter`); this one only builds the
client.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml
from kubernetes import client as kube_client
from kubernetes import config as kube_config
from kubernetes.config.config_exception import ConfigException

IN_CLUSTER_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
IN_CLUSTER_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


def kube_api_client(
    *,
    kubeconfig: Path | str | None = None,
    in_cluster: bool = False,
    context: str | None = None,
    token_file: str = IN_CLUSTER_TOKEN_FILE,
    ca_file: str = IN_CLUSTER_CA_FILE,
    environ: Mapping[str, str] | None = None,
    retries: int = 1,
) -> kube_client.ApiClient:
    """A client for ``kubeconfig`` (and ``context``), or in-cluster; a bad one is a ValueError.

    ``retries``: quick retries of a dropped connection (callers back off on longer outages).
    """
    configuration = kube_client.Configuration()
    try:
        if in_cluster:
            loader = kube_config.incluster_config.InClusterConfigLoader(  # type: ignore[no-untyped-call]
                token_filename=token_file,
                cert_filename=ca_file,
                environ=os.environ if environ is None else environ,
            )
            loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
        elif kubeconfig is not None:
            kube_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig), context=context, client_configuration=configuration
            )
        else:
            raise ValueError("neither a kubeconfig nor in-cluster access was given")
    # Not YAML (yaml.YAMLError), or YAML of the wrong shape (TypeError, AttributeError deep in the
    # loader): a broken file must stop start-up with its name, not a traceback.
    except (ConfigException, OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as exc:
        where = "the in-cluster Kubernetes configuration" if in_cluster else f"kubeconfig {kubeconfig}"
        raise ValueError(f"cannot use {where}: {type(exc).__name__}: {exc}") from None
    configuration.retries = retries
    return kube_client.ApiClient(configuration)
