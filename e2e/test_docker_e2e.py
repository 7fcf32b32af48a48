"""Issue 6, end to end: a real control plane, an agent with ``PLATFORM=docker`` on the real
Docker engine, and the desktop image (Xvnc and xterm) built on this host.

A session started over REST shows its desktop through ``/vnc/{id}`` (a real RFB handshake
and a whole frame); SIGKILL and restart of the agent adopt the same container; the
user's second session finds in its home the file the first one wrote.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import docker
import httpx
import pytest
import pytest_asyncio
from conftest import AGENT_ID, Agents, ControlPlane, EventWatch, create_session, docker_engine

from streamspace_docker.image import DESKTOP_IMAGE
from streamspace_sdk.testing import read_screen

pytestmark = pytest.mark.asyncio

PREFIX = f"sse2e{uuid.uuid4().hex[:8]}"
NEVER = ("stopping", "stopped", "failed")
START_S = 60.0
"""Bound on a desktop container reaching ``running`` on a loaded 2-core host."""


@pytest.fixture(scope="module")
def engine() -> Iterator[docker.APIClient]:
    """The real engine, with the desktop image; what the tests made is removed at the end."""
    with docker_engine(PREFIX) as client:
        yield client


@pytest_asyncio.fixture
async def docker_desktop(admin: httpx.AsyncClient, engine: docker.APIClient) -> dict[str, Any]:
    """The ``docker-desktop`` template: the desktop image, with a persistent home."""
    r = await admin.post(
        "/api/v1/templates",
        json={
            "name": "docker-desktop",
            "display_name": "Docker desktop",
            "platform": "docker",
            "image": DESKTOP_IMAGE,
            "persistent_home": True,
        },
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


DOCKER_ENV = {
    "PLATFORM": "docker",
    "DOCKER_HOST": "unix:///var/run/docker.sock",
    "NETWORK_PREFIX": PREFIX,
    "IMAGE_PULL_POLICY": "Never",
}


async def view(cp: ControlPlane, admin: httpx.AsyncClient, sid: str) -> tuple[int, int, str]:
    """Read the session's whole screen through ``/vnc/{id}`` as a viewer; return its size
    and desktop name."""
    r = await admin.post(f"/api/v1/sessions/{sid}/vnc-token")
    assert r.status_code == 201, r.text
    screen = await read_screen(f"{cp.ws_url}{r.json()['url']}")
    return screen.width, screen.height, screen.name


def container(engine: docker.APIClient, sid: str) -> dict[str, Any]:
    found: dict[str, Any] = engine.inspect_container(f"{PREFIX}-{sid}")
    return found


def exec_in(engine: docker.APIClient, sid: str, script: str) -> str:
    exec_id = engine.exec_create(f"{PREFIX}-{sid}", ["sh", "-c", script])["Id"]
    output = engine.exec_start(exec_id).decode()
    assert engine.exec_inspect(exec_id)["ExitCode"] == 0, output
    return output


async def test_docker_session_desktop_adoption_and_home(
    cp: ControlPlane,
    admin: httpx.AsyncClient,
    agents: Agents,
    docker_desktop: dict[str, Any],
    engine: docker.APIClient,
) -> None:
    agent = await agents.start(env=DOCKER_ENV)
    assert "Connected to Docker daemon" in agent.log_text()
    first = await create_session(admin, "docker-desktop")
    async with EventWatch(admin, first) as watch:
        await watch.wait_for("running", timeout_s=START_S)
        assert await view(cp, admin, first) == (1280, 800, "streamspace")
        before = container(engine, first)
        exec_in(engine, first, f'printf %s {first} > "$HOME/first.txt"')

        agent.kill()
        again = await agents.restart(agent)
        assert again.agent_id == AGENT_ID
        # The new process adopted the running container: same one, still running.
        assert await view(cp, admin, first) == (1280, 800, "streamspace")
        after = container(engine, first)
        assert after["Id"] == before["Id"]
        assert after["State"]["StartedAt"] == before["State"]["StartedAt"]
        assert not set(watch.states) & set(NEVER), watch.history()

        r = await admin.patch(f"/api/v1/sessions/{first}", json={"state": "stopped"})
        assert r.status_code == 200, r.text
        await watch.wait_for("stopped")
    assert not engine.containers(all=True, filters={"name": f"{PREFIX}-{first}"})

    second = await create_session(admin, "docker-desktop")
    async with EventWatch(admin, second) as watch:
        await watch.wait_for("running", timeout_s=START_S)
        assert exec_in(engine, second, 'cat "$HOME/first.txt"') == first
        r = await admin.patch(f"/api/v1/sessions/{second}", json={"state": "stopped"})
        assert r.status_code == 200, r.text
        await watch.wait_for("stopped")
