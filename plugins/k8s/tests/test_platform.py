"""The kubernetes platform's bad inputs and the Kubernetes facts it reports."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from conftest import NAMESPACE
from fakeapi import FakeApiServer, free_port
from test_conformance import make_spec, platform_settings

from streamspace_k8s import KubernetesPlatform
from streamspace_sdk.errors import ConfigError, PlatformError
from streamspace_sdk.settings import load_settings


def sid() -> str:
    return f"bad-{uuid.uuid4().hex[:8]}"


def platform(kubeconfig: Path, **values: object) -> KubernetesPlatform:
    return KubernetesPlatform(platform_settings(kubeconfig, **values), agent_id="bad")


@pytest.mark.asyncio
async def test_no_cluster_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(
        '{"apiVersion": "v1", "kind": "Config", "current-context": "x",'
        f'"clusters": [{{"name": "x", "cluster": {{"server": "http://127.0.0.1:{free_port()}"}}}}],'
        '"users": [{"name": "u", "user": {"token": "t"}}],'
        '"contexts": [{"name": "x", "context": {"cluster": "x", "user": "u"}}]}'
    )
    p = platform(config)
    with pytest.raises(PlatformError, match=r"did not answer.*KUBECONFIG"):
        await p.check()
    await p.close()


@pytest.mark.asyncio
async def test_forbidden_points_at_the_rbac(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    apiserver.forbid("create", "apps", "deployments")
    p = platform(kubeconfig)
    try:
        with pytest.raises(PlatformError, match=r"forbidden.*rbac\.yaml"):
            await p.start(make_spec(sid()))
    finally:
        apiserver.forbidden.clear()
        await p.close()


@pytest.mark.asyncio
async def test_missing_namespace_is_named(kubeconfig: Path) -> None:
    p = platform(kubeconfig, namespace="nowhere")
    with pytest.raises(PlatformError, match=r"NAMESPACE=nowhere exist"):
        await p.check()
    with pytest.raises(PlatformError, match=r"kubectl create namespace nowhere"):
        await p.start(make_spec(sid()))
    await p.close()


@pytest.mark.asyncio
async def test_image_pull_back_off_fails_the_start_with_the_reason(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    p = platform(kubeconfig, image_pull_policy="IfNotPresent")
    session = sid()
    with pytest.raises(PlatformError, match=r"ImagePullBackOff: Back-off pulling image"):
        await p.start(make_spec(session, image="streamspace/no-such-image:never"))
    assert await p.status(session) is None, "a failed start leaves nothing behind"
    assert not [
        d
        for d in apiserver.list_objects("apps", "deployments", NAMESPACE)
        if d["metadata"]["name"] == p.object_name(session)
    ]
    await p.close()


@pytest.mark.asyncio
async def test_unschedulable_is_reported_while_starting(kubeconfig: Path) -> None:
    p = platform(kubeconfig, k8s_start_timeout=1)
    session = sid()
    spec = make_spec(
        session, platform_options={"node_selector": {"fake.streamspace.io/unschedulable": "yes"}}
    )
    with pytest.raises(PlatformError, match=r"K8S_START_TIMEOUT.*Unschedulable: 0/1 nodes"):
        await p.start(spec)
    await p.close()


@pytest.mark.asyncio
async def test_a_foreign_object_with_the_name_is_left_alone(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    session = sid()
    name = KubernetesPlatform.object_name(session)
    foreign = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": {"app": "other"}},
        "spec": {"ports": [{"port": 80}]},
    }
    apiserver.put_object("", "services", NAMESPACE, foreign)
    p = platform(kubeconfig)
    with pytest.raises(PlatformError, match=r"a Service named .* not managed by StreamSpace"):
        await p.start(make_spec(session))
    kept = apiserver.get("", "services", NAMESPACE, name)
    assert kept is not None
    assert kept["metadata"]["labels"] == {"app": "other"}
    assert await p.status(session) is None
    await p.close()


@pytest.mark.asyncio
async def test_bad_platform_options_are_named(kubeconfig: Path) -> None:
    p = platform(kubeconfig)
    with pytest.raises(PlatformError, match="it knows: node_selector"):
        await p.start(make_spec(sid(), platform_options={"nodeselector": {}}))
    await p.close()


@pytest.mark.usefixtures("desktop_image")
@pytest.mark.asyncio
async def test_the_deployment_is_labelled_hardened_and_owns_its_service(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    p = platform(kubeconfig, vnc_access="service")
    session = sid()
    status = await p.start(
        make_spec(session, user="alice@example.com", labels={"app": "firefox", "team": "a"})
    )
    assert status.state == "running"
    assert status.vnc is not None
    assert status.vnc.host == f"{p.object_name(session)}.{NAMESPACE}.svc"
    dep = apiserver.get("apps", "deployments", NAMESPACE, p.object_name(session))
    assert dep is not None
    labels = dep["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "streamspace-agent"
    assert labels["streamspace.io/user"].startswith("alice-example.com-"), "made a valid label"
    assert dep["metadata"]["annotations"]["streamspace.io/user"] == "alice@example.com"
    # The seed guide's `kubectl get pods -l app=session` and `-l session=<id>`: on the
    # Deployment, its pods and the Service (winning over the template's `app`), never in a
    # selector, which adoption of older Deployments relies on.
    seed_labels = {"app": "session", "session": session}
    assert labels["team"] == "a"
    for obj in (dep["metadata"], dep["spec"]["template"]["metadata"]):
        assert seed_labels.items() <= obj["labels"].items()
    pods = [
        pod
        for pod in apiserver.list_objects("", "pods", NAMESPACE)
        if seed_labels.items() <= (pod["metadata"].get("labels") or {}).items()
    ]
    assert len(pods) == 1, "one running pod matches -l app=session,session=<id>"
    assert pods[0]["metadata"]["labels"]["streamspace.io/session-id"] == session
    assert not seed_labels.keys() & dep["spec"]["selector"]["matchLabels"].keys()
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["readinessProbe"] == {
        "tcpSocket": {"port": "vnc"},
        "periodSeconds": 2,
        "failureThreshold": 3,
    }
    svc = apiserver.get("", "services", NAMESPACE, p.object_name(session))
    assert svc is not None
    assert seed_labels.items() <= svc["metadata"]["labels"].items()
    assert not seed_labels.keys() & svc["spec"]["selector"].keys()
    assert svc["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"]
    claims = [
        c
        for c in apiserver.list_objects("", "persistentvolumeclaims", NAMESPACE)
        if c["metadata"]["name"].startswith(p.object_name(session) + "-home-")
    ]
    assert len(claims) == 1, "the session's own home claim, named by generateName"
    assert claims[0]["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"]
    await p.stop(session, 2)
    await p.close()


def test_settings_use_the_seed_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAMESPACE", "sessions")
    monkeypatch.setenv("MAX_SESSIONS", "7")
    monkeypatch.setenv("VNC_ACCESS", "port-forward")
    config = load_settings(KubernetesPlatform.Settings)
    assert (config.namespace, config.max_sessions, config.vnc_access) == (
        "sessions",
        7,
        "port-forward",
    )
    monkeypatch.setenv("VNC_ACCESS", "loopback")
    with pytest.raises(ConfigError, match="VNC_ACCESS"):
        load_settings(KubernetesPlatform.Settings)
