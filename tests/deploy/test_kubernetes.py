"""deploy/kubernetes: strict validation against the Kubernetes API schemas (offline, with the
schemas kubernetes-validate ships) when it is installed, and always the fields that matter:
stable identity, storage, discovery, probes, disruption budget, scraping, and agreement with the
node's config, flags, ports and the container image."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tmdht.config import parse_size

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
MANIFESTS = sorted(KUBERNETES.glob("*.yaml"))
SERVICE_MONITOR = KUBERNETES / "prometheus-operator" / "servicemonitor.yaml"
# The oldest Kubernetes the manifests target (persistentVolumeClaimRetentionPolicy is beta there).
KUBERNETES_VERSION = "1.27.0"


@pytest.fixture(scope="module")
def resources(load_yaml: Callable[[Path], list[Any]]) -> dict[str, dict[str, Any]]:
    """Kind -> the one resource of that kind in deploy/kubernetes/*.yaml."""
    out: dict[str, dict[str, Any]] = {}
    for path in MANIFESTS:
        for doc in load_yaml(path):
            assert doc["kind"] not in out, f"two {doc['kind']}s"
            out[doc["kind"]] = doc
    assert set(out) == {"ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget"}
    return out


@pytest.fixture(scope="module")
def container(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (node,) = resources["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    return dict(node)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_manifests_validate_against_the_kubernetes_schemas(
    pip_tool: Callable[[str, str], str],
) -> None:
    proc = subprocess.run(
        [pip_tool("kubernetes-validate", "kubernetes-validate"), "--strict", "--kubernetes-version", KUBERNETES_VERSION,
         *map(str, MANIFESTS)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == len(MANIFESTS), proc.stdout


def test_statefulset_gives_each_node_a_stable_identity_and_volume(
    resources: dict[str, dict[str, Any]], container: dict[str, Any], node_config: Any
) -> None:
    sts = resources["StatefulSet"]["spec"]
    service = resources["Service"]
    assert sts["serviceName"] == service["metadata"]["name"]
    assert sts["replicas"] >= 3
    (claim,) = sts["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config = node_config(resources["ConfigMap"]["data"]["node.toml"])
    assert Path(mounts[claim["metadata"]["name"]]) == config.data_dir
    # The node may fill its capacity and LMDB needs slack on the volume.
    size = parse_size(claim["spec"]["resources"]["requests"]["storage"])
    assert config.capacity < size
    assert sts["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"


def test_headless_service_publishes_every_port_for_discovery(
    resources: dict[str, dict[str, Any]], container: dict[str, Any], node_defaults: dict[str, Any]
) -> None:
    spec = resources["Service"]["spec"]
    assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is True
    pod_labels = resources["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= pod_labels.items()
    expected = {
        "kademlia": (node_defaults["kademlia_port"], "UDP"),
        "data": (node_defaults["data_port"], "UDP"),
        "metrics": (node_defaults["metrics_port"], "TCP"),
    }
    assert {p["name"]: (p["containerPort"], p["protocol"]) for p in container["ports"]} == expected
    assert {p["name"]: (p["port"], p["protocol"]) for p in spec["ports"]} == expected
    assert all(p["targetPort"] == p["name"] for p in spec["ports"])


def test_seeds_are_the_first_pods_dns_names(
    resources: dict[str, dict[str, Any]], container: dict[str, Any], node_config: Any
) -> None:
    sts = resources["StatefulSet"]
    env = env_of(container)
    config = node_config(
        resources["ConfigMap"]["data"]["node.toml"],
        env={k: v for k, v in env.items() if isinstance(v, str)},
    )
    service = resources["Service"]["metadata"]["name"]
    pattern = re.compile(rf"{sts['metadata']['name']}-(\d+)\.{service}")
    ordinals = []
    for host, port in config.seeds:
        match = pattern.fullmatch(host)
        assert match, f"seed {host} is not a pod of the StatefulSet"
        ordinals.append(int(match.group(1)))
        assert port == config.kademlia_port
    assert ordinals == list(range(len(ordinals))) and len(ordinals) <= sts["spec"]["replicas"]
    # The node must advertise an IP literal: the pod's.
    assert env["TMDHT_NODE_ADVERTISE_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert config.host == "0.0.0.0"


def test_cluster_key_comes_from_a_mounted_secret(
    resources: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    pod = resources["StatefulSet"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    key_file = Path(env_of(container)["TMDHT_NODE_CLUSTER_KEY_FILE"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(key_file.parent)]
    secret = volumes[mount["name"]]["secret"]
    assert [item["path"] for item in secret["items"]] == [key_file.name]
    assert secret["defaultMode"] & 0o007 == 0  # not world-readable; fsGroup gives the group
    assert "TMDHT_CLUSTER_KEY" not in env_of(container)
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert volumes["config"]["configMap"]["name"] == resources["ConfigMap"]["metadata"]["name"]
    args = container["args"]
    assert Path(args[args.index("--config") + 1]).parent == Path(config_mount["mountPath"])


def test_probes_resources_and_security(
    resources: dict[str, dict[str, Any]],
    container: dict[str, Any],
    dockerfile: list[tuple[str, str]],
    node_run_flags: set[str],
) -> None:
    probes = {name: container[name]["httpGet"] for name in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"] == {"path": "/healthz", "port": "metrics"}
    assert probes["readinessProbe"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]
    assert {a for a in container["args"] if a.startswith("-")} <= node_run_flags
    pod = resources["StatefulSet"]["spec"]["template"]["spec"]
    (user,) = [a for i, a in dockerfile if i == "USER"]
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    from tmdht.node.service import DRAIN_TIMEOUT

    assert pod["terminationGracePeriodSeconds"] >= 2 * DRAIN_TIMEOUT


def test_disruption_budget_keeps_r_minus_one_copies(
    resources: dict[str, dict[str, Any]], node_config: Any
) -> None:
    pdb = resources["PodDisruptionBudget"]["spec"]
    pod_labels = resources["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    replicas = node_config(resources["ConfigMap"]["data"]["node.toml"]).replicas
    assert 1 <= pdb["maxUnavailable"] < replicas


def test_prometheus_can_find_the_nodes(
    resources: dict[str, dict[str, Any]],
    load_yaml: Callable[[Path], list[Any]],
    node_defaults: dict[str, Any],
) -> None:
    template = resources["StatefulSet"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(node_defaults["metrics_port"])
    assert annotations["prometheus.io/path"] == "/metrics"
    (monitor,) = load_yaml(SERVICE_MONITOR)
    assert monitor["kind"] == "ServiceMonitor"
    service = resources["Service"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    # The Operator names the job after the Service: the job the rules and dashboard select.
    (rules,) = load_yaml(DEPLOY / "prometheus" / "rules" / "tmdht-alerts.yml")
    jobs = set(re.findall(r'job="([^"]+)"', json.dumps(rules).replace('\\"', '"')))
    assert service["metadata"]["name"] in jobs
