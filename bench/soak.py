"""Whether a control plane's open files, tasks and memory return to baseline under agent restarts.

Starts ``streamspace-controlplane serve`` as its own process (SQLite; ``--postgres``: a
PostgreSQL database made for the run) and one real agent, ``streamspace-agent run`` with
``PLATFORM=process`` (the SDK's ``memory`` platform has no entry point, so the agent
cannot select it). Each session is a real TigerVNC ``Xvnc`` (320x240, no X client, to keep
100 of them light), started by the template's ``command``. Then:

- ``--sessions`` sessions are created over REST and run;
- every ``--restart-every`` for ``--duration`` the agent is stopped, SIGTERM and SIGKILL in
  turn (``--signal``), and started again; it adopts the running sessions. Each cycle also
  replaces ``--churn`` sessions (delete one, create one) and opens ``--viewers`` VNC
  viewers through ``/vnc/{id}`` (each reads the server's RFB banner and closes), so
  commands, events and tunnels come and go as well as agent sockets;
- the control plane is sampled: open file descriptors (``/proc/<pid>/fd``), threads and
  resident memory (``/proc/<pid>/status``), and the asyncio tasks of its event loop
  (``streamspace_event_loop_tasks`` on its ``/metrics``).

The baseline is sampled after the sessions run and one round of churn and viewers; then
before every restart, and at the end after one more round. Printed: a row per restart (the
signal; seconds until the new process was registered reporting every session it adopted,
and every session ran; the figures sampled before it) and, for each figure, the end
against the baseline and whether it came back: files, tasks and threads within 2, memory
within 5 MiB or 5 %.

Usage: ``python bench/soak.py [--sessions 100] [--restart-every 60s] [--duration 10m]``;
``--duration 90s --restart-every 15s`` is a quick run. Needs ``Xvnc``
(``apt-get install tigervnc-standalone-server``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from _common import (
    ControlPlane,
    base_env,
    create_database,
    create_session,
    drop_database,
    free_port,
    in_batches,
    proc_fds,
    proc_status_mib,
    proc_threads,
    stop_process,
    wait_ready,
    wait_running,
)
from pydantic import TypeAdapter
from session_start import kill_leftover_sessions
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from streamspace_sdk.settings import Duration

AGENT_ID = "soak-agent"
TEMPLATE = {
    "name": "soak",
    "display_name": "Soak",
    "platform": "process",
    "command": [
        "Xvnc", ":{display}", "-rfbport", "{vnc_port}", "-interface", "127.0.0.1",
        "-SecurityTypes", "None", "-geometry", "320x240", "-depth", "16", "-nolisten", "tcp",
    ],
}  # fmt: skip
BODY = {"template": "soak"}
SETTLE_S = 5.0
"""Pause before the baseline and the end sample, so requests and commands have finished."""
RECOVER_S = 120.0
"""Bound on a restart's recovery: the agent registered and every session running."""
SLACK = {"files": 2.0, "tasks": 2.0, "threads": 2.0}
"""How far above its baseline a count may end and still count as back."""
RSS_SLACK_MIB, RSS_SLACK_SHARE = 5.0, 0.05


# -- the run (this process) ----------------------------------------------------------------


@dataclass
class Sample:
    files: int
    threads: int
    tasks: int
    rss_mib: float

    def row(self) -> str:
        return f"{self.files:>7}{self.threads:>9}{self.tasks:>7}{self.rss_mib:>10.1f}"


