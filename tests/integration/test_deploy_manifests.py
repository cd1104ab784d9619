"""deploy/ as rendered by ``kubectl kustomize``: what current clusters need, read off the objects.

No cluster here (the apiserver checks are in test_deploy_cluster.py): locked-down pods, probes on
the real health services, pinned images, replicas with disruption budgets and spreading, the
scheduler's extender config against the wire contract, and every snapcache container's ``args``
parsed by the real CLI parser, so a renamed flag breaks this test rather than a rollout.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

import pytest
import yaml

from services.cache_registry.servicer import SERVICE_NAME as REGISTRY_SERVICE
from services.matcher.servicer import SERVICE_NAME as MATCHER_SERVICE
from snapcache_cli.main import build_parser
from tests.support.deploy_render import (
    NAMESPACE,
    NODE_NAMESPACE,
    OVERLAYS,
    Manifest,
    containers,
    find,
    of_kind,
    quantity,
    render,
)

SNAPCACHE_COMPONENTS = ("registry", "matcher", "extender", "operator")
REPLICATED = ("matcher", "extender", "scheduler")
# APIs current clusters serve (policy/v1beta1 went in 1.25, the v1beta* scheduler configs by 1.29)
CURRENT_APIS = {
    "v1",
    "apps/v1",
    "policy/v1",
    "rbac.authorization.k8s.io/v1",
    "apiextensions.k8s.io/v1",
}
WRITABLE_VOLUME_KINDS = {"emptyDir", "persistentVolumeClaim"}
READ_ONLY_VOLUME_KINDS = {"configMap", "secret"}


def deployment(objects: Sequence[Manifest], component: str) -> Manifest:
    return find(objects, "Deployment", f"snapcache-{component}")


def pod_spec(objects: Sequence[Manifest], component: str) -> Manifest:
    spec: Manifest = deployment(objects, component)["spec"]["template"]["spec"]
    return spec


def parse_cli(args: Sequence[str], capsys: pytest.CaptureFixture[str]) -> argparse.Namespace:
    """``args`` through the real ``snapcache`` parser; a usage error fails with argparse's message."""
    try:
        return build_parser().parse_args(list(args))
    except SystemExit:
        refused = capsys.readouterr().err
    pytest.fail(f"snapcache refuses {list(args)}:\n{refused}", pytrace=False)


