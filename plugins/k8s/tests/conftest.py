"""Fixtures: a fake API server (with a docker-backed kubelet) the real client talks to.

A test that needs Docker fails (never skips) when no engine answers or the desktop image
is missing: CI starts ``dockerd`` and builds the image first.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from fakeapi import FakeApiServer

pytest_plugins = ["streamspace_sdk.testing.plugin"]

DOCKER_HOST = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
DESKTOP_IMAGE = "streamspace/desktop:bookworm"
NAMESPACE = "streamspace"
RUN = uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeApiServer]:
    """One fake API server for the run, with the ``streamspace`` namespace."""
    server = FakeApiServer(docker_host=DOCKER_HOST, prefix=f"ssk8s{RUN}")
    server.start()
    server.add_namespace(NAMESPACE)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kubeconfig(apiserver: FakeApiServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig pointing at the fake API server."""
    return apiserver.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")


@pytest.fixture(scope="session")
def desktop_image() -> str:
    """The desktop image, which the Docker engine must already have."""
    try:
        client = docker.APIClient(base_url=DOCKER_HOST, version="auto")
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker engine answers at {DOCKER_HOST} ({exc}); start dockerd")
    try:
        client.inspect_image(DESKTOP_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(
            f"the Docker engine has no {DESKTOP_IMAGE}; build it first with "
            "`python -m streamspace_docker.image` (plugins/docker)"
        )
    finally:
        client.close()
    return DESKTOP_IMAGE