class Soak:
    """The control plane, the agent process and the sessions of one run."""

    def __init__(self, root: Path, args: argparse.Namespace, database: str | None) -> None:
        self.root = root
        self.args = args
        self.log = (root / "processes.log").open("wb")
        self.cp = ControlPlane(
            root / "cp",
            self.log,
            database=database,
            env={"MAX_SESSIONS_PER_USER": str(args.sessions + 10)},
        )
        self.state_dir = root / "agent-state"
        self.health_port = free_port()
        self.agent: asyncio.subprocess.Process | None = None
        self.agent_env: dict[str, str] = {}
        self.http: httpx.AsyncClient | None = None
        self.ids: list[str] = []
        self.rng = random.Random(args.seed)
        self.viewers_ok = 0
        self.viewers_failed = 0

    async def start(self) -> httpx.AsyncClient:
        await self.cp.start()
        self.http = http = await self.cp.admin()
        (await http.post("/api/v1/templates", json=TEMPLATE)).raise_for_status()
        token = await http.post(f"/api/v1/agents/{AGENT_ID}/tokens")
        token.raise_for_status()
        self.agent_env = base_env() | {
            "AGENT_ID": AGENT_ID,
            "AGENT_TOKEN": token.json()["token"],
            "CONTROL_PLANE_URL": self.cp.ws_url,
            "PLATFORM": "process",
            "PROCESS_STATE_DIR": str(self.state_dir),
            "MAX_SESSIONS": str(self.args.sessions + self.args.churn + 10),
            "HEALTH_HOST": "127.0.0.1",
            "HEALTH_PORT": str(self.health_port),
        }
        await self.start_agent()
        return http

    async def start_agent(self) -> None:
        self.agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamspace_sdk.cli", "run",
            env=self.agent_env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        await wait_ready(
            f"http://127.0.0.1:{self.health_port}/ready", self.agent, "the agent", interval_s=0.02
        )

    async def restart_agent(self, sig: signal.Signals) -> float:
        """Stop the agent with ``sig``, start it again; return the seconds until it is
        registered and every session runs."""
        assert self.agent is not None
        assert self.http is not None
        t0 = time.perf_counter()
        self.agent.send_signal(sig)
        await self.agent.wait()
        await self.start_agent()
        reported = await self.wait_reported(len(self.ids))
        running = await wait_running(self.http, len(self.ids), RECOVER_S)
        if reported < len(self.ids) or running < len(self.ids):
            raise SystemExit(
                f"after the restart the agent reports {reported} and the control plane runs"
                f" {running} of {len(self.ids)} sessions"
            )
        return time.perf_counter() - t0

    async def wait_reported(self, count: int) -> int:
        """Wait until the control plane has the agent online reporting ``count`` sessions
        (adopted by the new process); return how many it reports."""
        assert self.http is not None
        deadline = time.monotonic() + RECOVER_S
        while True:
            r = await self.http.get(f"/api/v1/agents/{AGENT_ID}")
            r.raise_for_status()
            agent = r.json()
            reported = int(agent["capacity"]["current_sessions"])
            done = agent["status"] == "online" and reported == count
            if done or time.monotonic() > deadline:
                return reported
            await asyncio.sleep(0.02)  # a record in another process: poll it

    async def cycle_work(self) -> None:
        """Replace ``--churn`` sessions and open ``--viewers`` viewers."""
        http = self.http
        assert http is not None
        for _ in range(self.args.churn):
            gone = self.ids.pop(self.rng.randrange(len(self.ids)))
            (await http.delete(f"/api/v1/sessions/{gone}")).raise_for_status()
            self.ids.append((await create_session(http, BODY))[0])
        running = await wait_running(http, len(self.ids), RECOVER_S)
        if running < len(self.ids):
            raise SystemExit(f"{running} of {len(self.ids)} sessions run after the churn")
        for sid in self.rng.sample(self.ids, min(self.args.viewers, len(self.ids))):
            if await self.view(sid):
                self.viewers_ok += 1
            else:
                self.viewers_failed += 1

    async def view(self, sid: str) -> bool:
        """Open a viewer on ``sid``; return whether it got the RFB banner."""
        assert self.http is not None
        r = await self.http.post(f"/api/v1/sessions/{sid}/vnc-token")
        r.raise_for_status()
        with contextlib.suppress(Exception):  # any failure counts as a failed viewer
            async with (
                asyncio.timeout(10),
                connect(
                    f"{self.cp.ws_url}{r.json()['url']}",
                    subprotocols=[Subprotocol("binary")],
                    compression=None,
                ) as ws,
            ):
                banner = await ws.recv()
                return isinstance(banner, bytes) and banner.startswith(b"RFB ")
        return False

    async def sample(self) -> Sample:
        assert self.http is not None
        pid = self.cp.pid
        tasks = -1
        metrics = await self.http.get("/metrics")
        for line in metrics.text.splitlines():
            if line.startswith("streamspace_event_loop_tasks "):
                tasks = int(float(line.split()[1]))
        return Sample(proc_fds(pid), proc_threads(pid), tasks, proc_status_mib(pid))

    async def close(self) -> None:
        """Delete the sessions through the agent, then stop everything; kill what is left."""
        if self.http is not None:
            with contextlib.suppress(httpx.HTTPError):
                await in_batches((self.http.delete(f"/api/v1/sessions/{s}") for s in self.ids), 10)
                for _ in range(300):  # 60 s for the agent's stops, in another process
                    if not any(self.state_dir.glob("sessions/*.json")):
                        break
                    await asyncio.sleep(0.2)
            await self.http.aclose()
        if self.agent is not None:
            await stop_process(self.agent)
        await self.cp.stop()
        self.log.close()
        kill_leftover_sessions(self.state_dir)


