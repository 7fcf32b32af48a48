"""The examples end to end: a real control plane process and real agent processes.

``stack`` starts ``python -m streamspace_controlplane.cli serve`` on SQLite under the
test's ``tmp_path``, on a free 127.0.0.1 port, logs in as the bootstrap admin, and starts
agent processes on request; at the end it stops them all, and kills any QEMU VM left in
their state directories. Waits are on the session's event stream (SSE) where the control
plane can tell us, else a short bounded poll of the other process. The logs of the
processes are attached to a failed test's report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

EXAMPLES = Path(__file__).resolve().parents[1]
ADMIN_PASSWORD = "examples-admin-password"
JWT_SECRET = "examples-" + "j" * 43
WAIT_S = 30.0
"""Bound on every wait; reaching it means a bug (or a badly overloaded host)."""
POLL_S = 0.05

_LOGS = pytest.StashKey[list[tuple[str, Path]]]()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without StreamSpace settings (and no hook plugins), plus ``extra``."""
    prefixes = ("STREAMSPACE_", "AGENT_", "CONTROL_PLANE_", "QEMU_", "TEMPLATE_POLICY", "AUDIT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    return env | {"STREAMSPACE_LOAD_PLUGINS": "", "PYTHONUNBUFFERED": "1"} | extra


async def eventually(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll another process's state until ``predicate()``; fail naming ``what``."""
    deadline = time.monotonic() + WAIT_S
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_S:g}s waiting for {what}")
        await asyncio.sleep(POLL_S)


def tail(path: Path, lines: int = 80) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Process:
    """A program of the stack, its output in ``log``."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{tail(self.log)}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def wait_http_ok(process: Process, url: str) -> None:
    """Wait until ``url`` answers 200 (``/ready``); fail at once if ``process`` exits."""

    async def ok() -> bool:
        process.check_alive()
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                return (await http.get(url)).status_code == 200
        except httpx.HTTPError:
            return False

    await eventually(ok, f"{process.name} at {url}")


@dataclass
class Stack:
    """A control plane process and the agent processes a test starts."""

    root: Path
    logs: list[tuple[str, Path]]
    port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)
    qemu_state_dirs: list[Path] = field(default_factory=list)
    admin: httpx.AsyncClient | None = None
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _process(self, name: str, argv: list[str], env: dict[str, str]) -> Process:
        process = Process(name, argv, env, self.root / f"{name}.log")
        self.processes.append(process)
        self.logs.append((name, process.log))
        process.start()
        return process

    async def start_control_plane(self, **env: str) -> httpx.AsyncClient:
        """Start the control plane; return an HTTP client logged in as the admin."""
        settings = {
            "STREAMSPACE_HOME": str(self.root / "cp"),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "ADMIN_PASSWORD": ADMIN_PASSWORD,
            "JWT_SECRET": JWT_SECRET,
            "RECONCILE_INTERVAL": "200ms",
            "COMMAND_ACK_TIMEOUT": "2s",
        }
        argv = [sys.executable, "-m", "streamspace_controlplane.cli", "serve"]
        process = self._process("control-plane", argv, clean_env(**(settings | env)))
        await wait_http_ok(process, f"{self.url}/ready")
        self.admin = await self.login("admin", ADMIN_PASSWORD)
        return self.admin

    async def login(self, username: str, password: str) -> httpx.AsyncClient:
        http = httpx.AsyncClient(base_url=self.url, timeout=10)
        self.clients.append(http)
        r = await http.post("/api/v1/auth/login", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        http.headers["Authorization"] = f"Bearer {r.json()['token']}"
        return http

    async def add_user(self, username: str) -> httpx.AsyncClient:
        """Create a user (role ``user``) as the admin; return a client logged in as them."""
        assert self.admin is not None
        password = f"{username}-password"
        r = await self.admin.post(
            "/api/v1/users", json={"username": username, "password": password, "role": "user"}
        )
        assert r.status_code == 201, r.text
        return await self.login(username, password)

    async def start_agent(self, agent_id: str, argv: list[str], **env: str) -> Process:
        """Start an agent process with a token made over REST; wait until it registered."""
        assert self.admin is not None
        r = await self.admin.post(f"/api/v1/agents/{agent_id}/tokens")
        assert r.status_code == 201, r.text
        health = free_port()
        settings = {
            "AGENT_ID": agent_id,
            "AGENT_TOKEN": r.json()["token"],
            "CONTROL_PLANE_URL": f"ws://127.0.0.1:{self.port}",
            "HEALTH_HOST": "127.0.0.1",
            "HEALTH_PORT": str(health),
            "HEARTBEAT_INTERVAL": "1s",
        }
        if "QEMU_STATE_DIR" in env:
            self.qemu_state_dirs.append(Path(env["QEMU_STATE_DIR"]))
        process = self._process(agent_id, argv, clean_env(**(settings | env)))
        await wait_http_ok(process, f"http://127.0.0.1:{health}/ready")
        return process

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()
        for process in reversed(self.processes):  # agents first: sessions keep running
            process.stop()
        kill_vms(self.qemu_state_dirs)  # VMs outlive their agent: they end here


def kill_vms(state_dirs: list[Path]) -> None:
    """SIGKILL every QEMU VM recorded in the qemu platform's ``state_dirs``."""
    for state_dir in state_dirs:
        for pid_file in state_dir.glob("sessions/*/qemu.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if str(pid_file).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


async def create_template(admin: httpx.AsyncClient, name: str, **fields: Any) -> None:
    r = await admin.post("/api/v1/templates", json={"name": name, **fields})
    assert r.status_code == 201, r.text


async def create_session(client: httpx.AsyncClient, template: str) -> str:
    r = await client.post("/api/v1/sessions", json={"template": template})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def wait_state(
    client: httpx.AsyncClient, session_id: str, *states: str, fail_on: tuple[str, ...] = ("failed",)
) -> dict[str, Any]:
    """Follow the session's event stream until an event in ``states``; return that event.

    Fails at once on a state in ``fail_on``, with the session's history.
    """
    seen: list[str] = []
    url = f"/api/v1/sessions/{session_id}/events"
    async with (
        asyncio.timeout(WAIT_S),
        client.stream("GET", url, timeout=httpx.Timeout(10, read=None)) as r,
    ):
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            event: dict[str, Any] = json.loads(line[5:])
            seen.append(
                f"{event['state']} ({event['detail']})" if event["detail"] else event["state"]
            )
            if event["state"] in states:
                return event
            if event["state"] in fail_on:
                pytest.fail(f"session {session_id}: {', '.join(seen)}")
    pytest.fail(f"the event stream of {session_id} ended: {', '.join(seen)}")


async def vnc_url(client: httpx.AsyncClient, stack: Stack, session_id: str) -> str:
    """Return the viewer socket's URL with a fresh single-use token."""
    r = await client.post(f"/api/v1/sessions/{session_id}/vnc-token")
    assert r.status_code == 201, r.text
    return f"ws://127.0.0.1:{stack.port}{r.json()['url']}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the logs of the processes a failed test started to its report."""
    report = yield
    if report.failed:
        for name, path in item.stash.get(_LOGS, []):
            report.sections.append((f"{name} log", tail(path, 150)))
    return report


@pytest_asyncio.fixture
async def stack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    """A stack of this test's own; its control plane starts with ``start_control_plane``."""
    started = Stack(root=tmp_path, logs=request.node.stash.setdefault(_LOGS, []))
    try:
        yield started
    finally:
        await started.close()


AGENT = [str(Path(sys.executable).with_name("streamspace-agent")), "run"]
"""The SDK's agent program, as an operator runs it."""
CUSTOM_AGENT = [sys.executable, str(EXAMPLES / "custom-agent" / "agent.py")]
"""``examples/custom-agent/agent.py``, as its README runs it."""
