"""Fixtures: the real Docker engine on this host, a desktop image built on it, and a fault
proxy in front of the engine.

A test that needs the engine fails (never skips) when none answers: CI starts ``dockerd``.
Everything the tests make is named with this run's prefix and labelled with its run id,
and removed when the run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import docker
import pytest
import pytest_asyncio

from streamspace_docker import DockerPlatform
from streamspace_docker.image import DESKTOP_IMAGE, ensure_desktop_image
from streamspace_sdk.platform import SessionSpec

pytest_plugins = ["streamspace_sdk.testing.plugin"]

DOCKER_HOST = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
RUN = uuid.uuid4().hex[:8]
PREFIX = f"sstest{RUN}"
"""NETWORK_PREFIX of every platform the tests make: names them apart from anything else."""
RUN_LABEL = "streamspace.test/run"


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.APIClient]:
    """A client of the real engine; everything this run made is removed at the end."""
    try:
        client = docker.APIClient(base_url=DOCKER_HOST, version="auto")
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker engine answers at {DOCKER_HOST} ({exc}); start dockerd")
    yield client
    for row in client.containers(all=True, filters={"label": f"{RUN_LABEL}={RUN}"}):
        client.remove_container(row["Id"], force=True)
    for row in client.containers(all=True, filters={"name": PREFIX}):
        client.remove_container(row["Id"], force=True)
    for volume in client.volumes(filters={"name": PREFIX}).get("Volumes") or []:
        client.remove_volume(volume["Name"], force=True)
    for network in client.networks(names=None):
        if network["Name"].startswith(PREFIX):
            client.remove_network(network["Id"])
    client.close()


@pytest.fixture(autouse=True)
def _networks_go_with_their_test() -> Iterator[None]:
    """Remove this run's networks that no container uses once each test ends: the engine has
    about 30 address pools (fewer with a swarm), and a run keeping every test's network to
    its end ran out of them."""
    yield
    with contextlib.suppress(docker.errors.DockerException):
        client = docker.APIClient(base_url=DOCKER_HOST, version="auto")
        try:
            for network in client.networks(names=None):
                if network["Name"].startswith(PREFIX):
                    with contextlib.suppress(docker.errors.APIError):  # in use: kept
                        client.remove_network(network["Id"])
        finally:
            client.close()


@pytest.fixture(scope="session")
def desktop_image(engine: docker.APIClient) -> str:
    """The desktop image (Xvnc and xterm), built with mmdebstrap unless the engine has it."""
    ensure_desktop_image(engine)
    return DESKTOP_IMAGE


def settings(**overrides: Any) -> DockerPlatform.Settings:
    """Platform settings for the tests: this run's prefix, local images only."""
    values: dict[str, Any] = {
        "docker_host": DOCKER_HOST,
        "network_prefix": PREFIX,
        "image_pull_policy": "Never",
        "max_sessions": 4,
        "docker_stop_timeout": 2,
        "docker_start_timeout": 30,
    }
    return DockerPlatform.Settings(**(values | overrides))


def make_spec(session_id: str, generation: int = 1, **fields: Any) -> SessionSpec:
    """A desktop session spec labelled with this run."""
    values: dict[str, Any] = {
        "session_id": session_id,
        "generation": generation,
        "user": "alice",
        "template": "desktop",
        "image": DESKTOP_IMAGE,
        "labels": {RUN_LABEL: RUN},
    }
    return SessionSpec(**(values | fields))


def new_id(stem: str = "s") -> str:
    return f"{stem}-{uuid.uuid4().hex[:10]}"


def session_containers(engine: docker.APIClient, session_id: str) -> list[dict[str, Any]]:
    """Every container labelled with the session, whatever agent made it."""
    rows: list[dict[str, Any]] = engine.containers(
        all=True, filters={"label": f"streamspace.io/session-id={session_id}"}
    )
    return rows


def volume_names(engine: docker.APIClient) -> set[str]:
    return {v["Name"] for v in engine.volumes(filters={"name": PREFIX}).get("Volumes") or []}


class EngineProxy:
    """``tcp://127.0.0.1:<port>`` in front of the engine's unix socket, which can fail on cue.

    ``die_on(pattern, forward=...)``: when a request line matching ``pattern`` comes by, the
    engine "dies": with ``forward`` the request reaches the engine but its answer is lost,
    else it never arrives; every connection closes and new ones are refused until
    :meth:`revive`. ``hold_on(pattern)``: such a request waits until :meth:`release`.
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.down = False
        self.died = asyncio.Event()
        self.held = asyncio.Event()
        self._release = asyncio.Event()
        self._die: tuple[re.Pattern[bytes], bool] | None = None
        self._dropping = False
        self._hold: re.Pattern[bytes] | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"tcp://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def close(self) -> None:
        self._kill_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def die_on(self, pattern: str, *, forward: bool = False) -> None:
        self._die = (re.compile(pattern.encode()), forward)

    def hold_on(self, pattern: str) -> None:
        self._hold = re.compile(pattern.encode())

    def release(self) -> None:
        self._hold = None
        self._release.set()

    def revive(self) -> None:
        self._die, self._dropping = None, False
        self.down = False

    def _fail(self) -> None:
        self.down = True
        self.died.set()
        self._kill_all()

    def _kill_all(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_unix_connection(self.socket_path)
        self._writers |= {writer, up_writer}
        back = asyncio.create_task(self._pump(up_reader, writer, upstream=False))
        try:
            await self._pump(reader, up_writer, upstream=True)
        finally:
            back.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await back
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(65536):
                if self.down:
                    break
                if upstream and self._hold is not None and self._hold.search(chunk):
                    self.held.set()
                    await self._release.wait()
                if not upstream and self._dropping:
                    self._dropping = False  # the engine acted and answered: lose the answer
                    self._fail()
                    break
                if upstream and self._die is not None and self._die[0].search(chunk):
                    if not self._die[1]:
                        self._fail()
                        break
                    self._die, self._dropping = None, True
                writer.write(chunk)
                await writer.drain()


@pytest_asyncio.fixture
async def proxy() -> AsyncIterator[EngineProxy]:
    """A fault proxy in front of this host's engine socket."""
    if not DOCKER_HOST.startswith("unix://"):
        pytest.fail("the fault proxy needs DOCKER_HOST to be a unix socket")
    proxy = EngineProxy(DOCKER_HOST.removeprefix("unix://"))
    await proxy.start()
    yield proxy
    await proxy.close()
