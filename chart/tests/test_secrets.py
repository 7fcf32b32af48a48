"""The generated admin password and JWT key are kept across upgrades.

`helm upgrade` renders with `lookup` answered by the cluster. Here the same Helm engine
(helm_python.Config.render, cluster-aware) asks a small in-process API server
(tests/fakeapi.py) that holds the Secrets the install rendered, as the cluster would after
the install. What this cannot show is the API server's side of an upgrade (the apply); it
shows that the chart writes back the values it reads.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest
from conftest import NAMESPACE, RELEASE, Rendered, parse
from fakeapi import FakeApiServer

ADMIN = "streamspace-admin-credentials"
JWT = "streamspace-jwt"


def decoded(secret: dict[str, Any], key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


@pytest.fixture
def cluster() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def deploy(cluster: FakeApiServer, chart: helm.Chart) -> Iterator[Any]:
    """Render cluster-aware against `cluster`, then store the Secrets as an install would."""
    with helm.Config(kubeconfig_content=cluster.kubeconfig(NAMESPACE), namespace=NAMESPACE) as cfg:

        def _deploy(values: dict[str, Any], revision: int) -> Rendered:
            files = cfg.render(
                chart,
                values,
                name=RELEASE,
                namespace=NAMESPACE,
                revision=revision,
                is_install=revision == 1,
                is_upgrade=revision > 1,
            )
            r = parse(files)
            for secret in r.all("Secret"):
                cluster.apply(secret)
            return r

        yield _deploy


def test_generated_secrets_survive_an_upgrade(deploy: Any, cluster: FakeApiServer) -> None:
    first = deploy({}, 1)
    password = decoded(first.get("Secret", ADMIN), "password")
    key = decoded(first.get("Secret", JWT), "secret")
    assert len(password) == 24
    assert len(key) == 48  # the control plane refuses fewer than 32
    assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{ADMIN}" in cluster.requests
    assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{JWT}" in cluster.requests

    second = deploy({"api": {"replicaCount": 1, "env": {"LOG_LEVEL": "DEBUG"}}}, 2)
    assert decoded(second.get("Secret", ADMIN), "password") == password
    assert decoded(second.get("Secret", JWT), "secret") == key
    third = deploy({}, 3)
    assert decoded(third.get("Secret", ADMIN), "password") == password
    assert decoded(third.get("Secret", JWT), "secret") == key


def test_without_the_cluster_every_render_draws_new_values(render: Any) -> None:
    """What the upgrade test rules out: offline renders (no lookup) differ every time."""
    one, two = render({}), render({})
    assert decoded(one.get("Secret", ADMIN), "password") != decoded(
        two.get("Secret", ADMIN), "password"
    )
    assert decoded(one.get("Secret", JWT), "secret") != decoded(two.get("Secret", JWT), "secret")


def test_given_values_win_over_the_kept_ones(deploy: Any) -> None:
    first = deploy({}, 1)
    assert decoded(first.get("Secret", ADMIN), "username") == "admin"
    second = deploy({"admin": {"password": "rotated-password"}, "jwt": {"secret": "k" * 32}}, 2)
    assert decoded(second.get("Secret", ADMIN), "password") == "rotated-password"
    assert decoded(second.get("Secret", JWT), "secret") == "k" * 32
    # and the given values are then the kept ones
    third = deploy({}, 3)
    assert decoded(third.get("Secret", ADMIN), "password") == "rotated-password"
    assert decoded(third.get("Secret", JWT), "secret") == "k" * 32


def test_a_kept_jwt_key_too_short_for_the_control_plane_is_replaced(
    deploy: Any, cluster: FakeApiServer
) -> None:
    deploy({}, 1)
    short = base64.b64encode(b"too-short").decode()
    cluster.secrets[(NAMESPACE, JWT)]["data"]["secret"] = short
    second = deploy({}, 2)
    assert len(decoded(second.get("Secret", JWT), "secret")) == 48


def test_existing_secrets_replace_the_generated_ones(deploy: Any) -> None:
    r = deploy({"admin": {"existingSecret": "my-admin"}, "jwt": {"existingSecret": "my-jwt"}}, 1)
    assert r.all("Secret") == []
    (api,) = r.get("Deployment", "streamspace-api")["spec"]["template"]["spec"]["containers"]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in api["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {
        "JWT_SECRET": "my-jwt",
        "ADMIN_USERNAME": "my-admin",
        "ADMIN_PASSWORD": "my-admin",
    }
