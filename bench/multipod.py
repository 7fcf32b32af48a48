"""What crossing replicas costs: a command and a VNC stream, same replica against another.

Starts, each as its own process: two control planes, A and B (``AGENT_HUB_BACKEND=redis``,
one PostgreSQL database made for the run, one Redis key prefix), the TCP target of
``vnc_relay.py`` standing in for a VNC server, and one agent (``vnc_relay.py --agent``,
``ws-mux``, a memory platform whose sessions all show the target) connected to A.

- **Command**: a session start requested over REST and followed on the same replica's
  event stream until ``running``: on A (the agent's replica: the scheduler, the outbox
  and the socket are all there) against B (the start crosses to A through Redis, the
  events come back through its broadcast). ``--starts`` of each, interleaved; p50 and p99,
  and the difference of the medians: the added latency.
- **VNC**: a ``--stream-mib`` stream from the target through ``/vnc/{id}`` on A (agent
  socket → viewer) against B (agent socket → A → internal socket → B → viewer), best and
  median of ``--repeat``, interleaved; and ``--echoes`` round trips of 64 bytes.

- **Failover**: the first agent stops; a second connects through a ``TcpBalancer`` over
  A and B (as through a Service). ``--failovers`` times, the replica holding it (and
  leading, at first) is SIGKILLed and a session start is requested on the other at once:
  the time until it runs there is the failover (the agent reconnects, the survivor takes
  the leader lease after ``REPLICA_TIMEOUT``, here ``--replica-timeout``, and places the
  start). The dead replica is then started again. Against a start requested on the
  replica not holding the agent while both live.

Ratios are B over A, measured in the same run. Usage:
``python bench/multipod.py [--starts 40] [--stream-mib 64] [--repeat 3] [--failovers 4]``
(PostgreSQL on 127.0.0.1:5432 with trust auth, Redis on 127.0.0.1:6379).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx
import redis.asyncio as aioredis
from _common import base_env, free_port, quantiles, stop_process, wait_ready
from vnc_relay import MB, MIB, SCRIPT, Opener, round_trips, throughput, ws_opener

from streamspace_sdk.testing import TcpBalancer

ADMIN_PASSWORD = "bench-admin-password"
AGENT_ID = "bench-multipod-agent"
FAILOVER_AGENT_ID = "bench-failover-agent"
PG = "postgresql://postgres@127.0.0.1:5432"
REDIS_URL = "redis://127.0.0.1:6379/0"
TEMPLATE = {"name": "bench", "display_name": "Bench", "platform": "memory"}


async def start_to_running(http: httpx.AsyncClient) -> float:
    """Seconds from a session start on ``http``'s replica to its ``running`` event there."""
    t0 = time.perf_counter()
    created = await http.post("/api/v1/sessions", json={"template": TEMPLATE["name"]})
    created.raise_for_status()
    sid = created.json()["id"]
    async with http.stream("GET", f"/api/v1/sessions/{sid}/events") as events:
        async for line in events.aiter_lines():
            if line.startswith("data:"):
                state = json.loads(line[5:])["state"]
                if state == "running":
                    elapsed = time.perf_counter() - t0
                    break
                if state == "failed":
                    raise SystemExit(f"session {sid} failed")
    (await http.delete(f"/api/v1/sessions/{sid}")).raise_for_status()
    return elapsed


async def agent_status(
    http: httpx.AsyncClient,
    agent_id: str,
    status: str,
    proc: asyncio.subprocess.Process | None = None,
) -> None:
    """Wait until the control plane shows ``agent_id`` with ``status`` (60 s at most)."""
    for _ in range(600):
        r = await http.get(f"/api/v1/agents/{agent_id}")
        if r.status_code == 200 and r.json()["status"] == status:
            return
        if proc is not None and proc.returncode is not None:
            raise SystemExit(f"agent {agent_id} exited with {proc.returncode}")
        await asyncio.sleep(0.1)  # another process: nothing to await but its state
    raise SystemExit(f"agent {agent_id} not {status} within 60 s")


