"""The container images, built with the local Docker engine and run.

The session builds ``streamspace/{control-plane,k8s-agent,docker-agent}:test-<random>`` with
``python images/build.py`` on the locally made base (``streamspace/python-base:bookworm``,
made once per machine and kept), then these tests run them. Containers are reached only
through ports published on 127.0.0.1. Every container and image tag a test makes is removed
when it ends; the base and the engine's layer cache stay, so the next run is quick.

A missing engine fails the session with what to do; nothing here is skipped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

IMAGES_DIR = Path(__file__).resolve().parent.parent
UID = 10001
TEST_LABEL = {"io.streamspace.test": "images"}
START_BOUND_S = 60.0
"""Bound on the control plane answering /health after its container starts."""
POLL_S = 0.1

_spec = importlib.util.spec_from_file_location("streamspace_images_build", IMAGES_DIR / "build.py")
assert _spec is not None
assert _spec.loader is not None
build = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = build  # dataclasses look their module up while the module loads
_spec.loader.exec_module(build)

VERSIONS = {name: p.version for name, p in build.find_packages().items()}

AGENTS = {
    "k8s-agent": {
        ("streamspace.platforms", "kubernetes", "streamspace-k8s"),
        ("streamspace.leases", "kubernetes", "streamspace-k8s"),
        ("streamspace.leases", "redis", "streamspace-lease-redis"),
    },
    "docker-agent": {
        ("streamspace.platforms", "docker", "streamspace-docker"),
        ("streamspace.leases", "file", "streamspace-lease-file"),
        ("streamspace.leases", "redis", "streamspace-lease-redis"),
        ("streamspace.leases", "swarm", "streamspace-lease-swarm"),
    },
}
"""What each agent image's ``streamspace-agent plugins`` must list besides the SDK's own."""

MAX_SIZE_MIB = {"control-plane": 200, "docker-agent": 180, "k8s-agent": 300}
"""Upper bounds on the image sizes (base ~120 MiB): a regression past them is a fat image.
The k8s agent carries the kubernetes client (~90 MiB installed)."""


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(
            f"no Docker engine answers ({exc}); start dockerd (.ci/run does) or set DOCKER_HOST",
            pytrace=False,
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def images(engine: docker.DockerClient) -> Iterator[dict[str, str]]:
    """Build the three images once; yield their tags by image name; remove them after."""
    tag = f"test-{secrets.token_hex(4)}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(IMAGES_DIR / "build.py"), "--tag", tag],
        capture_output=True,
        text=True,
        check=False,
    )
    print(f"images/build.py took {time.monotonic() - started:.1f}s:\n{done.stderr}")
    built = dict(line.split() for line in done.stdout.splitlines() if line.strip())
    try:
        assert done.returncode == 0, f"images/build.py failed:\n{done.stderr[-4000:]}"
        expected = {f"{repository}:{tag}" for repository in build.IMAGES.values()}
        assert set(built) == expected, done.stdout
        yield {name: f"{repository}:{tag}" for name, repository in build.IMAGES.items()}
    finally:
        for image in built:
            with contextlib.suppress(docker.errors.ImageNotFound):
                engine.images.remove(image)


def _run(
    engine: docker.DockerClient, image: str, command: list[str] | None = None
) -> tuple[int, str, str]:
    """Run ``command`` in a fresh container of ``image`` without network; return its result."""
    container = engine.containers.create(
        image, command, labels=TEST_LABEL, network_disabled=True, environment={}
    )
    try:
        container.start()
        status = container.wait(timeout=60)["StatusCode"]
        out = container.logs(stdout=True, stderr=False).decode()
        err = container.logs(stdout=False, stderr=True).decode()
    finally:
        container.remove(force=True)
    return int(status), out, err


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _serving(container: Any, url: str) -> tuple[int, bytes]:
    """Poll ``url`` until it answers, failing early if the container exits."""
    deadline = time.monotonic() + START_BOUND_S
    while True:
        try:
            return _get(url)
        except (urllib.error.URLError, ConnectionError):
            container.reload()
            if container.status != "running":
                logs = container.logs().decode()
                pytest.fail(f"the container stopped ({container.status}):\n{logs}")
            if time.monotonic() > deadline:
                pytest.fail(f"{url} did not answer in {START_BOUND_S}s:\n{container.logs()}")
            time.sleep(POLL_S)


def test_dockerfiles_default_to_a_public_python_slim_base() -> None:
    """Users without build.py's local base build from the public python image."""
    for name in build.IMAGES:
        text = (IMAGES_DIR / name / "Dockerfile").read_text()
        assert "ARG BASE_IMAGE=python:3.11-slim-bookworm\n" in text, name
        assert "USER 10001:10001\n" in text, name


