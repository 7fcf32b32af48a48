"""What the VNC path costs: raw TCP, websockify, and ours (control plane + agent) per transport.

Starts, each as its own process:

- a TCP target on 127.0.0.1 standing in for a VNC server. A client's first byte picks what
  it does: ``E`` echoes every byte back (round trips); ``B`` followed by an 8-byte length
  sends that many bytes as fast as the socket takes them, then closes (throughput);
- ``websockify`` (the PyPI package) in front of that target;
- ``streamspace-controlplane serve`` (SQLite, memory hub) with a ``bench`` template;
- one real :class:`streamspace_sdk.Agent` per transport (this script with ``--agent``, on
  the event loop ``Agent.run`` uses), whose platform is a
  :class:`~streamspace_sdk.testing.MemoryPlatform` pointing every session's VNC endpoint at
  the target: one speaking ``ws-mux`` to the control plane, one ``ws-dedicated``.

A session is started through REST and, once ``running``, each viewer connection gets its own
VNC token. Then, in this process, with the same payloads for every path:

- throughput: a ``--stream-mib`` stream from the target, best and median of ``--repeat``;
- round trip: ``--echoes`` echoes of ``--echo-bytes`` bytes, one at a time; p50 and p99;

over (1) raw TCP to the target, (2) websockify's WebSocket, (3) ``/vnc/{id}?token=...`` of a
session on each agent. WebSocket clients use the ``websockets`` library, subprotocol
``binary``, no compression. Ratios are to websockify. The CPU time the relaying processes
spent during the throughput runs is printed per MB (websockify with its per-client child;
ours as control plane + agent): on a machine with few cores the client, the target and
every relay share them, so CPU per MB is the figure that does not depend on the core count.
Last, for each transport, one viewer reads slowly (``--slow-kib-s``) while another reads a
``--memory-mib`` stream at full speed through our path, and the control plane's resident
memory is sampled throughout; its peak is printed (VmHWM included).

Usage: ``pip install websockify`` (the baseline), then
``python bench/vnc_relay.py [--stream-mib 64] [--echoes 2000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from _common import base_env, free_port, proc_cpu_s, proc_status_mib, quantiles, stop_process
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

ADMIN_PASSWORD = "bench-admin-password"
AGENT_ID = "bench-vnc-agent"
TRANSPORTS = ("ws-mux", "ws-dedicated")
PLATFORM = "memory"
TEMPLATE = {"name": "bench", "display_name": "Bench", "platform": PLATFORM}
MB = 1_000_000
MIB = 1024 * 1024
BLAST_CHUNK = MIB
SCRIPT = str(Path(__file__).resolve())


def reset_peak_rss(pid: int) -> None:
    """Reset the process's VmHWM (Linux ``clear_refs`` 5), so it covers what follows only."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


# -- the target (its own process) ----------------------------------------------------------


async def _target_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        mode = await reader.readexactly(1)
        if mode == b"E":
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        elif mode == b"B":
            (remaining,) = struct.unpack(">Q", await reader.readexactly(8))
            chunk = os.urandom(BLAST_CHUNK)
            while remaining > 0:
                piece = chunk if remaining >= len(chunk) else chunk[:remaining]
                writer.write(piece)
                await writer.drain()
                remaining -= len(piece)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def serve_target(port: int) -> None:
    server = await asyncio.start_server(_target_client, "127.0.0.1", port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


# -- the agent (its own process) -----------------------------------------------------------


async def serve_agent(target_port: int, agent_id: str, transport: str) -> None:
    from pydantic import SecretStr

    from streamspace_sdk import Agent, AgentSettings
    from streamspace_sdk.hooks import Hooks, make_plugin_manager
    from streamspace_sdk.platform import VncEndpoint
    from streamspace_sdk.settings import PluginSettings
    from streamspace_sdk.testing import MemoryPlatform

    class TargetPlatform(MemoryPlatform):
        """Sessions are records; every session's VNC server is the bench target."""

        async def _vnc_endpoint(self, session_id: str) -> VncEndpoint:
            return VncEndpoint(host="127.0.0.1", port=target_port)

    agent = Agent(
        AgentSettings(
            agent_id=agent_id,
            control_plane_url=os.environ["CONTROL_PLANE_URL"],
            agent_token=SecretStr(os.environ["AGENT_TOKEN"]),
            platform=PLATFORM,
            health_port=0,
            health_host="127.0.0.1",
            vnc_transport=transport,
        ),
        TargetPlatform(agent_id=agent_id),
        hooks=Hooks(
            make_plugin_manager(
                settings=PluginSettings(streamspace_load_plugins=""), load_entrypoints=False
            )
        ),
    )
    task = asyncio.create_task(agent.serve())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await asyncio.wait([task, asyncio.create_task(stop.wait())], return_when="FIRST_COMPLETED")
    await agent.stop()
    await task


# -- clients (this process) ----------------------------------------------------------------


class Conn:
    """One connection to the target, over TCP or a WebSocket: send, and receive some bytes."""

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[None]],
        recv: Callable[[], Awaitable[bytes]],
    ) -> None:
        self.send = send
        self.recv = recv


