"""Fixtures: the real Docker engine on this host, which must be a Swarm manager.

CI runs ``docker swarm init --advertise-addr 127.0.0.1``; a test fails (never skips) when
the engine is missing or not a manager. Every lease a test makes is removed afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import docker
import pytest

pytest_plugins = ["streamspace_sdk.testing.plugin"]

DOCKER_HOST = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
RUN = uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.APIClient]:
    """A client of the real engine; the leases this run made are removed at the end."""
    try:
        client = docker.APIClient(base_url=DOCKER_HOST, version="auto")
        swarm = client.info().get("Swarm") or {}
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker engine answers at {DOCKER_HOST} ({exc}); start dockerd")
    if not swarm.get("ControlAvailable"):
        pytest.fail(f"the engine at {DOCKER_HOST} is not a Swarm manager: docker swarm init")
    yield client
    for row in client.configs(filters={"name": f"streamspace-lease-t{RUN}"}):
        client.remove_config(row["ID"])
    client.close()


@pytest.fixture
def lease_key(engine: docker.APIClient) -> str:
    """A lease key of this test's own."""
    return f"t{RUN}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def standalone_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second, real Docker engine that is not in a swarm; yields its DOCKER_HOST."""
    import shutil
    import signal
    import socket
    import subprocess
    import time

    dockerd = shutil.which("dockerd")
    if dockerd is None:
        pytest.fail("dockerd is not installed: apt-get install docker.io")
    root = tmp_path_factory.mktemp("dockerd")
    sock = root / "docker.sock"
    log = (root / "log").open("wb")
    proc = subprocess.Popen(
        [
            dockerd,
            f"--data-root={root / 'data'}",
            f"--exec-root={root / 'exec'}",
            f"--pidfile={root / 'pid'}",
            f"--host=unix://{sock}",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # the engine cannot tell us it is up: poll its ping
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(sock))
                    probe.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                    if b" 200 " in probe.recv(64):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"a second dockerd did not start: {(root / 'log').read_text()}")
            time.sleep(0.1)
        yield f"unix://{sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
