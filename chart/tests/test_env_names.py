"""Every variable the chart sets is one the programs read: a field of their settings models
(pydantic-settings reads field `db_host` from `DB_HOST`). The models are read from the
packages' source with `ast`, so the chart's tests need none of the packages installed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO, Rendered, container

SDK_SETTINGS = REPO / "sdk" / "src" / "streamspace_sdk" / "settings.py"
CONTROL_PLANE = [SDK_SETTINGS, REPO / "controlplane" / "src" / "streamspace_controlplane"]
K8S_AGENT = [SDK_SETTINGS, REPO / "plugins" / "k8s" / "src" / "streamspace_k8s"]


def settings_fields(paths: list[Path]) -> set[str]:
    """Upper-cased annotated fields of every class named *Settings in the files under paths."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*.py")))]
    fields: set[str] = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Settings"):
                for item in node.body:
                    if (
                        isinstance(item, ast.AnnAssign)
                        and isinstance(item.target, ast.Name)
                        and "ClassVar" not in ast.unparse(item.annotation)
                    ):
                        fields.add(item.target.id.upper())
    return fields


def names(r: Rendered, deployment: str, name: str) -> set[str]:
    return {e["name"] for e in container(r.get("Deployment", deployment), name)["env"]}


API_SET = {"PORT", "STREAMSPACE_HOME", "POD_NAME", "POD_IP", "DB_HOST", "DB_PORT", "DB_NAME"}
API_SET |= {"DB_USER", "DB_PASSWORD", "JWT_SECRET", "ADMIN_USERNAME", "ADMIN_PASSWORD"}
API_SET |= {"AGENT_HUB_BACKEND", "REDIS_URL"}


def test_the_list_below_is_what_the_chart_sets(rendered: dict[str, Rendered]) -> None:
    seen = names(rendered["api-ha-redis"], "streamspace-api", "api")
    seen |= names(rendered["external-db-secret"], "streamspace-api", "api")
    assert seen == API_SET
    agent = names(rendered["agent-ha"], "streamspace-k8s-agent", "agent")
    everything = names(rendered["everything"], "streamspace-k8s-agent", "agent")
    user = {"VNC_ACCESS", "STORAGE_CLASS"}  # the everything set's own k8sAgent.env
    assert agent | (everything - user) == AGENT_SET


@pytest.mark.parametrize("variable", sorted(API_SET))
def test_control_plane_reads_it(variable: str) -> None:
    assert variable in settings_fields(CONTROL_PLANE), (
        f"the chart sets {variable} on the control plane, whose settings have no such field"
    )


AGENT_SET = {"AGENT_ID", "CONTROL_PLANE_URL", "AGENT_TOKEN", "PLATFORM", "REGION", "NAMESPACE"}
AGENT_SET |= {"MAX_SESSIONS", "MAX_CPU", "MAX_MEMORY", "HEARTBEAT_INTERVAL", "HEALTH_PORT"}
AGENT_SET |= {"ENABLE_HA", "HA_BACKEND", "LEASE_LOCK_NAME", "LEASE_LOCK_NAMESPACE"}
AGENT_SET |= {"LEASE_DURATION", "RENEW_DEADLINE", "RETRY_PERIOD"}


@pytest.mark.parametrize("variable", sorted(AGENT_SET))
def test_k8s_agent_reads_it(variable: str) -> None:
    assert variable in settings_fields(K8S_AGENT), (
        f"the chart sets {variable} on the agent, whose settings have no such field"
    )
