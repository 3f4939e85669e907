"""The Kubernetes manifests (``deploy/k8s/``) agree with the hub and its image.

No cluster runs where the suite runs, so these tests read the files: every environment
name is a setting, the probes hit ``/ready`` and ``/health`` on the served port, the
grace period outlasts the drain, and the selectors of the Service and the
PodDisruptionBudget match the pods.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from hub.node import READY_CHECK_TIMEOUT_S
from hub.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SETTING_NAMES = {name.upper() for name in Settings.model_fields}


def _docs() -> dict[str, dict[str, Any]]:
    """Every manifest under ``deploy/k8s/`` by kind (one object of each kind)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                assert doc["kind"] not in found, f"two {doc['kind']} manifests"
                found[doc["kind"]] = doc
    return found


def _pod() -> dict[str, Any]:
    return dict(_docs()["Deployment"]["spec"]["template"])


def _container() -> dict[str, Any]:
    (container,) = _pod()["spec"]["containers"]
    return dict(container)


def _image_port_and_uid() -> tuple[int, int]:
    text = (ROOT / "Dockerfile").read_text()
    port = re.search(r"^EXPOSE\s+(\d+)", text, re.M)
    uid = re.search(r"^ARG\s+HUB_UID=(\d+)", text, re.M)
    assert port and uid
    return int(port.group(1)), int(uid.group(1))


def test_the_manifests_are_all_there_and_kustomize_lists_them() -> None:
    docs = _docs()
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= set(docs)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {"configmap.yaml", "deployment.yaml", "service.yaml", "pdb.yaml"}
    assert "secret.example.yaml" not in listed, "real secrets are created, not committed"


def test_every_environment_name_is_a_setting_and_the_values_validate() -> None:
    docs = _docs()
    config = docs["ConfigMap"]["data"]
    secret = docs["Secret"]["stringData"]
    container = _container()
    explicit = {item["name"] for item in container["env"]}
    for names, where in ((config, "ConfigMap"), (secret, "Secret"), (explicit, "env")):
        unknown = set(names) - SETTING_NAMES
        assert not unknown, f"{where} sets names the hub does not read: {unknown}"
    assert not set(config) & set(secret), "each setting in one place"
    refs = {
        ref.get("configMapRef", {}).get("name") or ref.get("secretRef", {}).get("name")
        for ref in container["envFrom"]
    }
    assert refs == {docs["ConfigMap"]["metadata"]["name"], docs["Secret"]["metadata"]["name"]}
    for required in ("DATABASE_URL", "REDIS_URL", "AMQP_URL", "JWT_SECRET_KEY"):
        assert required in secret, f"{required} belongs in the Secret"
    values = {**config, **secret, "HUB_NODE_ID": "hub-0", "HUB_DATA_DIR": "/data"}
    Settings(_env_file=None, **{k.lower(): v for k, v in values.items()})  # type: ignore[call-arg]


def test_probes_hit_ready_and_health_on_the_served_port() -> None:
    container = _container()
    port, _ = _image_port_and_uid()
    (declared,) = container["ports"]
    assert declared["containerPort"] == port
    assert container["args"][-2:] == ["--port", str(port)]
    probes = {kind: container[kind] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in (*probes.values(), container["startupProbe"]):
        assert probe["httpGet"]["port"] in (declared["name"], port)
    assert probes["readinessProbe"]["timeoutSeconds"] > READY_CHECK_TIMEOUT_S
    annotations = _pod()["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_termination_grace_outlasts_prestop_and_drain() -> None:
    pod = _pod()["spec"]
    container = _container()
    config = _docs()["ConfigMap"]["data"]
    drain = float(
        config.get("SHUTDOWN_TIMEOUT_S", Settings.model_fields["shutdown_timeout_s"].default)
    )
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + 5


def test_pods_run_as_the_image_user_without_privileges() -> None:
    _, uid = _image_port_and_uid()
    pod = _pod()["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    container = _container()["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in _container()["volumeMounts"]}
    assert "/data" in mounts, "HUB_DATA_DIR must be writable"


def test_service_and_budget_select_the_pods() -> None:
    docs = _docs()
    labels = _pod()["metadata"]["labels"]
    deployment = docs["Deployment"]["spec"]
    assert deployment["selector"]["matchLabels"].items() <= labels.items()
    service = docs["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    (port,) = service["ports"]
    assert port["targetPort"] == _container()["ports"][0]["name"]
    budget = docs["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["maxUnavailable"] < deployment["replicas"]
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
