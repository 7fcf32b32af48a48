"""What the control plane and the agent add to a session start, over the platform's own time.

Starts ``streamspace-controlplane serve`` (SQLite, memory hub) and ``streamspace-agent run``
(``PLATFORM=process``) as their own processes, with a ``desktop`` template on the
``process`` platform (TigerVNC ``Xvnc`` and ``xterm``), then measures, one session at a time:

- platform start alone: ``ProcessPlatform.start()`` called in this process with the spec
  the control plane would send for that template, until it returns ``running`` (the VNC
  port answers with an RFB banner). This is the baseline, taken in the same run;
- REST to running: ``POST /api/v1/sessions`` until the session's event stream
  (``/api/v1/sessions/{id}/events``) says ``running``: scheduling, the command to the
  agent over its WebSocket, the same platform start there, the result, the state change
  and its event;

alternating the two, each session stopped (untimed) before the next starts, after a
warm-up round that is not counted. Prints p50 and p99 of both, the overhead (the
difference of the medians) and the ratio of REST to running over the platform alone.

Usage: ``python bench/session_start.py [--sessions 20] [--warmup 1]``. Needs ``Xvnc`` and
``xterm`` (``apt-get install tigervnc-standalone-server xterm``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import base_env, free_port, quantiles, stop_process, wait_ready

from streamspace_sdk.platform import SessionSpec
from streamspace_sdk.platforms.process import ProcessPlatform

ADMIN_PASSWORD = "bench-admin-password"
AGENT_ID = "bench-agent"
TEMPLATE = {"name": "desktop", "display_name": "Desktop", "platform": "process"}


def kill_leftover_sessions(state_dir: Path) -> None:
    """SIGKILL the process group of any session still recorded under ``state_dir``."""
    for path in (state_dir / "sessions").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            os.killpg(int(json.loads(path.read_text())["pgid"]), signal.SIGKILL)


async def running_after_post(http: httpx.AsyncClient) -> tuple[str, float]:
    """POST a session; return its id and the seconds until its event stream says running."""
    t0 = time.perf_counter()
    r = await http.post("/api/v1/sessions", json={"template": "desktop"})
    r.raise_for_status()
    sid = str(r.json()["id"])
    await wait_event(http, sid, "running")
    return sid, time.perf_counter() - t0


async def wait_event(http: httpx.AsyncClient, sid: str, state: str) -> None:
    """Read the session's event stream (stored events first) until ``state``."""
    async with http.stream("GET", f"/api/v1/sessions/{sid}/events") as events:
        async for line in events.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event["state"] == state:
                return
            if event["state"] == "failed":
                raise SystemExit(f"session {sid} failed: {event['detail']}")
    raise SystemExit(f"the event stream of {sid} ended before {state}")


async def stop_session(http: httpx.AsyncClient, sid: str) -> None:
    r = await http.patch(f"/api/v1/sessions/{sid}", json={"state": "stopped"})
    r.raise_for_status()
    await wait_event(http, sid, "stopped")


async def platform_start(platform: ProcessPlatform, i: int) -> float:
    """Start one session with the platform alone; return the seconds ``start()`` took."""
    spec = SessionSpec(
        session_id=f"s-direct{i:011d}",
        generation=1,
        user="admin",
        template=TEMPLATE["name"],
    )  # what the control plane builds from the template (no command: Xvnc and xterm)
    t0 = time.perf_counter()
    status = await platform.start(spec)
    elapsed = time.perf_counter() - t0
    if status.state != "running":
        raise SystemExit(f"the platform started {spec.session_id} as {status.state}")
    await platform.stop(spec.session_id, spec.generation)
    return elapsed


async def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="ss-bench-start-"))
    port, health_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    cp_env = base_env() | {
        "STREAMSPACE_HOME": str(root / "cp"),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        "JWT_SECRET": "b" * 48,
        "MAX_SESSIONS_PER_USER": "1000",
    }
    cp_log = (root / "controlplane.log").open("wb")
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamspace_controlplane.cli",
        "serve",
        env=cp_env,
        stdout=cp_log,
        stderr=subprocess.STDOUT,
    )
    agent: asyncio.subprocess.Process | None = None
    agent_state = root / "agent-state"
    direct = ProcessPlatform(
        ProcessPlatform.Settings(process_state_dir=root / "direct-state", max_sessions=4),
        agent_id="bench-direct",
    )
    try:
        await direct.check()
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            await wait_ready(f"{base}/ready", server, "the control plane")
            login = await http.post(
                "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            http.headers["Authorization"] = f"Bearer {login.json()['token']}"
            (await http.post("/api/v1/templates", json=TEMPLATE)).raise_for_status()
            token = await http.post(f"/api/v1/agents/{AGENT_ID}/tokens")
            token.raise_for_status()
            agent_env = base_env() | {
                "AGENT_ID": AGENT_ID,
                "AGENT_TOKEN": token.json()["token"],
                "CONTROL_PLANE_URL": f"ws://127.0.0.1:{port}",
                "PLATFORM": "process",
                "PROCESS_STATE_DIR": str(agent_state),
                "HEALTH_HOST": "127.0.0.1",
                "HEALTH_PORT": str(health_port),
            }
            agent = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "streamspace_sdk.cli",
                "run",
                env=agent_env,
                stdout=cp_log,
                stderr=subprocess.STDOUT,
            )
            await wait_ready(f"http://127.0.0.1:{health_port}/ready", agent, "the agent")

            alone: list[float] = []
            via_rest: list[float] = []
            for i in range(args.warmup + args.sessions):
                d_alone = await platform_start(direct, i)
                sid, d_rest = await running_after_post(http)
                await stop_session(http, sid)
                if i >= args.warmup:
                    alone.append(d_alone)
                    via_rest.append(d_rest)

        a50, a99 = quantiles(alone)
        r50, r99 = quantiles(via_rest)
        ms = 1000
        print(f"sessions measured                 {args.sessions} (after {args.warmup} warm-up)")
        print(f"platform start alone    p50 {a50 * ms:7.1f} ms  p99 {a99 * ms:7.1f} ms")
        print(f"REST -> running         p50 {r50 * ms:7.1f} ms  p99 {r99 * ms:7.1f} ms")
        print(
            f"overhead                p50 {(r50 - a50) * ms:7.1f} ms"
            "  (median REST -> running minus median platform start)"
        )
        print(f"REST -> running / platform start   {r50 / a50:.2f}x p50  {r99 / a99:.2f}x p99")
    finally:
        if agent is not None:
            await stop_process(agent)
        await stop_process(server)
        cp_log.close()
        kill_leftover_sessions(agent_state)
        kill_leftover_sessions(root / "direct-state")
        await direct.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
