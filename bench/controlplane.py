"""How much one control-plane process holds, and how fast a command goes round.

Starts ``streamspace-controlplane serve`` as its own process (SQLite, memory hub), connects
simulated agents from this process (the real protocol over real WebSockets, see
``controlplane/tests/agentsim.py``), places sessions on them, then measures at a steady
heartbeat:

- agents online and sessions running in that one process, and its resident memory;
- command round trip: ``PATCH /api/v1/sessions/{id}`` until the agent holds the command,
  and until the session reports the new state; p50 and p99;
- the baseline in the same run: ``GET /health`` on the same server, so the round trip is
  also printed as a ratio to a no-op request over the same path.

Usage: ``python bench/controlplane.py [--agents 1000] [--sessions 10000] [--samples 300]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _common import free_port, proc_status_mib, quantiles

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "controlplane" / "tests"))

from agentsim import AgentSim  # noqa: E402

ADMIN_PASSWORD = "bench-admin-password"


async def wait_ready(client: httpx.AsyncClient, proc: asyncio.subprocess.Process) -> None:
    for _ in range(600):
        if proc.returncode is not None:
            raise SystemExit(f"control plane exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get("/ready")).status_code == 200:
                return
        await asyncio.sleep(0.1)  # a separate process: nothing to await but its port
    raise SystemExit("control plane did not become ready in 60 s")


async def in_batches(coros: list[Any], size: int) -> list[Any]:
    results: list[Any] = []
    for i in range(0, len(coros), size):
        results += await asyncio.gather(*coros[i : i + size])
    return results


async def run(args: argparse.Namespace) -> None:
    home = Path(tempfile.mkdtemp(prefix="ss-bench-"))
    port = free_port()
    env = {
        **os.environ,
        "STREAMSPACE_HOME": str(home),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        "JWT_SECRET": "b" * 48,
        "LOG_LEVEL": "WARNING",
        "MAX_SESSIONS_PER_USER": str(args.sessions),
        "STREAMSPACE_LOAD_PLUGINS": "",
    }
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamspace_controlplane.cli", "serve", env=env
    )
    base = f"http://127.0.0.1:{port}"
    sims: list[AgentSim] = []
    limits = httpx.Limits(max_connections=64)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
            await wait_ready(http, server)
            login = await http.post(
                "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            http.headers["Authorization"] = f"Bearer {login.json()['token']}"
            (await http.post("/api/v1/templates", json={"name": "desktop", "image": "x"}))
            await http.post(
                "/api/v1/users",
                json={"username": "bench", "password": "bench-password", "role": "user"},
            )
            per_agent = max(1, -(-args.sessions // args.agents))

            async def token(i: int) -> str:
                r = await http.post(f"/api/v1/agents/bench-{i:05d}/tokens")
                r.raise_for_status()
                return str(r.json()["token"])

            rss_idle = proc_status_mib(server.pid)
            t = time.perf_counter()
            tokens = await in_batches([token(i) for i in range(args.agents)], 50)
            sims = [
                AgentSim(f"ws://127.0.0.1:{port}", tok, f"bench-{i:05d}", max_sessions=per_agent)
                for i, tok in enumerate(tokens)
            ]
            await in_batches([s.connect() for s in sims], 50)
            connect_s = time.perf_counter() - t

            async def create(_: int) -> str:
                r = await http.post(
                    "/api/v1/sessions", json={"template": "desktop", "user": "bench"}
                )
                r.raise_for_status()
                return str(r.json()["id"])

            t = time.perf_counter()
            ids = await in_batches([create(i) for i in range(args.sessions)], 32)
            running = 0
            deadline = time.monotonic() + 600
            while running < len(ids) and time.monotonic() < deadline:
                r = await http.get("/api/v1/sessions", params={"state": "running", "limit": 1})
                running = int(r.json()["total"])
                await asyncio.sleep(0.5)  # a count in another process: poll it
            place_s = time.perf_counter() - t

            agents = (await http.get("/api/v1/agents")).json()
            online = sum(1 for a in agents if a["status"] == "online")
            beats_before = sum(s.beats for s in sims)

            # Baseline: a no-op request over the same path.
            health = []
            for _ in range(args.samples):
                t0 = time.perf_counter()
                await http.get("/health")
                health.append(time.perf_counter() - t0)

            to_agent: list[float] = []
            to_state: list[float] = []
            by_agent = {s.agent_id: s for s in sims}
            for sid in ids[: args.samples]:
                session = (await http.get(f"/api/v1/sessions/{sid}")).json()
                sim = by_agent[session["agent_id"]]
                async with http.stream("GET", f"/api/v1/sessions/{sid}/events") as events:
                    t0, d_agent = time.perf_counter(), 0.0
                    seen = len(sim.commands)
                    r = await http.patch(f"/api/v1/sessions/{sid}", json={"state": "hibernated"})
                    r.raise_for_status()

                    async def command_arrives(
                        sim: AgentSim = sim, seen: int = seen, sid: str = sid, t0: float = t0
                    ) -> None:
                        nonlocal d_agent
                        await sim.wait_for(
                            lambda: any(
                                c.session_id == sid and c.action == "hibernate"
                                for c in sim.commands[seen:]
                            )
                        )
                        d_agent = time.perf_counter() - t0

                    waiter = asyncio.ensure_future(command_arrives())
                    async for line in events.aiter_lines():
                        if line.startswith("data:") and '"state":"hibernated"' in line:
                            break
                    to_state.append(time.perf_counter() - t0)
                    await waiter
                    to_agent.append(d_agent)

            rss = proc_status_mib(server.pid)
            beats = sum(s.beats for s in sims) - beats_before
            h50, h99 = quantiles(health)
            a50, a99 = quantiles(to_agent)
            s50, s99 = quantiles(to_state)
            ms = 1000
            print(f"agents online in one process      {online} / {args.agents}")
            print(f"sessions running                  {running} / {args.sessions}")
            print(f"connect {args.agents} agents              {connect_s:.1f} s")
            print(f"create + place + start sessions   {place_s:.1f} s")
            per_conn = (rss - rss_idle) * 1024 / max(1, online)
            print(
                f"control plane RSS                 {rss:.0f} MiB, {rss_idle:.0f} MiB idle "
                f"(+{per_conn:.0f} KiB per agent with its sessions)"
            )
            print(f"heartbeats during measurement     {beats}")
            print(f"baseline GET /health    p50 {h50 * ms:6.2f} ms  p99 {h99 * ms:6.2f} ms")
            print(
                f"PATCH -> agent command  p50 {a50 * ms:6.2f} ms  p99 {a99 * ms:6.2f} ms"
                f"  ({a50 / h50:.1f}x / {a99 / h99:.1f}x baseline)"
            )
            print(
                f"PATCH -> new state      p50 {s50 * ms:6.2f} ms  p99 {s99 * ms:6.2f} ms"
                f"  ({s50 / h50:.1f}x / {s99 / h99:.1f}x baseline)"
            )
    finally:
        await asyncio.gather(*(s.close() for s in sims), return_exceptions=True)
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=10000)
    parser.add_argument("--samples", type=int, default=300)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