def test_control_plane_serves_health_as_non_root(
    engine: docker.DockerClient, images: dict[str, str]
) -> None:
    """`docker run streamspace/control-plane` serves on 8080 with SQLite in its home, as 10001.

    Troubleshooting: the container's log is in the failure message; `docker run --rm -p
    127.0.0.1:8080:8080 streamspace/control-plane:local` reproduces it by hand.
    """
    image = images["control-plane"]
    config = engine.api.inspect_image(image)["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Cmd"] == ["streamspace-controlplane", "serve"]
    assert "8080/tcp" in config["ExposedPorts"]
    # A network of its own rather than docker0, which another engine may have removed.
    network = engine.networks.create(f"ss-images-test-{os.getpid()}", labels=TEST_LABEL)
    container = engine.containers.run(
        image,
        detach=True,
        labels=TEST_LABEL,
        network=network.name,
        ports={"8080/tcp": ("127.0.0.1", None)},
    )
    try:
        container.reload()
        port = container.ports["8080/tcp"][0]["HostPort"]
        base = f"http://127.0.0.1:{port}"
        status, body = _serving(container, f"{base}/health")
        assert status == 200, body
        assert json.loads(body) == {"status": "healthy"}
        assert _get(f"{base}/ready")[0] == 200
        # The web UI's viewer: noVNC is in the wheel the image installed.
        assert _get(f"{base}/static/vendor/novnc/core/rfb.js")[0] == 200
        code, proc1 = container.exec_run(["cat", "/proc/1/status"])
        uids = next(line for line in proc1.decode().splitlines() if line.startswith("Uid:"))
        assert uids.split()[1:] == [str(UID)] * 4, uids
        code, _ = container.exec_run(
            ["test", "-s", "/home/streamspace/.streamspace/streamspace.db"]
        )
        assert code == 0, "no SQLite database under STREAMSPACE_HOME"
        healthcheck = config["Healthcheck"]["Test"]
        assert healthcheck[0] == "CMD"
        code, out = container.exec_run(healthcheck[1:])
        assert code == 0, f"the image's HEALTHCHECK fails: {out.decode()}"
        logs = container.logs().decode()
        assert "store sqlite" in logs, logs
        assert "Traceback" not in logs, logs
    finally:
        container.remove(force=True)
        network.remove()


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_agent_lists_its_plugins(
    engine: docker.DockerClient, images: dict[str, str], name: str
) -> None:
    """`streamspace-agent plugins` in an agent image lists its platform and leases, loaded.

    Troubleshooting: an entry with an error failed to import in the image; run `docker run
    --rm <image> streamspace-agent plugins` to see it.
    """
    config = engine.api.inspect_image(images[name])["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Cmd"] == ["streamspace-agent", "run"]
    status, out, err = _run(engine, images[name], ["streamspace-agent", "plugins", "--json"])
    assert status == 0, err
    plugins = json.loads(out)
    assert [p for p in plugins if p["error"]] == []
    listed = {(p["group"], p["name"], p["distribution"]): p["version"] for p in plugins}
    for key in AGENTS[name] | {("streamspace.platforms", "process", "streamspace-sdk")}:
        assert listed.get(key) == VERSIONS[key[2]], f"{key} not listed: {sorted(listed)}"
    platform = next(iter(k[1] for k in AGENTS[name] if k[0] == "streamspace.platforms"))
    assert f"PLATFORM={platform}" in config["Env"]
    status, out, _ = _run(engine, images[name], ["id", "-u"])
    assert (status, out.strip()) == (0, str(UID))


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_agent_without_config_says_what_is_missing(
    engine: docker.DockerClient, images: dict[str, str], name: str
) -> None:
    """The default command with no AGENT_ID or CONTROL_PLANE_URL exits 2 naming them."""
    status, out, err = _run(engine, images[name])
    assert status == 2, out + err
    assert "AGENT_ID: is required" in err
    assert "CONTROL_PLANE_URL: is required" in err
    assert "Traceback" not in out + err


@pytest.mark.parametrize("name", sorted(MAX_SIZE_MIB))
def test_images_are_small(engine: docker.DockerClient, images: dict[str, str], name: str) -> None:
    """Each image stays under its size bound; pip and the wheels never reach the final image."""
    size_mib = int(engine.api.inspect_image(images[name])["Size"]) >> 20
    assert size_mib <= MAX_SIZE_MIB[name], f"{images[name]} is {size_mib} MiB"
    status, out, _ = _run(
        engine,
        images[name],
        ["python3", "-c", "import importlib.util as u; print(u.find_spec('pip') is None)"],
    )
    assert (status, out.strip()) == (0, "True"), "pip is in the image's Python"
    status, _, _ = _run(engine, images[name], ["test", "-e", "/tmp/deps"])
    assert status == 1, "the build stage's wheels reached the image"