def verdict(name: str, base: float, end: float, back: bool, unit: str = "") -> str:
    return (
        f"{name:<10}{base:>10g}{unit} -> {end:g}{unit} ({end - base:+g}{unit})"
        f"  {'back to baseline' if back else 'NOT back to baseline'}"
    )


async def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="ss-bench-soak-"))
    database = await create_database() if args.postgres else None
    soak = Soak(root, args, database)
    signals = {
        "term": [signal.SIGTERM],
        "kill": [signal.SIGKILL],
        "both": [signal.SIGTERM, signal.SIGKILL],
    }[args.signal]
    restarts = int(args.duration // args.restart_every)
    try:
        http = await soak.start()
        t0 = time.perf_counter()
        made = await in_batches((create_session(http, BODY) for _ in range(args.sessions)), 10)
        soak.ids = [sid for sid, _elapsed in made]
        running = await wait_running(http, len(soak.ids), 600)
        if running < args.sessions:
            raise SystemExit(f"only {running} of {args.sessions} sessions ran; see the log")
        print(
            f"{args.sessions} sessions (Xvnc) running on one process-platform agent in"
            f" {time.perf_counter() - t0:.1f} s; {restarts} restarts, one every"
            f" {args.restart_every:g} s; churn {args.churn}, viewers {args.viewers} per cycle"
        )
        await soak.cycle_work()
        await asyncio.sleep(SETTLE_S)
        base = await soak.sample()
        heads = f"{'files':>7}{'threads':>9}{'tasks':>7}{'RSS MiB':>10}"
        print(f"{'':>4}{'t s':>7}  {'signal':<8}{'recovered s':>12}  {heads}")
        print(f"{'base':>4}{0:>7.0f}  {'':<8}{'':>12}  {base.row()}")
        start = time.perf_counter()
        for i in range(restarts):
            await soak.cycle_work()
            await asyncio.sleep(
                max(0.0, start + (i + 1) * args.restart_every - time.perf_counter())
            )
            before = await soak.sample()
            sig = signals[i % len(signals)]
            recovered = await soak.restart_agent(sig)
            elapsed = time.perf_counter() - start
            print(
                f"{i + 1:>4}{elapsed:>7.0f}  {sig.name:<8}{recovered:>12.2f}  {before.row()}"
                "  (before the restart)"
            )
        await soak.cycle_work()
        await asyncio.sleep(SETTLE_S)
        end = await soak.sample()
        elapsed = time.perf_counter() - start
        print(f"{'end':>4}{elapsed:>7.0f}  {'':<8}{'':>12}  {end.row()}")
        print(
            f"viewers: {soak.viewers_ok} got the RFB banner, {soak.viewers_failed} failed;"
            f" {len(soak.ids)} sessions running"
        )
        rss_allowed = max(RSS_SLACK_MIB, base.rss_mib * RSS_SLACK_SHARE)
        print(verdict("files", base.files, end.files, end.files <= base.files + SLACK["files"]))
        print(verdict("tasks", base.tasks, end.tasks, end.tasks <= base.tasks + SLACK["tasks"]))
        print(
            verdict(
                "threads", base.threads, end.threads, end.threads <= base.threads + SLACK["threads"]
            )
        )
        print(
            verdict(
                "RSS",
                round(base.rss_mib, 1),
                round(end.rss_mib, 1),
                end.rss_mib <= base.rss_mib + rss_allowed,
                " MiB",
            )
        )
        soak.log.flush()
        text = (root / "processes.log").read_text(errors="replace")
        print(
            f"control plane and agent log: {text.count('ERROR')} ERROR lines,"
            f" {text.count('Traceback')} tracebacks"
        )
    finally:
        await soak.close()
        if database is not None:
            await drop_database(database)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    duration = TypeAdapter(Duration).validate_python
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--restart-every", type=duration, default=60.0, help="e.g. 60s, 1m")
    parser.add_argument("--duration", type=duration, default=600.0, help="e.g. 10m, 90s")
    parser.add_argument("--signal", choices=("term", "kill", "both"), default="both")
    parser.add_argument("--churn", type=int, default=5, help="sessions replaced per cycle")
    parser.add_argument("--viewers", type=int, default=5, help="VNC viewers opened per cycle")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL on 127.0.0.1:5432")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if shutil.which("Xvnc") is None:
        raise SystemExit("Xvnc not found: apt-get install tigervnc-standalone-server")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