def flag_port(address: str) -> int:
    return int(address.rpartition(":")[2])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_holds_the_whole_system_in_its_namespace(overlay: str) -> None:
    objects = render(overlay)
    find(objects, "Namespace", NAMESPACE)
    find(objects, "CustomResourceDefinition", "imagecaches.snapcache.io")
    for component in (*SNAPCACHE_COMPONENTS, "scheduler"):
        deployment(objects, component)
        find(objects, "ServiceAccount", f"snapcache-{component}")
    for component in ("registry", "matcher", "extender"):
        find(objects, "Service", f"snapcache-{component}")
    find(objects, "PersistentVolumeClaim", "snapcache-registry-data")
    find(objects, "ConfigMap", "snapcache-scheduler-config")
    elsewhere = [
        (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        for obj in objects
        if obj["kind"] not in {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
        and obj["metadata"].get("namespace") != NAMESPACE
    ]
    # the exceptions: the second scheduler reads the apiserver's client CA in kube-system, and
    # the node agent, whose pods need the host, runs in a namespace of its own
    assert sorted(elsewhere) == [
        ("DaemonSet", NODE_NAMESPACE, "snapcache-node-agent"),
        ("RoleBinding", "kube-system", "snapcache-scheduler-authentication-reader"),
        ("ServiceAccount", NODE_NAMESPACE, "snapcache-node-agent"),
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_use_apis_current_clusters_serve(overlay: str) -> None:
    objects = render(overlay)
    assert {obj["apiVersion"] for obj in objects} <= CURRENT_APIS
    assert {pdb["apiVersion"] for pdb in of_kind(objects, "PodDisruptionBudget")} == {"policy/v1"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_locked_down(overlay: str) -> None:
    for item in of_kind(render(overlay), "Deployment"):
        name = item["metadata"]["name"]
        spec = item["spec"]["template"]["spec"]
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["runAsUser"] > 0, name
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for volume in volumes.values():
            kinds = set(volume) - {"name"}
            assert kinds <= WRITABLE_VOLUME_KINDS | READ_ONLY_VOLUME_KINDS, (name, volume)
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), f"{name}: unbounded emptyDir {volume['name']}"
        for container in containers(item):
            where = f"{name}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security.get("privileged", False) is False, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            for mount in container.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                if not set(volume) & WRITABLE_VOLUME_KINDS:
                    assert mount.get("readOnly") is True, f"{where}: {mount['name']} mounted writable"
            resources = container["resources"]
            for resource in ("cpu", "memory"):
                request = quantity(resources["requests"][resource])
                limit = quantity(resources["limits"][resource])
                assert 0 < request <= limit, f"{where}: {resource} request {request} limit {limit}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_registry_writes_to_disk(overlay: str) -> None:
    """Writable storage only where needed: the registry's data volume and a bounded /tmp for SQLite."""
    objects = render(overlay)
    writable = {
        (item["metadata"]["name"], mount["mountPath"])
        for item in of_kind(objects, "Deployment")
        for container in containers(item)
        for mount in container.get("volumeMounts", [])
        if not mount.get("readOnly")
    }
    assert writable == {("snapcache-registry", "/var/lib/snapcache"), ("snapcache-registry", "/tmp")}
    [data] = [v for v in pod_spec(objects, "registry")["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"]["claimName"] == "snapcache-registry-data"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_on_what_it_serves(overlay: str) -> None:
    objects = render(overlay)
    health_services = {"registry": REGISTRY_SERVICE, "matcher": MATCHER_SERVICE}
    for item in of_kind(objects, "Deployment"):
        component = item["metadata"]["labels"]["app.kubernetes.io/component"]
        for container in containers(item):
            where = f"{item['metadata']['name']}/{container['name']}"
            ports = {port["name"]: port["containerPort"] for port in container["ports"]}
            assert "readinessProbe" in container and "livenessProbe" in container, where
            for key in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(key)
                if probe is None:
                    continue
                if component in health_services:
                    # the standard grpc.health.v1 service every snapcache gRPC server carries
                    assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, where
                    assert probe["grpc"]["port"] in ports.values(), where
                    if key != "livenessProbe":  # ready = this service SERVING (the matcher: loaded)
                        assert probe["grpc"]["service"] == health_services[component], where
                else:
                    port = probe["httpGet"]["port"]
                    assert port in ports or port in ports.values(), where
    [extender] = containers(deployment(objects, "extender"))
    assert extender["readinessProbe"]["httpGet"]["path"] == "/healthz"
    [operator] = containers(deployment(objects, "operator"))
    assert operator["readinessProbe"]["httpGet"]["path"] == "/readyz"  # ImageCaches and caches loaded
    assert operator["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(overlay: str) -> None:
    for item in of_kind(render(overlay), "Deployment"):
        for container in containers(item):
            image = container["image"]
            if "@" in image:
                assert "@sha256:" in image, image
                continue
            repository, _, tag = image.rpartition(":")
            assert repository and tag and "/" not in tag and tag != "latest", f"{image} has no version tag"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("component", REPLICATED)
def test_replicated_components_survive_a_drain(overlay: str, component: str) -> None:
    objects = render(overlay)
    item = deployment(objects, component)
    replicas = item["spec"]["replicas"]
    assert replicas >= 2
    pod_labels = item["spec"]["template"]["metadata"]["labels"]
    selector = item["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    budget = find(objects, "PodDisruptionBudget", f"snapcache-{component}")
    assert budget["spec"]["selector"] == {"matchLabels": selector}
    assert 1 <= budget["spec"]["minAvailable"] < replicas  # a drain can always move one pod
    spec = item["spec"]["template"]["spec"]
    [spread] = spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["labelSelector"] == {"matchLabels": selector}
    [anti] = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert anti["podAffinityTerm"]["labelSelector"] == {"matchLabels": selector}
    if component != "scheduler":
        assert item["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_reach_the_pods_and_ports_they_name(overlay: str) -> None:
    objects = render(overlay)
    deployments = of_kind(objects, "Deployment")
    for service in of_kind(objects, "Service"):
        selector = service["spec"]["selector"]
        [target] = [
            d for d in deployments if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = {p["name"]: p["containerPort"] for c in containers(target) for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_matcher_gets_no_kubernetes_token(overlay: str) -> None:
    objects = render(overlay)
    assert find(objects, "ServiceAccount", "snapcache-matcher")["automountServiceAccountToken"] is False
    spec = pod_spec(objects, "matcher")
    assert spec["serviceAccountName"] == "snapcache-matcher"
    assert spec["automountServiceAccountToken"] is False
    bound = [
        binding["metadata"]["name"]
        for binding in objects
        if binding["kind"] in ("RoleBinding", "ClusterRoleBinding")
        and any(s.get("name") == "snapcache-matcher" for s in binding.get("subjects", []))
    ]
    assert bound == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_registry_may_review_tokens(overlay: str) -> None:
    """`serve --token-review` needs ``create tokenreviews``: the registry has it, nobody else does."""
    objects = render(overlay)
    review = {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}
    granted = {
        role["metadata"]["name"]
        for role in objects
        if role["kind"] in ("ClusterRole", "Role")
        and any("tokenreviews" in rule.get("resources", ()) for rule in role.get("rules", ()))
    }
    assert granted == {"snapcache-registry"}
    assert review in find(objects, "ClusterRole", "snapcache-registry")["rules"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scheduler_config_matches_the_extender_contract(overlay: str) -> None:
    objects = render(overlay)
    config_map = find(objects, "ConfigMap", "snapcache-scheduler-config")
    [(file_name, text)] = config_map["data"].items()
    config = yaml.safe_load(text)
    assert config["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    assert config["kind"] == "KubeSchedulerConfiguration"
    assert [p["schedulerName"] for p in config["profiles"]] == ["snapcache-scheduler"]
    [extender] = config["extenders"]
    assert extender == {
        "urlPrefix": "http://snapcache-extender.snapcache-system.svc:50053",
        "filterVerb": "filter",
        "prioritizeVerb": "prioritize",
        "weight": 5,
        "nodeCacheCapable": True,
        "ignorable": True,
        "httpTimeout": "2s",
    }
    # the URL reaches the extender: its Service, that Service's port, the container behind it
    url = urlsplit(extender["urlPrefix"])
    service_name, namespace, svc = (url.hostname or "").split(".")
    assert (namespace, svc) == (NAMESPACE, "svc")
    service = find(objects, "Service", service_name)
    [port] = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    [container] = containers(deployment(objects, "extender"))
    [container_port] = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    listen = [a for a in container["args"] if a.startswith("--extender-listen=")]
    assert listen == [f"--extender-listen=0.0.0.0:{container_port['containerPort']}"]
    # the scheduler Deployment reads this very ConfigMap and file, and may take its Lease
    scheduler = deployment(objects, "scheduler")
    spec = scheduler["spec"]["template"]["spec"]
    [volume] = [v for v in spec["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    [kube_scheduler] = spec["containers"]
    [mount] = [m for m in kube_scheduler["volumeMounts"] if m["name"] == volume["name"]]
    assert f"--config={mount['mountPath']}/{file_name}" in kube_scheduler["command"]
    election = config["leaderElection"]
    assert election["leaderElect"] is True
    role = find(objects, "Role", "snapcache-scheduler-leader-election")
    assert role["metadata"]["namespace"] == election["resourceNamespace"]
    assert role["rules"][0]["resourceNames"] == [election["resourceName"]]
    assert spec["serviceAccountName"] == "snapcache-scheduler"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("component", SNAPCACHE_COMPONENTS)
def test_args_are_accepted_by_the_cli(
    overlay: str, component: str, capsys: pytest.CaptureFixture[str]
) -> None:
    objects = render(overlay)
    [container] = containers(deployment(objects, component))
    assert "command" not in container  # the image's entrypoint is `snapcache`
    args = container["args"]
    defined = {env["name"] for env in container.get("env", [])}
    for reference in re.findall(r"\$\((\w+)\)", " ".join(args)):
        assert reference in defined, f"{component}: $({reference}) is not in the container's env"
    parsed = parse_cli(args, capsys)
    ports = {port["containerPort"] for port in container["ports"]}
    registry_address = f"snapcache-registry.{NAMESPACE}.svc:50051"
    if component == "operator":
        assert parsed.command == "operator"
        assert parsed.registry == registry_address
        assert parsed.in_cluster is True  # reads and writes ImageCache CRs
        assert flag_port(parsed.metrics_listen) in ports  # also /healthz and /readyz, the probes'
        return
    assert parsed.command == "serve"
    assert parsed.only == component
    if component == "registry":
        assert flag_port(parsed.listen) in ports
        assert flag_port(parsed.metrics_listen) in ports
        assert parsed.in_cluster is True  # reads the dockerconfigjson Secrets caches name
    elif component == "matcher":
        assert flag_port(parsed.matcher_listen) in ports
        assert flag_port(parsed.metrics_listen) in ports
        assert parsed.registry == registry_address
    else:
        assert flag_port(parsed.extender_listen) in ports
        # its own matcher in process, following the registry (README, Scheduling: the speed)
        assert parsed.colocated_matcher is True
        assert parsed.registry == registry_address
        assert flag_port(parsed.metrics_listen) in ports
        assert parsed.in_cluster is True  # follows Nodes, writes pod Events


def test_embedded_keeps_sqlite_on_the_registry_volume(capsys: pytest.CaptureFixture[str]) -> None:
    objects = render("embedded")
    [container] = containers(deployment(objects, "registry"))
    parsed = parse_cli(container["args"], capsys)
    [data] = [m for m in container["volumeMounts"] if m["name"] == "data"]
    assert parsed.database_url == f"sqlite:///{data['mountPath']}/registry.db"
    assert str(parsed.data_dir) == data["mountPath"]
    assert deployment(objects, "registry")["spec"]["replicas"] == 1
    assert deployment(objects, "registry")["spec"]["strategy"] == {"type": "Recreate"}


def test_ha_reads_the_database_url_from_a_secret(capsys: pytest.CaptureFixture[str]) -> None:
    objects = render("ha")
    [container] = containers(deployment(objects, "registry"))
    parsed = parse_cli(container["args"], capsys)
    [reference] = re.findall(r"^\$\((\w+)\)$", parsed.database_url)
    env = {item["name"]: item for item in container["env"]}
    assert env[reference]["valueFrom"]["secretKeyRef"] == {"name": "snapcache-database", "key": "url"}
    # a password kept out of the URL reaches libpq as PGPASSWORD, not the command line
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "snapcache-database",
        "key": "password",
        "optional": True,
    }
    assert not any(obj["kind"] == "Secret" for obj in objects)  # never shipped with a password


def test_overlays_differ_only_in_the_registrys_database() -> None:
    embedded, ha = render("embedded"), render("ha")
    registry = ("Deployment", "snapcache-registry")

    def without_registry(objects: list[Manifest]) -> list[Manifest]:
        return [obj for obj in objects if (obj["kind"], obj["metadata"]["name"]) != registry]

    assert without_registry(embedded) == without_registry(ha)


def node_agent(objects: Sequence[Manifest]) -> Manifest:
    return find(objects, "DaemonSet", "snapcache-node-agent")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_node_agent_runs_on_every_node_with_args_the_cli_accepts(
    overlay: str, capsys: pytest.CaptureFixture[str]
) -> None:
    objects = render(overlay)
    daemon_set = node_agent(objects)
    assert daemon_set["metadata"]["namespace"] == NODE_NAMESPACE
    labels = find(objects, "Namespace", NODE_NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"  # hostNetwork, hostPath
    # snapcache-system stays restricted: the node agent is the only pod that needs the host
    system_labels = find(objects, "Namespace", NAMESPACE)["metadata"]["labels"]
    assert system_labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert [d["metadata"]["name"] for d in of_kind(objects, "DaemonSet")] == ["snapcache-node-agent"]
    spec = daemon_set["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "snapcache-node-agent"
    find(objects, "ServiceAccount", "snapcache-node-agent")
    assert {"operator": "Exists"} in spec["tolerations"]  # tainted nodes run pods too
    # containerd (host network namespace) reaches the mirror on the node's loopback
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    [container] = containers(daemon_set)
    assert "command" not in container
    args = container["args"]
    env = {item["name"]: item for item in container["env"]}
    for reference in re.findall(r"\$\((\w+)\)", " ".join(args)):
        assert reference in env, f"node-agent: $({reference}) is not in the container's env"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    parsed = parse_cli(args, capsys)
    assert parsed.command == "node-agent"
    assert parsed.node_name == "$(NODE_NAME)"
    assert parsed.matcher == f"snapcache-matcher.{NAMESPACE}.svc:50052"
    assert parsed.registry == f"snapcache-registry.{NAMESPACE}.svc:50051"
    assert parsed.in_cluster is True  # its node's pods, its Node's zone, pod Events
    assert parsed.disk_grace_seconds > 0
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert parsed.listen == f"127.0.0.1:{ports['mirror']}"  # nothing off the node reaches the mirror
    assert flag_port(parsed.metrics_listen) == ports["metrics"]
    for key in ("readinessProbe", "livenessProbe"):
        assert container[key]["tcpSocket"] == {"host": "127.0.0.1", "port": ports["mirror"]}
    # root to write hosts.toml in the host's root-owned directory; only the capabilities writing
    # image layers into containerd's snapshots needs (seeding), no escalation
    security = container["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"] and security["allowPrivilegeEscalation"] is False
    assert set(security["capabilities"]["add"]) == {
        "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "MKNOD", "SETFCAP", "SYS_ADMIN"
    }  # fmt: skip
    assert security["readOnlyRootFilesystem"] is True and security.get("privileged", False) is False
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts[str(parsed.disk_root)]["readOnly"] is True  # the registry provisions, the agent reads
    writable = [path for path, mount in mounts.items() if not mount.get("readOnly")]
    # containerd's socket directory and its root, at the paths containerd gives snapshots under
    assert writable == [str(parsed.containerd_hosts_dir), "/run/containerd", "/var/lib/containerd"]
    assert str(parsed.seed_containerd) == "/run/containerd/containerd.sock"
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    for path in ("/run/containerd", "/var/lib/containerd"):
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    assert (
        volumes[mounts[str(parsed.containerd_hosts_dir)]["name"]]["hostPath"]["path"]
        == "/etc/containerd/certs.d"
    )
    for resource in ("cpu", "memory"):
        assert (
            0
            < quantity(container["resources"]["requests"][resource])
            <= quantity(container["resources"]["limits"][resource])
        )
