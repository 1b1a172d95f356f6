"""The Kubernetes manifests in deploy/k8s: valid against the API schemas, and consistent with
each other and with the code (settings, ports, probes, drain time)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from control_plane.app import SHUTDOWN_GRACE_S
from shared import settings as tg_settings

pytestmark = pytest.mark.unit

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest version the manifests promise to work with
# The DP supervisor waits this long past DRAIN_TIMEOUT_S for its workers (data_plane/server.py).
SUPERVISOR_MARGIN_S = 2


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


def _resources() -> list[dict[str, Any]]:
    return [doc for name in _kustomization()["resources"] for doc in _docs(name)]


def _one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [r for r in _resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def _deployments() -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in _resources() if r["kind"] == "Deployment"}


def _role(deployment: dict[str, Any]) -> str:
    role: str = deployment["spec"]["template"]["spec"]["containers"][0]["args"][0]
    return role


def _by_role(role: str) -> dict[str, Any]:
    (found,) = [d for d in _deployments().values() if _role(d) == role]
    return found


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _selected(selector: dict[str, str]) -> list[dict[str, Any]]:
    return [d for d in _deployments().values() if _matches(selector, d["spec"]["template"]["metadata"]["labels"])]


def _environment(container: dict[str, Any]) -> dict[str, str]:
    """What the process sees, with the example Secret's values and field refs filled in."""
    configmaps = {r["metadata"]["name"]: r["data"] for r in _resources() if r["kind"] == "ConfigMap"}
    (secret,) = _docs("secret.example.yaml")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"], item
            if ref.get("optional") and ref["key"] not in secret["stringData"]:
                continue  # unset, as Kubernetes leaves an optional key the Secret lacks
            env[item["name"]] = secret["stringData"][ref["key"]]
        else:
            env[item["name"]] = "pod-name-7d9f8-abcde"
    return env


def _port_number(container: dict[str, Any], port: str | int) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


