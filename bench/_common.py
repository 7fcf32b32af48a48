"""What the benchmarks share: ports, percentiles, process figures, child processes, and a
control plane run as its own process (on SQLite, or on a PostgreSQL database made for the run).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterable, Sequence
from pathlib import Path
from typing import IO, TypeVar

import httpx

T = TypeVar("T")

ADMIN_PASSWORD = "bench-admin-password"
PG = "postgresql://postgres@127.0.0.1:5432"
"""PostgreSQL for ``--postgres`` runs: the local server, trust authentication."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def quantiles(values: list[float]) -> tuple[float, float]:
    """Return the p50 and p99 of ``values``."""
    ordered = sorted(values)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return p50, p99


def proc_status_mib(pid: int, field: str = "VmRSS") -> float:
    """Return a memory field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def base_env() -> dict[str, str]:
    """The environment for a benchmark's servers: ours, without StreamSpace or DB settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMSPACE_", "DB_"))}
    return env | {"STREAMSPACE_LOAD_PLUGINS": "", "LOG_LEVEL": "WARNING"}


async def wait_ready(
    url: str, proc: asyncio.subprocess.Process, what: str, interval_s: float = 0.1
) -> None:
    """Wait until ``url`` answers 200; exit the benchmark if ``proc`` dies or 60 s pass."""
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise SystemExit(f"{what} exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return
            await asyncio.sleep(interval_s)  # a separate process: nothing to await but its port
    raise SystemExit(f"{what} did not become ready in 60 s")


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """Terminate a child, killing it if it has not exited in 30 s."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
    await proc.wait()


def proc_cpu_s(pid: int) -> float:
    """Return the CPU seconds (user + system) process ``pid`` and its children have used so
    far: the live ones, and those it has waited for (websockify forks one per client)."""
    task = Path(f"/proc/{pid}/task/{pid}/children")
    children = [int(c) for c in task.read_text().split()] if task.exists() else []
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = sum(int(f) for f in fields[11:15])
    for child in children:
        with contextlib.suppress(OSError):
            child_fields = Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()
            ticks += int(child_fields[11]) + int(child_fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_fds(pid: int) -> int:
    """Return how many file descriptors process ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_threads(pid: int) -> int:
    """Return how many threads process ``pid`` runs."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (children inherit it);
    return the limit. Thousands of sockets need more than the usual soft 1024."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def in_batches(coros: Iterable[Awaitable[T]], size: int) -> list[T]:
    """Await ``coros`` ``size`` at a time, in order; return their results."""
    pending = list(coros)
    results: list[T] = []
    for i in range(0, len(pending), size):
        results += await asyncio.gather(*pending[i : i + size])
    return results


async def create_database() -> str:
    """Create a PostgreSQL database for one run on :data:`PG`; return its name."""
    import asyncpg

    name = f"streamspace_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(f"{PG}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name


async def drop_database(name: str) -> None:
    """Drop a database :func:`create_database` made, closing what still uses it."""
    import asyncpg

    admin = await asyncpg.connect(f"{PG}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def create_session(http: httpx.AsyncClient, body: dict[str, str]) -> tuple[str, float]:
    """Create a session (``POST /api/v1/sessions`` with ``body``), waiting out refusals with
    ``Retry-After``; return its id and the seconds the creation that succeeded took."""
    while True:
        t0 = time.perf_counter()
        r = await http.post("/api/v1/sessions", json=body)
        elapsed = time.perf_counter() - t0
        if r.status_code == 429 and "Retry-After" in r.headers:
            await asyncio.sleep(float(r.headers["Retry-After"]))
            continue
        r.raise_for_status()
        return str(r.json()["id"]), elapsed


async def count_sessions(http: httpx.AsyncClient, state: str) -> int:
    """Return how many sessions are in ``state``."""
    r = await http.get("/api/v1/sessions", params={"state": state, "limit": 1})
    r.raise_for_status()
    return int(r.json()["total"])


async def wait_running(http: httpx.AsyncClient, count: int, timeout_s: float) -> int:
    """Wait until ``count`` sessions run, or ``timeout_s`` passes; return how many run."""
    deadline = time.monotonic() + timeout_s
    running = await count_sessions(http, "running")
    while running < count and time.monotonic() < deadline:
        await asyncio.sleep(0.25)  # a count in another process: poll it
        running = await count_sessions(http, "running")
    return running


class ControlPlane:
    """``streamspace-controlplane serve`` as a child process, on a fixed port and store, so
    that it can be killed and started again where agents will find it.

    Args:
        home: Its ``STREAMSPACE_HOME`` (the SQLite file lives there).
        log: Where its output goes.
        database: A PostgreSQL database on :data:`PG` to use instead of SQLite.
        env: More settings (``MAX_SESSIONS_PER_USER``, ...).
        argv: The command; by default this interpreter running the ``serve`` command.
    """

    def __init__(
        self,
        home: Path,
        log: IO[bytes],
        *,
        database: str | None = None,
        env: dict[str, str] | None = None,
        argv: Sequence[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.log = log
        self.argv = list(argv or [sys.executable, "-m", "streamspace_controlplane.cli", "serve"])
        self.env = base_env() | {
            "STREAMSPACE_HOME": str(home),
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "ADMIN_PASSWORD": ADMIN_PASSWORD,
            "JWT_SECRET": "b" * 48,
        }
        if database is not None:
            self.env |= {"DB_HOST": "127.0.0.1", "DB_NAME": database, "DB_USER": "postgres"}
        self.env |= env or {}
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    async def start(self) -> float:
        """Start it; return the seconds until ``/ready`` answered 200."""
        t0 = time.perf_counter()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        await wait_ready(f"{self.base}/ready", self.proc, "the control plane", interval_s=0.02)
        return time.perf_counter() - t0

    async def kill(self) -> None:
        """SIGKILL it, as a crash would, and reap it."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        """Terminate it (SIGTERM, then SIGKILL after 30 s)."""
        if self.proc is not None:
            await stop_process(self.proc)

    async def admin(self, timeout_s: float = 60, connections: int = 64) -> httpx.AsyncClient:
        """Return a client of its REST API logged in as the admin; close it when done."""
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        http = httpx.AsyncClient(base_url=self.base, timeout=timeout_s, limits=limits)
        login = await http.post(
            "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        login.raise_for_status()
        http.headers["Authorization"] = f"Bearer {login.json()['token']}"
        return http
