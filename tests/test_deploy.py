"""deploy/kubernetes/: the manifests parse, carry what pods behind a load balancer need, and
agree with the gateway.yaml they ship, with each other and with the image built from the
Dockerfile (its entrypoint, user and config path).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import GatewayConfigBase, parse_config
from gateway.errors import ConfigError
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
ADMIN_TOKEN = "a-token-from-the-gateway-admin-secret"
API_VERSIONS = {
    "ConfigMap": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "Ingress": "networking.k8s.io/v1",
}
SUPERVISOR_MARGIN = 5  # seconds the supervisor waits for its workers beyond drain_timeout (gateway/server.py)


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every Kubernetes object in deploy/kubernetes/."""
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is not None:
                found.append((path.name, document))
    return found


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    (document,) = [d for _, d in manifests() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return document


def shipped_config(environ: dict[str, str] | None = None) -> GatewayConfigBase:
    raw = yaml.safe_load(one("ConfigMap")["data"]["gateway.yaml"])
    return parse_config(raw, "deploy/kubernetes/configmap.yaml", environ={"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN} if environ is None else environ)


def container() -> dict[str, Any]:
    (found,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return found


def container_port(port: int | str) -> int:
    """A probe's or a Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container()["ports"] if p["name"] == port]
    return number


def dockerfile() -> dict[str, Any]:
    """What the image sets: ENV, USER, ENTRYPOINT and CMD, and the uid useradd gives its user."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    image: dict[str, Any] = {"env": {}}
    for line in text.splitlines():
        instruction, _, rest = line.strip().partition(" ")
        if instruction == "ENV":
            image["env"].update(dict(re.findall(r"(\w+)=(\S+)", rest)))
        elif instruction in ("ENTRYPOINT", "CMD"):
            image[instruction.lower()] = json.loads(rest)
        elif instruction == "USER":
            image["user"] = rest.strip()
        elif instruction == "RUN" and "useradd" in rest:
            image["uid"] = int(re.search(r"--uid (\d+)", rest).group(1))
    return image


def test_every_manifest_parses_with_its_kind_api_version_and_name_and_kustomize_lists_them_all() -> None:
    documents = manifests()
    assert sorted(d["kind"] for _, d in documents) == ["ConfigMap", "Deployment", "Ingress", "PodDisruptionBudget", "Service", "Service"]
    for file, document in documents:
        assert document["apiVersion"] == API_VERSIONS[document["kind"]], file
        assert document["metadata"]["name"], file
        assert document["metadata"]["labels"]["app.kubernetes.io/name"] == "gateway", file
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted({file for file, _ in documents})


def test_the_configmaps_gateway_yaml_is_a_valid_config_that_needs_the_admin_token_from_the_environment() -> None:
    config = shipped_config()
    assert config.admin is not None and config.admin.token == ADMIN_TOKEN
    assert config.redis is not None and config.redis.cluster_nodes and config.redis.on_failure == "memory"
    assert config.listen.trusted_proxies  # the load balancer's addresses: client address and scheme believed from it
    with pytest.raises(ConfigError, match="admin.token: environment variable GATEWAY_ADMIN_TOKEN is not set"):
        shipped_config(environ={})


def test_gateway_check_accepts_the_shipped_file_as_the_pod_would_read_it(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(one("ConfigMap")["data"]["gateway.yaml"], encoding="utf-8")
    environ = {**os.environ, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    checked = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)], capture_output=True, text=True, env=environ, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    environ.pop("GATEWAY_ADMIN_TOKEN")
    refused = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)], capture_output=True, text=True, env=environ, timeout=60)
    assert refused.returncode == 2 and "GATEWAY_ADMIN_TOKEN" in refused.stdout + refused.stderr


def test_the_probes_ask_the_admin_listener_and_the_ports_are_the_configs() -> None:
    config = shipped_config()
    gateway = container()
    assert config.admin is not None and config.admin.host == "0.0.0.0"  # the kubelet probes the pod's address
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container_port(gateway[probe]["httpGet"]["port"]) == config.admin.port, probe
    assert config.listen.host == "0.0.0.0"
    assert container_port("http") == config.listen.port


def test_the_grace_period_outlasts_the_pre_stop_wait_and_the_drain() -> None:
    config = shipped_config()
    pod = one("Deployment")["spec"]["template"]["spec"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    margin = SUPERVISOR_MARGIN if config.workers != 1 else 0
    assert pod["terminationGracePeriodSeconds"] > config.listen.limits.drain_timeout
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config.listen.limits.drain_timeout + margin


def test_the_pods_run_the_images_entrypoint_as_its_non_root_user_on_a_read_only_root() -> None:
    image = dockerfile()
    deployment = one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    gateway = container()
    assert deployment["spec"]["replicas"] == 3
    assert image["entrypoint"] == ["gateway"] and image["cmd"] == ["run"]
    assert gateway["args"][0] == "run" and "command" not in gateway  # the image's entrypoint runs it
    # The config file is where the image looks for it, and the ConfigMap is mounted there.
    assert gateway["args"][1:] == ["-c", image["env"]["GATEWAY_CONFIG"]]
    mounted = {m["name"]: m["mountPath"] for m in gateway["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (config_volume,) = [name for name, v in volumes.items() if v.get("configMap", {}).get("name") == one("ConfigMap")["metadata"]["name"]]
    assert mounted[config_volume] + "/gateway.yaml" == image["env"]["GATEWAY_CONFIG"]
    # The image's user, not root; nothing written outside /tmp (where workers keep their metrics).
    assert image["user"] == "gateway"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image["uid"]
    assert gateway["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    (tmp,) = [name for name, path in mounted.items() if path == "/tmp"]
    assert "emptyDir" in volumes[tmp]
    assert gateway["resources"]["requests"]["cpu"] and gateway["resources"]["requests"]["memory"] and gateway["resources"]["limits"]["memory"]
    (token,) = [e for e in gateway["env"] if e["name"] == "GATEWAY_ADMIN_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"]["key"]


def test_the_services_the_budget_and_the_ingress_reach_the_pods_and_prometheus_scrapes_the_admin_port() -> None:
    config = shipped_config()
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert one("Deployment")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    public, admin = one("Service", "gateway"), one("Service", "gateway-admin")
    for service in (public, admin):
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"  # the ingress is the way in
    (http,) = public["spec"]["ports"]
    assert container_port(http["targetPort"]) == config.listen.port
    (scrape,) = admin["spec"]["ports"]
    assert config.admin is not None and container_port(scrape["targetPort"]) == config.admin.port
    for pod_annotations in (admin["metadata"]["annotations"], one("Deployment")["spec"]["template"]["metadata"]["annotations"]):
        assert pod_annotations["prometheus.io/scrape"] == "true"
        assert int(pod_annotations["prometheus.io/port"]) == config.admin.port
        assert pod_annotations["prometheus.io/path"] == "/metrics"
    assert one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    (rule,) = one("Ingress")["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend["name"] == public["metadata"]["name"] and backend["port"]["name"] == http["name"]
    assert one("Ingress")["spec"]["tls"]  # TLS ends at the load balancer
