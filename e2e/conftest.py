"""Fixtures for the end-to-end tests: a real control plane, real agents, real Xvnc sessions.

Everything runs as it does in production, each in its own process:

- ``cp``: ``python -m streamspace_controlplane.cli serve`` on a free 127.0.0.1 port, with
  its own ``STREAMSPACE_HOME`` (SQLite), a short ``RECONCILE_INTERVAL`` and
  ``LOST_GRACE_PERIOD``. It can be SIGKILLed and started again on the same port and home.
- ``admin``: an ``httpx.AsyncClient`` logged in as the bootstrap admin.
- ``desktop``: the ``desktop`` template, ``platform: process`` (Xvnc and xterm).
- ``agents``: starts ``python -m streamspace_sdk.cli run`` processes (``PLATFORM=process``),
  each with a ``PROCESS_STATE_DIR`` that outlives it, so a new process adopts its sessions.
- ``agent``: one such agent, registered.

Waits are bounded: on the session's SSE event stream where the control plane can tell us,
else a short poll of the other process (``eventually``). Every process a test starts is
stopped when it ends, session process groups included (found through the ``process``
platform's records, ``<state dir>/sessions/<id>.json``). The logs of the control plane and
the agents are attached to the report of a failed test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import pytest_asyncio

from streamspace_docker.image import ensure_desktop_image

ADMIN_PASSWORD = "e2e-admin-password"
JWT_SECRET = "e2e-" + "j" * 44
"""Fixed, so admin tokens stay valid across control-plane restarts."""
AGENT_ID = "e2e-agent"
WAIT_S = 20.0
"""Default bound on a wait; a test that hits it has found a bug (or a badly loaded host)."""
POLL_S = 0.05
"""Interval of polls of another process's state (a pid, a file, a log line)."""

CONTROL_PLANE_ENV = {
    "RECONCILE_INTERVAL": "200ms",
    "LOST_GRACE_PERIOD": "3s",
    "AGENT_HEARTBEAT_TIMEOUT": "6s",
    "COMMAND_ACK_TIMEOUT": "2s",
    "MAX_SESSIONS_PER_USER": "50",
    "LOG_LEVEL": "INFO",
}
AGENT_ENV = {
    "PLATFORM": "process",
    "HEARTBEAT_INTERVAL": "1s",
    "MAX_SESSIONS": "20",
    "LOG_LEVEL": "INFO",
}

_LOGS = pytest.StashKey[list[tuple[str, Path]]]()


# -- small helpers -----------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """Return this process's environment without StreamSpace settings, plus ``extra``."""
    prefixes = (
        "STREAMSPACE_",
        "DB_",
        "AGENT_",
        "PROCESS_",
        "CONTROL_PLANE_",
        "ENABLE_HA",
        "DOCKER_",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["STREAMSPACE_LOAD_PLUGINS"] = ""  # no hook plugins from the environment
    env["PYTHONUNBUFFERED"] = "1"
    return env | extra


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = WAIT_S
) -> None:
    """Wait until ``predicate()`` is true, polling every ``POLL_S``; fail naming ``what``.

    For state held by another process, which cannot notify us.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(POLL_S)


def group_members(pgid: int) -> dict[int, str]:
    """Return the live (not zombie) processes of group ``pgid``: pid to program name."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members[int(entry.name)] = comm
    return members


def group_alive(pgid: int) -> bool:
    """Tell whether process group ``pgid`` has a live member."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return bool(group_members(pgid))


def xvnc_pid(pgid: int) -> int:
    """Return the pid of the Xvnc of session group ``pgid``; fail if it has none."""
    found = [pid for pid, comm in group_members(pgid).items() if comm == "Xvnc"]
    if len(found) != 1:
        pytest.fail(f"process group {pgid} holds {group_members(pgid)}, not one Xvnc")
    return found[0]


async def rfb_banner(port: int, timeout_s: float = 5.0) -> bytes:
    """Return the first 12 bytes 127.0.0.1:``port`` sends (a VNC server: its RFB banner)."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await reader.readexactly(12)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def records(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Return the ``process`` platform's session records in ``state_dir``, by session id."""
    found = {}
    for path in sorted((state_dir / "sessions").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            found[record["session_id"]] = record
    return found


def record(state_dir: Path, session_id: str) -> dict[str, Any]:
    """Return the record of ``session_id`` in ``state_dir``; fail if there is none."""
    found = records(state_dir).get(session_id)
    if found is None:
        pytest.fail(f"no record of session {session_id} in {state_dir / 'sessions'}")
    return found


async def kill_session_groups(state_dirs: list[Path]) -> None:
    """Stop every session process group recorded in ``state_dirs``: SIGTERM, then SIGKILL.

    SIGTERM first: the session's supervisor then stops Xvnc, which removes its X socket.
    The X lock file names the supervisor (the agent writes it); it goes once that is dead.
    """
    recorded = [r for d in state_dirs for r in records(d).values() if r.get("pgid") is not None]
    live = {int(r["pgid"]) for r in recorded if group_alive(int(r["pgid"]))}
    for sig, wait_s in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 5.0)):
        for pgid in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while live and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            live = {g for g in live if group_alive(g)}
        if not live:
            break
    _remove_x_locks(recorded)