async def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="ss-bench-multipod-"))
    database = f"streamspace_bench_{secrets.token_hex(4)}"
    prefix = f"bench-{secrets.token_hex(4)}:"
    admin = await asyncpg.connect(f"{PG}/postgres")
    await admin.execute(f'CREATE DATABASE "{database}"')
    log = (root / "processes.log").open("wb")
    procs: list[asyncio.subprocess.Process] = []

    async def spawn(*argv: str, env: dict[str, str]) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        procs.append(proc)
        return proc

    try:
        target_port = free_port()
        await spawn(sys.executable, SCRIPT, "--target", str(target_port), env=base_env())
        ports = {"a": free_port(), "b": free_port()}
        servers: dict[str, asyncio.subprocess.Process] = {}

        async def serve(name: str) -> None:
            port = ports[name]
            servers[name] = server = await spawn(
                sys.executable,
                "-m",
                "streamspace_controlplane.cli",
                "serve",
                env=base_env()
                | {
                    "DB_HOST": "127.0.0.1",
                    "DB_NAME": database,
                    "DB_USER": "postgres",
                    "AGENT_HUB_BACKEND": "redis",
                    "REDIS_URL": REDIS_URL,
                    "REDIS_KEY_PREFIX": prefix,
                    "POD_NAME": name,
                    "PORT": str(port),
                    "HOST": "127.0.0.1",
                    "INTERNAL_URL": f"http://127.0.0.1:{port}",
                    "STREAMSPACE_HOME": str(root / name),
                    "ADMIN_PASSWORD": ADMIN_PASSWORD,
                    "JWT_SECRET": "m" * 48,
                    "MAX_SESSIONS_PER_USER": "1000",
                    "REPLICA_TIMEOUT": f"{args.replica_timeout}s",
                },
            )
            await wait_ready(f"http://127.0.0.1:{port}/ready", server, f"control plane {name}")

        for name in ports:  # A first: it migrates and leads
            await serve(name)
        clients = {
            name: httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60)
            for name, port in ports.items()
        }
        for http in clients.values():
            login = await http.post(
                "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            login.raise_for_status()
            http.headers["Authorization"] = f"Bearer {login.json()['token']}"
        a, b = clients["a"], clients["b"]
        (await a.post("/api/v1/templates", json=TEMPLATE)).raise_for_status()

        async def start_agent(agent_id: str, url: str) -> asyncio.subprocess.Process:
            token = await a.post(f"/api/v1/agents/{agent_id}/tokens")
            token.raise_for_status()
            agent = await spawn(
                sys.executable,
                SCRIPT,
                "--agent",
                str(target_port),
                "--agent-id",
                agent_id,
                env=base_env() | {"CONTROL_PLANE_URL": url, "AGENT_TOKEN": token.json()["token"]},
            )
            await agent_status(b, agent_id, "online", agent)
            return agent

        agent = await start_agent(AGENT_ID, f"ws://127.0.0.1:{ports['a']}")

        starts: dict[str, list[float]] = {"a": [], "b": []}
        for name in ("a", "b"):
            await start_to_running(clients[name])  # warm-up, not counted
        for _ in range(args.starts):
            for name in ("a", "b"):
                starts[name].append(await start_to_running(clients[name]))

        created = await a.post("/api/v1/sessions", json={"template": TEMPLATE["name"]})
        created.raise_for_status()
        sid = created.json()["id"]
        for _ in range(600):
            if (await a.get(f"/api/v1/sessions/{sid}")).json()["state"] == "running":
                break
            await asyncio.sleep(0.05)

        def viewer_on(name: str) -> Opener:
            async def url() -> str:
                r = await a.post(f"/api/v1/sessions/{sid}/vnc-token")
                r.raise_for_status()
                return f"ws://127.0.0.1:{ports[name]}{r.json()['url']}"

            return ws_opener(url)

        paths = {"same replica (A)": viewer_on("a"), "other replica (B)": viewer_on("b")}
        size = args.stream_mib * MIB
        speeds: dict[str, list[float]] = {name: [] for name in paths}
        for open_ in paths.values():
            await throughput(open_, MIB)  # warm-up
        for _ in range(args.repeat):
            for name, open_ in paths.items():
                speeds[name].append(size / await throughput(open_, size) / MB)
        rtts = {
            name: quantiles(await round_trips(open_, args.echoes, 64))
            for name, open_ in paths.items()
        }

        await stop_process(agent)  # it says goodbye: the scheduler places nothing on it
        await agent_status(b, AGENT_ID, "offline")
        failovers: list[float] = []
        async with TcpBalancer([("127.0.0.1", ports["a"]), ("127.0.0.1", ports["b"])]) as lb:
            await start_agent(FAILOVER_AGENT_ID, f"ws://127.0.0.1:{lb.port}")
            crossing = [await start_to_running(b) for _ in range(args.starts // 4 or 1)]
            holder, survivor = "a", "b"
            for _ in range(args.failovers):
                servers[holder].kill()
                await servers[holder].wait()
                failovers.append(await start_to_running(clients[survivor]))
                await serve(holder)
                holder, survivor = survivor, holder
        for http in clients.values():
            await http.aclose()

        print(f"session start over REST, to `running` on the same replica's events, x{args.starts}")
        print(f"{'requested on':<24}{'p50 ms':>10}{'p99 ms':>10}")
        p50s = {}
        for name, label in (("a", "A (holds the agent)"), ("b", "B (crosses to A)")):
            p50, p99 = quantiles(starts[name])
            p50s[name] = p50
            print(f"{label:<24}{p50 * 1000:>10.1f}{p99 * 1000:>10.1f}")
        print(
            f"added by crossing replicas: {(p50s['b'] - p50s['a']) * 1000:+.1f} ms at p50 "
            f"({p50s['b'] / p50s['a']:.2f}x)"
        )
        print(f"VNC through /vnc/{{id}}: {args.stream_mib} MiB x {args.repeat}, 64-byte echoes")
        heads = f"{'MB/s best':>11}{'MB/s med':>10}{'RTT p50 us':>12}{'RTT p99 us':>12}"
        print(f"{'viewer on':<24}{heads}")
        for name in paths:
            p50, p99 = rtts[name]
            print(
                f"{name:<24}{max(speeds[name]):>11.0f}{statistics.median(speeds[name]):>10.0f}"
                f"{p50 * 1e6:>12.0f}{p99 * 1e6:>12.0f}"
            )
        same, other = (statistics.median(speeds[n]) for n in paths)
        (rtt_same, _), (rtt_other, _) = rtts.values()
        print(
            f"other / same replica: throughput {other / same:.2f}x (median), "
            f"RTT p50 {rtt_other / rtt_same:.2f}x"
        )
        base = statistics.median(crossing)
        print(
            f"failover: SIGKILL of the replica holding the agent, a start requested at once "
            f"on the other, x{args.failovers} (REPLICA_TIMEOUT={args.replica_timeout:g}s)"
        )
        print(
            f"  to running   min {min(failovers):.2f} s  median "
            f"{statistics.median(failovers):.2f} s  max {max(failovers):.2f} s"
        )
        # The dead leader's lease lasts REPLICA_TIMEOUT from its last renewal; the survivor
        # tries every third of it, then places the start (a second at most).
        bound = args.replica_timeout * 4 / 3 + 1
        print(
            f"  against a start crossing replicas while both live: median {base * 1000:.1f} ms; "
            f"bound 4/3 REPLICA_TIMEOUT + 1 s = {bound:g} s"
        )
    finally:
        for proc in reversed(procs):
            await stop_process(proc)
        log.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=40)
    parser.add_argument("--stream-mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--echoes", type=int, default=1000)
    parser.add_argument("--failovers", type=int, default=4)
    parser.add_argument("--replica-timeout", type=float, default=3.0, help="seconds")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
