"""One scenario that makes every call the plugin can make, against a fresh fake API server:
the RBAC manifest must grant exactly those calls, and every object sent must be valid for
each Kubernetes version from 1.29 to the newest ``kubernetes-validate`` knows."""

from __future__ import annotations

import asyncio
import uuid
from importlib import resources
from pathlib import Path

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from conftest import DOCKER_HOST, NAMESPACE
from fakeapi import FakeApiServer
from test_conformance import make_spec, platform_settings

from streamspace_k8s import KubernetesLease, KubernetesPlatform
from streamspace_sdk.platform import Resources
from streamspace_sdk.testing import FakeClock

EQUIVALENT = {("get", "", "pods/portforward"), ("create", "", "pods/portforward")}
"""A port-forward is one WebSocket GET, authorised as either verb depending on the
server's version; the manifest grants both."""


async def scenario(kubeconfig: Path) -> None:
    platform = KubernetesPlatform(
        platform_settings(kubeconfig, storage_class="standard"), agent_id="rbac"
    )
    await platform.check()
    spec = make_spec(
        "rbac-1",
        resources=Resources(
            cpu_request_m=250, cpu_limit_m=1000, memory_request_mib=256, memory_limit_mib=1024
        ),
        env={"LANG": "C.UTF-8"},
        platform_options={
            "node_selector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "desktops", "operator": "Exists", "effect": "NoSchedule"}],
            "image_pull_secrets": ["registry"],
        },
        labels={"team": "a"},
    )
    await platform.start(spec)
    endpoint = await platform.vnc_endpoint("rbac-1")
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    assert (await asyncio.wait_for(reader.readexactly(12), 30)).startswith(b"RFB ")
    writer.close()
    await writer.wait_closed()
    await platform.hibernate("rbac-1", 2)
    await platform.wake(make_spec("rbac-1", 3))
    await platform.start(make_spec("rbac-1", 4))  # running: only the generation is recorded
    await platform.stop("rbac-1", 5)
    await platform.start(make_spec("rbac-2", persistent_home=True))
    await platform.stop("rbac-2", 2)
    # a name taken by a foreign Deployment: the conflict is explained after a get
    with pytest.raises(Exception, match="not managed by StreamSpace"):
        await platform.start(make_spec("foreign"))
    await platform.close()
    clock = FakeClock()
    lease = KubernetesLease(
        KubernetesLease.Settings(kubeconfig=str(kubeconfig), lease_lock_namespace=NAMESPACE),
        clock=clock,
    )
    assert await lease.try_acquire("a", 15) is not None
    await lease.renew("a", 15)
    await lease.release("a")
    await lease.close()


@pytest.fixture(scope="module")
def recorded(desktop_image: str, tmp_path_factory: pytest.TempPathFactory) -> FakeApiServer:
    server = FakeApiServer(docker_host=DOCKER_HOST, prefix=f"ssk8srbac{uuid.uuid4().hex[:6]}")
    server.start()
    try:
        server.add_namespace(NAMESPACE)
        server.put_object(
            "apps",
            "deployments",
            NAMESPACE,
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": KubernetesPlatform.object_name("foreign")},
                "spec": {"selector": {}, "template": {"metadata": {}, "spec": {"containers": []}}},
            },
        )
        kubeconfig = server.write_kubeconfig(tmp_path_factory.mktemp("rbac") / "config")
        asyncio.run(scenario(kubeconfig))
    finally:
        server.stop()
    return server


def manifest_rules() -> set[tuple[str, str, str]]:
    text = resources.files("streamspace_k8s").joinpath("rbac.yaml").read_text()
    granted: set[tuple[str, str, str]] = set()
    for doc in yaml.safe_load_all(text):
        if doc["kind"] != "Role":
            continue
        for rule in doc["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        granted.add((verb, group, resource))
    return granted


def test_rbac_manifest_grants_exactly_the_calls_made(recorded: FakeApiServer) -> None:
    made = set(recorded.calls)
    granted = manifest_rules()
    missing = made - granted
    assert not missing, f"the code calls {sorted(missing)}, which rbac.yaml does not grant"
    unused = granted - made
    if made & EQUIVALENT:
        unused -= EQUIVALENT
    assert not unused, f"rbac.yaml grants {sorted(unused)}, which the code never calls"


def test_rbac_manifest_is_valid(recorded: FakeApiServer) -> None:
    text = resources.files("streamspace_k8s").joinpath("rbac.yaml").read_text()
    for doc in yaml.safe_load_all(text):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _versions() -> list[str]:
    newest = kubernetes_validate.latest_version()
    minor = int(newest.split(".")[1])
    return [f"1.{m}" for m in range(29, minor + 1)]


@pytest.mark.parametrize("version", _versions())
def test_every_object_sent_is_valid(recorded: FakeApiServer, version: str) -> None:
    kinds = {body["kind"] for body in recorded.bodies}
    assert kinds >= {"Deployment", "Service", "PersistentVolumeClaim", "Lease"}, kinds
    for body in recorded.bodies:
        if body["metadata"].get("name") == KubernetesPlatform.object_name("foreign"):
            continue  # the test's own foreign object
        try:
            kubernetes_validate.validate(body, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{body['kind']} {body['metadata']} is invalid for {version}: {exc}")