def _remove_x_locks(recorded: list[dict[str, Any]]) -> None:
    """Remove the X lock files (and sockets) that name the dead sessions of ``recorded``."""
    for r in recorded:
        display, pgid = r.get("display"), int(r["pgid"])
        lock = Path(f"/tmp/.X{display}-lock")
        with contextlib.suppress(OSError, ValueError):
            if display is not None and int(lock.read_text()) == pgid and not group_alive(pgid):
                lock.unlink()
                Path(f"/tmp/.X11-unix/X{display}").unlink(missing_ok=True)


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout_s: float) -> None:
    """Send ``sig`` to ``proc`` and wait for it; SIGKILL it if it outlives ``timeout_s``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- the control plane -------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """``streamspace-controlplane serve`` as its own process, restartable on one port and home."""

    home: Path
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / "controlplane.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def start(self) -> None:
        """Start the process and wait until ``/ready`` answers 200."""
        self.spawn()
        await self.wait_ready()

    def spawn(self) -> None:
        """Start the process."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.home.mkdir(parents=True, exist_ok=True)
        env = clean_env(
            STREAMSPACE_HOME=str(self.home),
            HOST="127.0.0.1",
            PORT=str(self.port),
            ADMIN_PASSWORD=ADMIN_PASSWORD,
            JWT_SECRET=JWT_SECRET,
            **(CONTROL_PLANE_ENV | self.env),
        )
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"===== start {self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamspace_controlplane.cli", "serve"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        proc = self.proc
        assert proc is not None

        async def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"the control plane exited with {proc.returncode}:\n{_tail(self.log)}")
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    return (await http.get(f"{self.url}/ready")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(ready, "the control plane's /ready", timeout_s)

    def kill(self) -> None:
        """SIGKILL the process: no shutdown frames, no cleanup, as a crash."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGKILL, 10)

    def stop(self) -> None:
        """SIGTERM the process and wait for it (SIGKILL after 15 s)."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGTERM, 15)


# -- agents ----------------------------------------------------------------------------------


@dataclass
class Agent:
    """``streamspace-agent run`` as its own process, with the ``process`` platform."""

    name: str
    """Names its log file; two processes may share an ``agent_id``."""
    agent_id: str
    token: str
    control_plane_url: str
    state_dir: Path
    log: Path
    health_port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    """Settings over ``AGENT_ENV`` (``PLATFORM=docker`` and the platform's own)."""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self) -> None:
        """Start the process (``wait_ready`` waits for its registration)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = clean_env(
            AGENT_ID=self.agent_id,
            AGENT_TOKEN=self.token,
            CONTROL_PLANE_URL=self.control_plane_url,
            PROCESS_STATE_DIR=str(self.state_dir),
            HEALTH_HOST="127.0.0.1",
            HEALTH_PORT=str(self.health_port),
            **(AGENT_ENV | self.env),
        )
        with self.log.open("ab") as log:
            log.write(b"===== start =====\n")
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamspace_sdk.cli", "run"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        """Return the status and body of ``/ready``; ``0, {}`` while it does not answer."""
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                r = await http.get(f"http://127.0.0.1:{self.health_port}/ready")
                return r.status_code, r.json()
        except (httpx.HTTPError, ValueError):
            return 0, {}

    async def wait_ready(self, timeout_s: float = WAIT_S) -> dict[str, Any]:
        """Wait until ``/ready`` says the agent is registered; return its body."""
        body: dict[str, Any] = {}

        async def ready() -> bool:
            nonlocal body
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(
                    f"agent {self.name} exited with {self.proc.returncode}:\n{_tail(self.log)}"
                )
            status, body = await self.readiness()
            return status == 200

        await eventually(ready, f"agent {self.name} to register (/ready)", timeout_s)
        return body

    def kill(self) -> None:
        """SIGKILL the agent process (its sessions run in their own process groups)."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGKILL, 10)

    def stop(self) -> None:
        """SIGTERM the agent: it closes cleanly and leaves its sessions running."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGTERM, 20)


class Agents:
    """Starts agent processes for a test; stops them and their sessions at the end."""

    def __init__(
        self, cp: ControlPlane, admin: httpx.AsyncClient, root: Path, logs: list[tuple[str, Path]]
    ) -> None:
        self.cp = cp
        self.admin = admin
        self.root = root
        self.started: list[Agent] = []
        self._logs = logs
        self._tokens: dict[str, str] = {}
        self._names = itertools.count(1)

    async def token(self, agent_id: str) -> str:
        """Return a token for ``agent_id``, made once through the REST API."""
        if agent_id not in self._tokens:
            r = await self.admin.post(f"/api/v1/agents/{agent_id}/tokens")
            assert r.status_code == 201, r.text
            self._tokens[agent_id] = r.json()["token"]
        return self._tokens[agent_id]

    async def start(
        self,
        agent_id: str = AGENT_ID,
        state_dir: Path | None = None,
        *,
        ready: bool = True,
        env: dict[str, str] | None = None,
    ) -> Agent:
        """Start an agent process; by default with a state directory of its own."""
        n = next(self._names)
        agent = Agent(
            name=f"agent{n}",
            agent_id=agent_id,
            token=await self.token(agent_id),
            control_plane_url=self.cp.ws_url,
            state_dir=state_dir or self.root / f"state{n}",
            log=self.root / f"agent{n}.log",
            env=env or {},
        )
        self._add(agent)
        agent.start()
        if ready:
            await agent.wait_ready()
        return agent

    async def restart(self, agent: Agent, *, ready: bool = True) -> Agent:
        """Start a new process like ``agent`` (same id, token and state directory)."""
        new = Agent(
            name=f"{agent.name}+",
            agent_id=agent.agent_id,
            token=agent.token,
            control_plane_url=agent.control_plane_url,
            state_dir=agent.state_dir,
            log=agent.log.with_name(f"{agent.log.stem}+.log"),
            env=agent.env,
        )
        self._add(new)
        new.start()
        if ready:
            await new.wait_ready()
        return new

    def _add(self, agent: Agent) -> None:
        self.started.append(agent)
        self._logs.append((agent.name, agent.log))

    async def close(self) -> None:
        for agent in self.started:
            agent.stop()
        await kill_session_groups(sorted({a.state_dir for a in self.started}))


# -- sessions ----------------------------------------------------------------------------------


async def create_session(admin: httpx.AsyncClient, template: str = "desktop") -> str:
    """Create a session over REST; return its id."""
    r = await admin.post("/api/v1/sessions", json={"template": template})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def get_session(admin: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    r = await admin.get(f"/api/v1/sessions/{session_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


class EventWatch:
    """Follows a session's SSE stream (``/api/v1/sessions/{id}/events``) in the background.

    Keeps every event it sees, in order. If the stream breaks (the control plane was
    killed), it reconnects with ``Last-Event-ID``, so the stored events it missed are
    replayed: ``states`` is the whole history, restarts included.
    """

    def __init__(self, admin: httpx.AsyncClient, session_id: str) -> None:
        self.admin = admin
        self.session_id = session_id
        self.events: list[dict[str, Any]] = []
        self.reconnects = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def states(self) -> list[str]:
        return [str(e["state"]) for e in self.events]

    @property
    def state(self) -> str | None:
        return self.states[-1] if self.events else None

    def history(self) -> str:
        return ", ".join(
            f"{e['state']} ({e['detail']})" if e["detail"] else e["state"] for e in self.events
        )

    async def __aenter__(self) -> EventWatch:
        self._task = asyncio.create_task(self._follow(), name=f"events {self.session_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _follow(self) -> None:
        last_id = 0
        url = f"/api/v1/sessions/{self.session_id}/events"
        timeout = httpx.Timeout(5.0, read=None)
        while True:
            try:
                headers = {"Last-Event-ID": str(last_id)} if last_id else {}
                async with self.admin.stream("GET", url, headers=headers, timeout=timeout) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            event = json.loads(line[5:])
                            last_id = int(event["id"])
                            self.events.append(event)
                            self._changed.set()
            except (httpx.HTTPError, OSError):
                pass  # the control plane went away: follow it when it is back
            self.reconnects += 1
            await asyncio.sleep(0.1)  # it is restarting: nothing to await but its port

    async def wait_for(
        self, *states: str, timeout_s: float = WAIT_S, fail_on: tuple[str, ...] = ("failed",)
    ) -> dict[str, Any]:
        """Wait until the latest event is in ``states``; return it.

        Fails at once on a state in ``fail_on`` (with the session's history), or after
        ``timeout_s``.
        """
        async with asyncio.timeout(timeout_s):
            while True:
                if self.events:
                    last = self.events[-1]
                    if last["state"] in states:
                        return last
                    if last["state"] in fail_on:
                        pytest.fail(f"session {self.session_id}: {self.history()}")
                self._changed.clear()
                await self._changed.wait()


@contextlib.contextmanager
def docker_engine(*prefixes: str) -> Iterator[docker.APIClient]:
    """The local Docker engine, with the desktop image built if it is missing; the
    containers, volumes, networks and Swarm configs whose names start with one of
    ``prefixes`` are removed after."""
    try:
        client = docker.APIClient(base_url="unix:///var/run/docker.sock", version="auto")
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker engine answers ({exc}); start dockerd")
    ensure_desktop_image(client)
    try:
        yield client
    finally:
        for prefix in prefixes:
            for row in client.containers(all=True, filters={"name": prefix}):
                client.remove_container(row["Id"], force=True)
            for volume in client.volumes(filters={"name": prefix}).get("Volumes") or []:
                client.remove_volume(volume["Name"], force=True)
            for network in client.networks():
                if network["Name"].startswith(prefix):
                    client.remove_network(network["Id"])
            for row in client.configs(filters={"name": prefix}):
                client.remove_config(row["ID"])
        client.close()


# -- fixtures ---------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the logs of the processes a failed test started to its report."""
    report = yield
    if report.failed and not hasattr(report, "wasxfail"):
        for name, path in item.stash.get(_LOGS, []):
            report.sections.append((f"{name} log", _tail(path, 200)))
    return report


@pytest.fixture
def cp_env() -> dict[str, str]:
    """Settings of the ``cp`` fixture's control plane over ``CONTROL_PLANE_ENV``; a test
    module overrides this fixture to change them."""
    return {}


@pytest_asyncio.fixture
async def cp(
    tmp_path: Path, request: pytest.FixtureRequest, cp_env: dict[str, str]
) -> AsyncIterator[ControlPlane]:
    """A control plane of its own: SQLite under ``tmp_path``, on a free port."""
    plane = ControlPlane(home=tmp_path / "cp", env=cp_env)
    request.node.stash.setdefault(_LOGS, []).append(("control plane", plane.log))
    try:
        await plane.start()
        yield plane
    finally:
        plane.stop()


@pytest_asyncio.fixture
async def admin(cp: ControlPlane) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the control plane, logged in as the admin."""
    async with httpx.AsyncClient(base_url=cp.url, timeout=10) as http:
        r = await http.post(
            "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        assert r.status_code == 200, r.text
        http.headers["Authorization"] = f"Bearer {r.json()['token']}"
        yield http


@pytest_asyncio.fixture
async def desktop(admin: httpx.AsyncClient) -> dict[str, Any]:
    """The ``desktop`` template: Xvnc and xterm on the ``process`` platform."""
    r = await admin.post(
        "/api/v1/templates",
        json={"name": "desktop", "display_name": "Desktop", "platform": "process"},
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


@pytest_asyncio.fixture
async def agents(
    cp: ControlPlane, admin: httpx.AsyncClient, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Agents]:
    """Starts agent processes; all of them, and every session they ran, end with the test."""
    logs = request.node.stash.setdefault(_LOGS, [])
    started = Agents(cp, admin, tmp_path / "agents", logs)
    started.root.mkdir()
    try:
        yield started
    finally:
        await started.close()


@pytest_asyncio.fixture
async def agent(agents: Agents, desktop: dict[str, Any]) -> Agent:
    """One registered agent process, ``AGENT_ID=e2e-agent``."""
    return await agents.start()