Opener = Callable[[], contextlib.AbstractAsyncContextManager[Conn]]


def tcp_opener(port: int) -> Opener:
    @contextlib.asynccontextmanager
    async def open_() -> AsyncIterator[Conn]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4 * BLAST_CHUNK)

        async def send(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        try:
            yield Conn(send, lambda: reader.read(BLAST_CHUNK))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return open_


def _ws_conn(ws: ClientConnection) -> Conn:
    async def recv() -> bytes:
        try:
            message = await ws.recv()
        except Exception:  # closed: the stream ended
            return b""
        if not isinstance(message, bytes):
            raise SystemExit("VNC data came in a text frame")
        return message

    async def send(data: bytes) -> None:
        await ws.send(data)

    return Conn(send, recv)


def ws_opener(url: Callable[[], Awaitable[str]]) -> Opener:
    @contextlib.asynccontextmanager
    async def open_() -> AsyncIterator[Conn]:
        async with connect(
            await url(),
            subprotocols=[Subprotocol("binary")],
            compression=None,
            max_size=None,
            open_timeout=30,
        ) as ws:
            if ws.subprotocol != "binary":
                raise SystemExit(f"subprotocol {ws.subprotocol!r}, not binary")
            yield _ws_conn(ws)

    return open_


async def read_exactly(conn: Conn, size: int) -> None:
    got = 0
    while got < size:
        chunk = await conn.recv()
        if not chunk:
            raise SystemExit(f"the stream closed after {got} of {size} bytes")
        got += len(chunk)


async def throughput(open_: Opener, size: int) -> float:
    """Seconds from asking for ``size`` bytes to having them all."""
    async with open_() as conn:
        t0 = time.perf_counter()
        await conn.send(b"B" + struct.pack(">Q", size))
        await read_exactly(conn, size)
        return time.perf_counter() - t0


async def round_trips(open_: Opener, count: int, size: int, warmup: int = 50) -> list[float]:
    payload = os.urandom(size)
    times: list[float] = []
    async with open_() as conn:
        await conn.send(b"E")
        for i in range(warmup + count):
            t0 = time.perf_counter()
            await conn.send(payload)
            await read_exactly(conn, size)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


async def memory_phase(
    open_: Opener, pid: int, fast_bytes: int, slow_bytes_s: int
) -> dict[str, float]:
    """A slow and a full-speed viewer at once; sample the control plane's RSS meanwhile."""
    samples: list[float] = []
    done = asyncio.Event()
    slow_got = 0

    async def sampler() -> None:
        while not done.is_set():
            samples.append(proc_status_mib(pid, "VmRSS"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.02)

    async def slow() -> None:
        nonlocal slow_got
        async with open_() as conn:
            await conn.send(b"B" + struct.pack(">Q", 1 << 50))  # more than it will ever read
            while not done.is_set():
                got = len(await conn.recv())
                slow_got += got
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), got / slow_bytes_s)

    async def fast() -> float:
        await asyncio.sleep(1.0)  # let the slow viewer fill every buffer it can first
        try:
            return await throughput(open_, fast_bytes)
        finally:
            await asyncio.sleep(1.0)
            done.set()

    before = proc_status_mib(pid, "VmRSS")
    reset_peak_rss(pid)
    tasks = [asyncio.create_task(sampler()), asyncio.create_task(slow())]
    fast_s = await fast()
    await asyncio.gather(*tasks)
    return {
        "before": before,
        "peak": max(samples),
        "hwm": proc_status_mib(pid, "VmHWM"),
        "fast_mb_s": fast_bytes / fast_s / MB,
        "slow_bytes": slow_got,
    }


