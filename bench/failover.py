"""How fast a new leader takes over when the HA agent's leader dies or stops, per backend.

Starts ``streamspace-controlplane serve`` (SQLite) and, per lease backend installed
(``file``, ``redis``, ``swarm``), three ``streamspace-agent run`` replicas of one agent
(``ENABLE_HA=true``, ``PLATFORM=process``, ``LEASE_DURATION=3s``, ``RENEW_DEADLINE=2s``,
``RETRY_PERIOD=500ms``). Then, several times each:

- crash: SIGKILL the registered replica; the time until another one is registered with
  the control plane (its ``/ready`` says ``leader`` with a connection);
- graceful: SIGTERM it (it releases the lease); the same time;

replacing the replica that went, as an orchestrator would. The baseline, measured in the
same run: one agent process without HA, from exec to registered (what a restart by
systemd or a Deployment costs at best). Prints min / median / max per backend and kind,
and the crash figure against the bound LEASE_DURATION + RETRY_PERIOD.

Usage: ``python bench/failover.py [--runs 5] [--backends file,redis,swarm]``. Redis at
127.0.0.1:6379; swarm needs the local engine to be a Swarm manager.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
from _common import base_env, free_port, stop_process, wait_ready

from streamspace_sdk.drivers import LEASES, list_plugins

ADMIN_PASSWORD = "bench-admin-password"
LEASE_S, RETRY_S = 3.0, 0.5
TIMING = {"LEASE_DURATION": "3s", "RENEW_DEADLINE": "2s", "RETRY_PERIOD": "500ms"}
POLL_S = 0.01


@dataclass
class Replica:
    proc: asyncio.subprocess.Process
    health_port: int


class Stack:
    """A control plane and the agents of one benchmark run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.http = httpx.AsyncClient(base_url=self.base, timeout=10)
        self.log = (root / "processes.log").open("wb")
        self.server: asyncio.subprocess.Process | None = None
        self.replicas: list[Replica] = []

    async def start(self) -> None:
        env = base_env() | {
            "STREAMSPACE_HOME": str(self.root / "cp"),
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "ADMIN_PASSWORD": ADMIN_PASSWORD,
            "JWT_SECRET": "f" * 48,
            "LOST_GRACE_PERIOD": "60s",
        }
        self.server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamspace_controlplane.cli", "serve",
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        await wait_ready(f"{self.base}/ready", self.server, "the control plane")
        login = await self.http.post(
            "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        self.http.headers["Authorization"] = f"Bearer {login.json()['token']}"

    async def agent(self, agent_id: str, extra: dict[str, str]) -> Replica:
        token = await self.http.post(f"/api/v1/agents/{agent_id}/tokens")
        token.raise_for_status()
        port = free_port()
        env = base_env() | {
            "AGENT_ID": agent_id,
            "AGENT_TOKEN": token.json()["token"],
            "CONTROL_PLANE_URL": f"ws://127.0.0.1:{self.port}",
            "PLATFORM": "process",
            "PROCESS_STATE_DIR": str(self.root / f"state-{agent_id}"),
            "HEALTH_HOST": "127.0.0.1",
            "HEALTH_PORT": str(port),
            "LOG_LEVEL": "INFO",
            **extra,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamspace_sdk.cli", "run",
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        replica = Replica(proc, port)
        self.replicas.append(replica)
        return replica

    async def registered(self, replica: Replica) -> bool:
        try:
            r = await self.http.get(f"http://127.0.0.1:{replica.health_port}/ready", timeout=1)
            body = r.json()
        except (httpx.HTTPError, ValueError):
            return False
        return body.get("role") in ("leader", "standalone") and bool(body.get("connection_id"))

    async def leader(self, among: list[Replica], timeout_s: float = 30) -> Replica:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for replica in among:
                if replica.proc.returncode is None and await self.registered(replica):
                    return replica
            await asyncio.sleep(POLL_S)  # other processes: poll their /ready
        raise SystemExit(f"no replica registered within {timeout_s:g}s; see {self.log.name}")

    async def close(self) -> None:
        for replica in self.replicas:
            await stop_process(replica.proc)
        if self.server is not None:
            await stop_process(self.server)
        await self.http.aclose()
        self.log.close()


def backend_env(backend: str, root: Path, key: str) -> dict[str, str]:
    env = {"ENABLE_HA": "true", "HA_BACKEND": backend, **TIMING}
    if backend == "file":
        return env | {"LEASE_FILE": str(root / f"lease-{key}")}
    if backend == "redis":
        return env | {"REDIS_URL": "redis://127.0.0.1:6379/0", "LEASE_KEY": f"bench-{key}"}
    return env | {"LEASE_KEY": f"bench-{key}"}


async def baseline(stack: Stack, runs: int) -> list[float]:
    """Exec to registered of one agent process without HA."""
    times = []
    for i in range(runs):
        started = time.monotonic()
        replica = await stack.agent(f"bench-solo-{i}", {})
        await stack.leader([replica])
        times.append(time.monotonic() - started)
        await stop_process(replica.proc)
    return times


async def failovers(stack: Stack, backend: str, runs: int) -> dict[str, list[float]]:
    key = uuid.uuid4().hex[:8]
    agent_id = f"bench-ha-{backend}-{key}"
    env = backend_env(backend, stack.root, key)
    live = [await stack.agent(agent_id, env) for _ in range(3)]
    found: dict[str, list[float]] = {"crash": [], "graceful": []}
    for _ in range(runs):
        for kind, sig in (("crash", signal.SIGKILL), ("graceful", signal.SIGTERM)):
            leader = await stack.leader(live)
            others = [r for r in live if r is not leader]
            await asyncio.sleep(RETRY_S * 2)  # let the followers settle into their waits
            started = time.monotonic()
            leader.proc.send_signal(sig)
            await stack.leader(others, timeout_s=LEASE_S * 4)
            found[kind].append(time.monotonic() - started)
            await leader.proc.wait()
            live = [*others, await stack.agent(agent_id, env)]
    for replica in live:
        await stop_process(replica.proc)
    forget_lease(backend, env)
    return found


def forget_lease(backend: str, env: dict[str, str]) -> None:
    """Remove what a run left in the backend (the file lease lives in the run's folder)."""
    if backend == "redis":
        import redis

        client = redis.Redis.from_url(env["REDIS_URL"])
        client.delete(f"lease:{env['LEASE_KEY']}", f"lease:{env['LEASE_KEY']}:epoch")
        client.close()
    elif backend == "swarm":
        import docker

        api = docker.APIClient(version="auto")
        for row in api.configs(filters={"name": f"streamspace-lease-{env['LEASE_KEY']}"}):
            api.remove_config(row["ID"])
        api.close()


def row(label: str, values: list[float], bound: float | None = None) -> str:
    text = (
        f"{label:<22} min {min(values):6.2f} s  median {statistics.median(values):6.2f} s"
        f"  max {max(values):6.2f} s"
    )
    if bound is not None:
        text += f"  ({statistics.median(values) / bound:.2f}x LEASE_DURATION + RETRY_PERIOD)"
    return text


async def run(args: argparse.Namespace) -> None:
    installed = {p.name for p in list_plugins([LEASES]) if not p.error}
    backends = [b for b in args.backends.split(",") if b]
    missing = [b for b in backends if b not in installed]
    if missing:
        raise SystemExit(f"lease backends not installed: {', '.join(missing)}")
    root = Path(tempfile.mkdtemp(prefix="ss-bench-failover-"))
    stack = Stack(root)
    try:
        await stack.start()
        solo = await baseline(stack, args.runs)
        print(f"runs per figure: {args.runs}; {TIMING}")
        print(row("baseline: agent start", solo))
        for backend in backends:
            found = await failovers(stack, backend, args.runs)
            print(row(f"{backend}: crash", found["crash"], LEASE_S + RETRY_S))
            print(row(f"{backend}: graceful", found["graceful"]))
            ratio = statistics.median(found["graceful"]) / statistics.median(solo)
            print(f"{'':<22} graceful handover / agent start: {ratio:.2f}x")
    finally:
        await stack.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backends", default="file,redis,swarm")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
