"""Render the chart through Helm's own Go library (helm-python-sdk), for the value sets the
tests share, and read the objects back as dicts."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

CHART = Path(__file__).resolve().parent.parent
REPO = CHART.parent
RELEASE = "streamspace"
NAMESPACE = "streamspace"

VALUE_SETS: dict[str, dict[str, Any]] = {
    # helm install streamspace ./chart
    "defaults": {},
    # The seed guide's multi-pod API: 4 replicas on PostgreSQL with the chart's Redis.
    "api-ha-redis": {
        "api": {"replicaCount": 4, "podDisruptionBudget": {"enabled": True}},
        "redis": {"enabled": True},
        "database": {"host": "postgres.example.com", "password": "changeme"},
    },
    # The seed guide's K8s agent HA: 5 replicas electing a leader with a Lease.
    "agent-ha": {
        "k8sAgent": {
            "enabled": True,
            "replicaCount": 5,
            "ha": {
                "enabled": True,
                "leaseLockName": "k8s-agent-leader",
                "leaseDuration": "15s",
                "renewDeadline": "10s",
                "retryPeriod": "2s",
            },
            "podDisruptionBudget": {"enabled": True},
        }
    },
    # The seed guide's `streamspace-db` Secret, with the agent on and one replica.
    "external-db-secret": {
        "database": {"existingSecret": "streamspace-db"},
        "k8sAgent": {"enabled": True},
    },
    "ingress": {
        "ingress": {
            "enabled": True,
            "host": "streamspace.example.com",
            "tls": {"enabled": True},
            "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt-prod"},
        }
    },
    # Everything on at once, so that every template's optional parts are validated too.
    "everything": {
        "imagePullSecrets": [{"name": "regcred"}],
        "api": {
            "image": {"registry": "registry.example.com", "tag": "dev", "pullPolicy": "Always"},
            "env": {"LOG_LEVEL": "DEBUG", "AGENT_HEARTBEAT_TIMEOUT": "45s"},
            "extraEnv": [
                {
                    "name": "REDIS_URL",
                    "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "url"}},
                }
            ],
            "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
            "podDisruptionBudget": {"enabled": True, "maxUnavailable": "25%"},
            "podAnnotations": {"prometheus.io/scrape": "true"},
            "podLabels": {"team": "desktops"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "database": {"existingSecret": "streamspace-db"},
        "admin": {"existingSecret": "my-admin"},
        "jwt": {"secret": "x" * 40},
        "redis": {"enabled": True, "persistence": {"enabled": True, "storageClass": "fast"}},
        "ingress": {"enabled": True, "host": "desk.example.com", "className": "traefik"},
        "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 6},
        "k8sAgent": {
            "enabled": True,
            "replicaCount": 3,
            "ha": {"enabled": True},
            "tokenSecret": {"name": "agent-token", "key": "value"},
            "config": {
                "agentId": "k8s-prod-us-east-1",
                "controlPlaneURL": "wss://desk.example.com",
                "region": "us-east-1",
                "namespace": "sessions",
                "maxSessions": 100,
                "maxCpu": 100,
                "maxMemory": 256,
            },
            "env": {"VNC_ACCESS": "service", "STORAGE_CLASS": "fast"},
            "serviceAccount": {"name": "desk-agent", "annotations": {"example.com/a": "b"}},
            "podDisruptionBudget": {"enabled": True},
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "pool", "operator": "In", "values": ["agents"]}
                                ]
                            }
                        ]
                    }
                }
            },
        },
    },
}


@dataclass
class Rendered:
    """The objects one render produced, and NOTES.txt."""

    objects: list[dict[str, Any]]
    notes: str
    files: dict[str, str] = field(default_factory=dict)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} named {name}; kinds: {self.kinds()}"
        return found[0]

    def maybe(self, kind: str, name: str) -> dict[str, Any] | None:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        return found[0] if found else None

    def kinds(self) -> list[tuple[str, str]]:
        return sorted((o["kind"], o["metadata"]["name"]) for o in self.objects)


def parse(files: dict[str, str]) -> Rendered:
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in files.items():
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(objects, notes, files)


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    (found,) = [c for c in containers if c["name"] == name]
    return found


def env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's env by name; a name set twice fails (the later one would win silently)."""
    names = [e["name"] for e in c.get("env", [])]
    assert len(names) == len(set(names)), f"env names set twice: {names}"
    return {e["name"]: e for e in c.get("env", [])}


def kube_versions() -> list[str]:
    """Every minor version from Chart.yaml's kubeVersion floor to the newest that
    kubernetes-validate ships."""
    floor = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    match = re.fullmatch(r">=\s*1\.(\d+)\.0-0", floor)
    assert match, f"kubeVersion {floor!r} is not of the form >=1.N.0-0"
    newest = int(kubernetes_validate.latest_version().split(".")[1])
    return [f"1.{minor}" for minor in range(int(match.group(1)), newest + 1)]


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: helm.Chart) -> Any:
    """Render the chart offline as `helm install` would (values checked against the schema)."""

    def _render(values: dict[str, Any], **opts: Any) -> Rendered:
        opts.setdefault("name", RELEASE)
        opts.setdefault("namespace", NAMESPACE)
        return parse(chart.render(values, **opts))

    return _render


@pytest.fixture(scope="session")
def rendered(render: Any) -> dict[str, Rendered]:
    return {name: render(values) for name, values in VALUE_SETS.items()}