# -- orchestration -------------------------------------------------------------------------


async def wait_until(check: Callable[[], Awaitable[bool]], proc: Any, what: str) -> None:
    for _ in range(600):
        if proc.returncode is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError, httpx.HTTPError):
            if await check():
                return
        await asyncio.sleep(0.1)  # another process: nothing to await but its port
    raise SystemExit(f"{what} was not ready in 60 s")


async def port_open(port: int) -> bool:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    return True


async def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="ss-bench-vnc-"))
    target_port, wsfy_port, cp_port = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{cp_port}"
    log = (root / "processes.log").open("wb")
    procs: list[asyncio.subprocess.Process] = []
    me = SCRIPT

    async def spawn(*argv: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env or base_env(), stdout=log, stderr=subprocess.STDOUT
        )
        procs.append(proc)
        return proc

    try:
        target = await spawn(sys.executable, me, "--target", str(target_port))
        wsfy = await spawn(
            sys.executable, "-m", "websockify", f"127.0.0.1:{wsfy_port}", f"127.0.0.1:{target_port}"
        )
        server = await spawn(
            sys.executable,
            "-m",
            "streamspace_controlplane.cli",
            "serve",
            env=base_env()
            | {
                "STREAMSPACE_HOME": str(root / "cp"),
                "PORT": str(cp_port),
                "HOST": "127.0.0.1",
                "ADMIN_PASSWORD": ADMIN_PASSWORD,
                "JWT_SECRET": "b" * 48,
            },
        )
        await wait_until(lambda: port_open(target_port), target, "the target")
        await wait_until(lambda: port_open(wsfy_port), wsfy, "websockify")
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:

            async def ready() -> bool:
                return (await http.get("/ready")).status_code == 200

            await wait_until(ready, server, "the control plane")
            login = await http.post(
                "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            login.raise_for_status()
            http.headers["Authorization"] = f"Bearer {login.json()['token']}"
            (await http.post("/api/v1/templates", json=TEMPLATE)).raise_for_status()
            ours: dict[str, Opener] = {}
            relays: dict[str, list[asyncio.subprocess.Process]] = {"websockify": [wsfy]}
            # One agent per transport, started in turn: each new session goes to the least
            # loaded agent, so the n-th session lands on the n-th agent.
            for transport in TRANSPORTS:
                agent_id = f"{AGENT_ID}-{transport}"
                token = await http.post(f"/api/v1/agents/{agent_id}/tokens")
                token.raise_for_status()
                agent = await spawn(
                    sys.executable,
                    me,
                    "--agent",
                    str(target_port),
                    "--agent-id",
                    agent_id,
                    "--transport",
                    transport,
                    env=base_env()
                    | {
                        "CONTROL_PLANE_URL": f"ws://127.0.0.1:{cp_port}",
                        "AGENT_TOKEN": token.json()["token"],
                    },
                )

                async def online(agent_id: str = agent_id) -> bool:
                    r = await http.get(f"/api/v1/agents/{agent_id}")
                    return r.status_code == 200 and r.json()["status"] == "online"

                await wait_until(online, agent, f"the {transport} agent")
                created = await http.post("/api/v1/sessions", json={"template": TEMPLATE["name"]})
                created.raise_for_status()
                sid = str(created.json()["id"])

                async def running(sid: str = sid) -> bool:
                    r = await http.get(f"/api/v1/sessions/{sid}")
                    if r.json()["state"] == "failed":
                        raise SystemExit(f"session {sid} failed: {r.text}")
                    return r.json()["state"] == "running"

                await wait_until(running, agent, f"the {transport} session")
                placed = (await http.get(f"/api/v1/sessions/{sid}")).json()["agent_id"]
                if placed != agent_id:
                    raise SystemExit(f"session {sid} went to {placed}, not {agent_id}")

                async def ours_url(sid: str = sid) -> str:
                    r = await http.post(f"/api/v1/sessions/{sid}/vnc-token")
                    r.raise_for_status()
                    return f"ws://127.0.0.1:{cp_port}{r.json()['url']}"

                ours[f"ours ({transport})"] = ws_opener(ours_url)
                relays[f"ours ({transport})"] = [server, agent]

            async def wsfy_url() -> str:
                return f"ws://127.0.0.1:{wsfy_port}/"

            paths: dict[str, Opener] = {
                "raw TCP": tcp_opener(target_port),
                "websockify": ws_opener(wsfy_url),
                **ours,
            }
            size = args.stream_mib * MIB
            results: dict[str, dict[str, float]] = {}
            speeds: dict[str, list[float]] = {name: [] for name in paths}
            # The relaying processes of each path, whose CPU time per MB is reported.
            cpu_s = {name: [0.0] * len(procs_) for name, procs_ in relays.items()}
            for open_ in paths.values():
                await throughput(open_, MIB)  # warm-up, not counted
            for _ in range(args.repeat):  # interleaved, so drift hits every path alike
                for name, open_ in paths.items():
                    before = [proc_cpu_s(p.pid) for p in relays.get(name, [])]
                    speeds[name].append(size / await throughput(open_, size) / MB)
                    for i, p in enumerate(relays.get(name, [])):
                        cpu_s[name][i] += proc_cpu_s(p.pid) - before[i]
            for name, open_ in paths.items():
                p50, p99 = quantiles(await round_trips(open_, args.echoes, args.echo_bytes))
                results[name] = {
                    "best": max(speeds[name]),
                    "median": statistics.median(speeds[name]),
                    "p50": p50 * 1e6,
                    "p99": p99 * 1e6,
                }
            memory = {
                name: await memory_phase(
                    open_, server.pid, args.memory_mib * MIB, args.slow_kib_s * 1024
                )
                for name, open_ in ours.items()
            }

        print(
            f"payloads: throughput {args.stream_mib} MiB stream x {args.repeat} (interleaved), "
            f"round trip {args.echoes} x {args.echo_bytes}-byte echoes; MB = 10^6 bytes"
        )
        print(
            f"{'path':<20}{'MB/s best':>11}{'MB/s med':>10}{'RTT p50 us':>12}{'RTT p99 us':>12}"
            f"{'relay CPU ms/MB':>17}"  # control plane + agent for ours
        )
        for name, r in results.items():
            per_mb = [c * 1000 / (args.repeat * size / MB) for c in cpu_s.get(name, [])]
            cpu = f"{sum(per_mb):>17.2f}" if per_mb else ""
            if len(per_mb) > 1:
                cpu += " (" + " + ".join(f"{c:.2f}" for c in per_mb) + ")"
            print(
                f"{name:<20}{r['best']:>11.0f}{r['median']:>10.0f}{r['p50']:>12.0f}{r['p99']:>12.0f}"
                + cpu
            )
        ref = results["websockify"]
        for name in ("raw TCP", *ours):
            r = results[name]
            print(
                f"{name} / websockify: throughput {r['median'] / ref['median']:.2f}x (median), "
                f"RTT p50 {r['p50'] / ref['p50']:.2f}x, p99 {r['p99'] / ref['p99']:.2f}x"
            )
        for name, m in memory.items():
            print(
                f"control plane RSS, {name}, slow viewer ({args.slow_kib_s} KiB/s) + full-speed "
                f"viewer ({args.memory_mib} MiB at {m['fast_mb_s']:.0f} MB/s): "
                f"{m['before']:.1f} MiB before, peak {m['peak']:.1f} MiB sampled, "
                f"VmHWM {m['hwm']:.1f} MiB (reset at the phase start); "
                f"slow viewer read {m['slow_bytes'] / MIB:.1f} MiB"
            )
    finally:
        for proc in reversed(procs):
            await stop_process(proc)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream-mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--echoes", type=int, default=2000)
    parser.add_argument("--echo-bytes", type=int, default=64)
    parser.add_argument("--memory-mib", type=int, default=512)
    parser.add_argument("--slow-kib-s", type=int, default=64)
    parser.add_argument("--target", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--agent", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--agent-id", default=AGENT_ID, help=argparse.SUPPRESS)
    parser.add_argument("--transport", default="ws-mux", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.target is not None:
        asyncio.run(serve_target(args.target))
    elif args.agent is not None:
        from streamspace_sdk.agent import event_loop_factory  # the loop `Agent.run` uses

        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(serve_agent(args.agent, args.agent_id, args.transport))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