# --- every document is a valid Kubernetes object ---


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_manifest_is_valid_against_the_kubernetes_schema(path: str) -> None:
    for doc in _docs(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    listed = set(_kustomization()["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}

    assert listed == present


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_manifests_with_the_configured_image() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    built = [d for d in yaml.safe_load_all(out) if d]
    (image,) = _kustomization()["images"]
    expected = f"{image['newName']}:{image['newTag']}"

    assert {d["metadata"].get("namespace") for d in built if d["kind"] != "Namespace"} == {"tenantgate"}
    for deployment in (d for d in built if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["image"] == expected


# --- selectors, ports and probes agree ---


def test_each_deployment_selects_its_own_pods_and_only_them() -> None:
    for name, deployment in _deployments().items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert _matches(selector, deployment["spec"]["template"]["metadata"]["labels"]), name
        assert _selected(selector) == [deployment], name


def test_services_select_a_deployment_and_target_its_named_ports() -> None:
    for service in (r for r in _resources() if r["kind"] == "Service"):
        (deployment,) = _selected(service["spec"]["selector"])
        names = {p["name"] for p in _container(deployment)["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, (service["metadata"]["name"], port)


def test_pdbs_hpa_and_network_policies_point_at_real_deployments() -> None:
    for resource in _resources():
        kind = resource["kind"]
        if kind == "PodDisruptionBudget":
            assert len(_selected(resource["spec"]["selector"]["matchLabels"])) == 1, resource["metadata"]
        elif kind == "HorizontalPodAutoscaler":
            assert resource["spec"]["scaleTargetRef"]["name"] in _deployments()
        elif kind == "NetworkPolicy":
            (deployment,) = _selected(resource["spec"]["podSelector"]["matchLabels"])
            names = {p["name"] for p in _container(deployment)["ports"]}
            for rule in resource["spec"]["ingress"]:
                for port in rule["ports"]:
                    assert port["port"] in names, (resource["metadata"]["name"], port)


def test_container_ports_are_the_ports_the_process_listens_on() -> None:
    listeners = {
        "control-plane": {"admin": "admin_listen", "cluster": "cluster_listen"},
        "data-plane": {"proxy": "proxy_listen", "status": "status_listen"},
    }
    for role, ports in listeners.items():
        container = _container(_by_role(role))
        settings = tg_settings.load(environ=_environment(container))
        for port_name, setting in ports.items():
            addr = getattr(settings, setting)
            assert addr.host == "0.0.0.0", (role, setting)  # reachable from the pod network
            assert _port_number(container, port_name) == addr.port, (role, setting)


def test_probes_are_wired_to_readyz_and_healthz_on_the_roles_health_port() -> None:
    health_port = {"control-plane": "admin", "data-plane": "status"}
    for role, port in health_port.items():
        container = _container(_by_role(role))
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}, role
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}, role


def test_data_planes_reach_the_control_plane_service_on_its_cluster_port() -> None:
    settings = tg_settings.load(environ=_environment(_container(_by_role("data-plane"))))
    service = _one("Service", settings.cp_addr.host)
    (deployment,) = _selected(service["spec"]["selector"])
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == settings.cp_addr.port]

    assert _role(deployment) == "control-plane"
    assert port["targetPort"] == "cluster"
    # A replica whose Postgres is down is not ready but still serves streams from its cache.
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["cluster"]


def test_the_admin_service_sends_only_to_ready_control_planes() -> None:
    cp = _by_role("control-plane")
    (admin,) = [
        s
        for s in _resources()
        if s["kind"] == "Service" and any(p["targetPort"] == "admin" for p in s["spec"]["ports"])
    ]

    assert _selected(admin["spec"]["selector"]) == [cp]
    assert not admin["spec"].get("publishNotReadyAddresses", False)


# --- settings and secrets ---


def test_every_env_name_is_a_real_setting() -> None:
    known = {tg_settings.ENV_PREFIX + name for name in tg_settings._SPECS}
    (secret,) = _docs("secret.example.yaml")
    names = set(secret["stringData"])
    for resource in _resources():
        if resource["kind"] == "ConfigMap":
            names |= set(resource["data"])
    for deployment in _deployments().values():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"] + pod.get("initContainers", []):
            names |= {e["name"] for e in container.get("env", [])}

    assert names <= known, names - known


def test_each_role_starts_with_its_settings_and_gets_only_the_secrets_it_needs() -> None:
    required = {
        "control-plane": ("DATABASE_URL", "ADMIN_TOKEN", "CLUSTER_TOKEN"),
        "data-plane": ("CLUSTER_TOKEN",),
        "migrate": ("DATABASE_URL",),
    }
    for deployment in _deployments().values():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"] + pod.get("initContainers", []):
            role = container["args"][0]
            env = _environment(container)
            tg_settings.load(environ=env, require=required[role])  # raises SettingsError naming a bad one
            secret_refs = {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            if role != "control-plane":
                assert "TENANTGATE_ADMIN_TOKEN" not in secret_refs, role
            if role == "data-plane":
                assert "TENANTGATE_DATABASE_URL" not in secret_refs


def test_no_secret_is_in_a_configmap_or_a_literal_env_value() -> None:
    secret_names = {"TENANTGATE_DATABASE_URL", "TENANTGATE_ADMIN_TOKEN", "TENANTGATE_CLUSTER_TOKEN"}
    for resource in _resources():
        assert resource["kind"] != "Secret"
        if resource["kind"] == "ConfigMap":
            assert not secret_names & set(resource["data"])
    for deployment in _deployments().values():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"] + pod.get("initContainers", []):
            for item in container.get("env", []):
                if item["name"] in secret_names:
                    assert "secretKeyRef" in item["valueFrom"], item


# --- availability, termination, security ---


def test_two_control_plane_replicas_with_migrations_first_and_a_budget() -> None:
    cp = _by_role("control-plane")
    (init,) = cp["spec"]["template"]["spec"]["initContainers"]
    pdb = next(
        r
        for r in _resources()
        if r["kind"] == "PodDisruptionBudget" and _selected(r["spec"]["selector"]["matchLabels"]) == [cp]
    )

    assert cp["spec"]["replicas"] == 2
    assert init["args"] == ["migrate"]
    assert pdb["spec"]["minAvailable"] == 1
    assert cp["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > SHUTDOWN_GRACE_S


def test_data_planes_autoscale_and_keep_a_budget() -> None:
    dp = _by_role("data-plane")
    (hpa,) = [r for r in _resources() if r["kind"] == "HorizontalPodAutoscaler"]
    (pdb,) = [
        r
        for r in _resources()
        if r["kind"] == "PodDisruptionBudget" and _selected(r["spec"]["selector"]["matchLabels"]) == [dp]
    ]

    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dp["metadata"]["name"],
    }
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert "replicas" not in dp["spec"]  # or every `kubectl apply` would undo the autoscaler
    assert pdb["spec"]["maxUnavailable"] == 1


def test_data_plane_termination_covers_endpoint_removal_and_the_drain() -> None:
    pod = _by_role("data-plane")["spec"]["template"]["spec"]
    container = _container(_by_role("data-plane"))
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = int(command[1])
    drain_s = tg_settings.load(environ=_environment(container)).drain_timeout_s

    assert pre_stop_s >= 5  # endpoint removal reaches kube-proxy and the cloud LB first
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + drain_s + SUPERVISOR_MARGIN_S


def test_containers_have_resources_and_run_non_root_on_a_read_only_root() -> None:
    for name, deployment in _deployments().items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert "memory" in container["resources"]["limits"], name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            # Writable places on a read-only root: DATA_DIR and /tmp, both emptyDirs.
            data_dir = tg_settings.load(environ=_environment(container)).data_dir
            for path in (str(data_dir), "/tmp"):
                assert path in mounts and "emptyDir" in volumes[mounts[path]], (name, container["name"], path)


def test_the_image_user_is_the_pod_user() -> None:
    dockerfile = (K8S.parent / "Dockerfile").read_text()
    image_user = next(line.split()[1] for line in reversed(dockerfile.splitlines()) if line.startswith("USER "))
    for name, deployment in _deployments().items():
        sc = deployment["spec"]["template"]["spec"]["securityContext"]
        assert image_user == f"{sc['runAsUser']}:{sc['runAsGroup']}", name


def test_the_admin_port_is_internal() -> None:
    cp = _by_role("control-plane")
    for service in (r for r in _resources() if r["kind"] == "Service"):
        if _selected(service["spec"]["selector"]) == [cp]:
            assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (policy,) = [
        r
        for r in _resources()
        if r["kind"] == "NetworkPolicy" and _selected(r["spec"]["podSelector"]["matchLabels"]) == [cp]
    ]
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"]["ingress"]:
        # Every rule names its ports and who may use them: nothing is open to all.
        assert rule.get("ports") and rule.get("from"), rule
