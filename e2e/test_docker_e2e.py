"""Issue 6, end to end: a real control plane, an agent with ``PLATFORM=docker`` on the real
Docker engine, and the desktop image (Xvnc and xterm) built on this host.

A session started over REST shows its desktop through ``/vnc/{id}`` (a real RFB handshake
and a framebuffer update); SIGKILL and restart of the agent adopt the same container; the
user's second session finds in its home the file the first one wrote.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import httpx
import pytest
import pytest_asyncio
import websockets
from conftest import AGENT_ID, Agents, ControlPlane, EventWatch, create_session, docker_engine

from streamspace_docker.image import DESKTOP_IMAGE

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


class Rfb:
    """The client side of an RFB handshake over a viewer WebSocket; bytes buffered."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.buffer = b""

    async def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            message = await asyncio.wait_for(self.ws.recv(), 10)
            assert isinstance(message, bytes), message
            self.buffer += message
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    async def handshake(self) -> tuple[int, int, str]:
        """Do version, security (None) and init; return the desktop's width, height, name."""
        assert await self.read(12) == b"RFB 003.008\n"
        await self.ws.send(b"RFB 003.008\n")
        (count,) = await self.read(1)
        types = await self.read(count)
        assert 1 in types, f"the desktop offers security types {list(types)}, not None"
        await self.ws.send(b"\x01")
        assert await self.read(4) == b"\0\0\0\0", "security result: failed"
        await self.ws.send(b"\x01")  # ClientInit: shared
        width, height = struct.unpack(">HH", await self.read(4))
        await self.read(16)  # pixel format
        (length,) = struct.unpack(">I", await self.read(4))
        return width, height, (await self.read(length)).decode()

    async def framebuffer(self, width: int, height: int) -> int:
        """Ask for the whole screen; return how many rectangles the update brings."""
        await self.ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
        kind, _pad, rectangles = struct.unpack(">BBH", await self.read(4))
        assert kind == 0, f"expected a FramebufferUpdate, got message type {kind}"
        return int(rectangles)


async def view(cp: ControlPlane, admin: httpx.AsyncClient, sid: str) -> tuple[int, int, str]:
    """Open the session's desktop through ``/vnc/{id}`` as a viewer; return what it shows."""
    r = await admin.post(f"/api/v1/sessions/{sid}/vnc-token")
    assert r.status_code == 201, r.text
    url = f"{cp.ws_url}{r.json()['url']}"
    async with websockets.connect(url, subprotocols=[websockets.Subprotocol("binary")]) as ws:
        rfb = Rfb(ws)
        width, height, name = await rfb.handshake()
        assert await rfb.framebuffer(width, height) >= 1
        return width, height, name


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
