"""What one control-plane process holds under thousands of agents, and how it recovers.

Starts ``streamspace-controlplane serve`` as its own process (SQLite, memory hub; with
``--postgres`` a PostgreSQL database made for the run and dropped after it) and connects
``--agents`` simulated agents from this process (``_simagent.py``: the real protocol, as
models of ``streamspace_sdk.protocol``, over real WebSockets, reconnecting with the SDK's
own ``Backoff``). With a ``cut`` storm they connect through the SDK's ``TcpBalancer``, run
in a process of its own (this script with ``--balancer``), as they would through a Service.
Then, each figure with the baseline it is printed against, from the same run:

- **first registration**: every agent's connection loop started at once; the time until
  each one has been welcomed (p50, p99, all). The baseline of the storms below.
- **held**: agents online and sessions running in that one process (``--sessions``
  created over REST and placed by its scheduler), its resident memory idle, with the
  agents and with the sessions: memory per connection is the RSS added by the agents
  divided by their number; its CPU, open files and threads at a steady heartbeat.
- **command round trip**: ``PATCH /api/v1/sessions/{id}`` until the agent holds the
  command, and until the session's event stream reports the new state; p50 and p99,
  against ``GET /health`` on the same server (a no-op over the same path).
- **creation burst**: ``--burst`` ``POST /api/v1/sessions`` at once: the statuses (201; 429
  with ``Retry-After`` as the concurrent-start limit ``MAX_CONCURRENT_STARTS`` answers; 429
  without it; other errors) and their latencies, against one creation at a time; refused
  requests retried after ``Retry-After`` until all are created, and the time until all run.
- **reconnect storms** (``--storm``): ``cut`` resets every agent socket at once
  (``TcpBalancer.cut()``); ``restart`` SIGKILLs the control plane and starts it again on
  the same store and port. The time until every agent has registered again, with the
  per-agent p50 and p99, against the first registration; dials that failed meanwhile;
  agents and sessions the control plane shows afterwards.

Usage: ``python bench/controlplane.py [--agents 5000] [--sessions 10000] [--samples 300]
[--burst 1000] [--storm cut,restart] [--max-concurrent-starts N] [--postgres]
[--backoff-reset 60]``.
Develop with ``--agents 200 --sessions 400 --samples 50 --burst 200``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import (
    ControlPlane,
    create_database,
    create_session,
    drop_database,
    in_batches,
    proc_cpu_s,
    proc_fds,
    proc_status_mib,
    proc_threads,
    quantiles,
    raise_fd_limit,
    stop_process,
    wait_running,
)
from _simagent import Fleet

from streamspace_sdk.agent import Backoff, event_loop_factory
from streamspace_sdk.testing import TcpBalancer

USER = "bench"
TEMPLATE = {"name": "bench", "display_name": "Bench", "platform": "memory"}
BODY = {"template": TEMPLATE["name"], "user": USER}
SCRIPT = str(Path(__file__).resolve())
WAIT_S = 900.0
"""Bound on every wait for agents or sessions; thousands on two cores take minutes."""
HOLD_WINDOW_S = 10.0
"""How long the steady state (heartbeats only) is watched for CPU."""
MS = 1000
BASELINE_CREATIONS = 20
"""Sessions created one at a time before the burst, for its baseline."""


# -- the balancer (its own process) --------------------------------------------------------


async def serve_balancer(backend_port: int) -> None:
    """Forward to the control plane; print the port, and ``cut N`` at every SIGUSR1."""
    async with TcpBalancer([("127.0.0.1", backend_port)], connect_timeout_s=10) as lb:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, lambda: print(f"cut {lb.cut()}", flush=True))
        print(f"port {lb.port}", flush=True)
        await stop.wait()


class Balancer:
    """This script's ``--balancer`` mode as a child process."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port

    @classmethod
    async def start(cls, backend_port: int) -> Balancer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, SCRIPT, "--balancer", str(backend_port), stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        line = (await proc.stdout.readline()).decode().split()
        if line[:1] != ["port"]:
            raise SystemExit("the balancer did not start")
        return cls(proc, int(line[1]))

    async def cut(self) -> int:
        """Reset every connection through it; return how many were open."""
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGUSR1)
        return int((await self.proc.stdout.readline()).split()[1])


# -- REST ----------------------------------------------------------------------------------


async def agents_online(http: httpx.AsyncClient) -> int:
    r = await http.get("/api/v1/agents")
    r.raise_for_status()
    return sum(1 for a in r.json() if a["status"] == "online")


def spread(values: list[float]) -> str:
    p50, p99 = quantiles(values)
    return f"p50 {p50:6.2f} s  p99 {p99:6.2f} s  all {max(values):6.2f} s"


# -- phases --------------------------------------------------------------------------------


async def first_registration(fleet: Fleet, count: int) -> float:
    fleet.mark()
    t0 = time.perf_counter()
    fleet.start()
    await fleet.wait_registered(count, WAIT_S)
    elapsed = time.perf_counter() - t0
    times = [s.registered_at - t0 for s in fleet.agents.values() if s.registered_at is not None]
    print(f"first registration of {count} agents   {spread(times)}")
    print(f"  dials that failed                 {fleet.failed_dials}")
    return elapsed


async def commands(http: httpx.AsyncClient, fleet: Fleet, ids: list[str], samples: int) -> None:
    health = []
    for _ in range(samples):
        t0 = time.perf_counter()
        (await http.get("/health")).raise_for_status()
        health.append(time.perf_counter() - t0)
    to_agent: list[float] = []
    to_state: list[float] = []
    for sid in ids[:samples]:
        async with http.stream("GET", f"/api/v1/sessions/{sid}/events") as events:
            delivered = fleet.expect(sid, "hibernate")
            t0 = time.perf_counter()
            r = await http.patch(f"/api/v1/sessions/{sid}", json={"state": "hibernated"})
            r.raise_for_status()
            async for line in events.aiter_lines():
                if line.startswith("data:") and '"state":"hibernated"' in line:
                    break
            to_state.append(time.perf_counter() - t0)
            async with asyncio.timeout(30):
                to_agent.append(await delivered - t0)
    h50, h99 = quantiles(health)
    a50, a99 = quantiles(to_agent)
    s50, s99 = quantiles(to_state)
    print(f"command round trip, x{len(to_state)} (hibernate)")
    print(f"  baseline GET /health    p50 {h50 * MS:7.2f} ms  p99 {h99 * MS:7.2f} ms")
    print(
        f"  PATCH -> agent command  p50 {a50 * MS:7.2f} ms  p99 {a99 * MS:7.2f} ms"
        f"  ({a50 / h50:.1f}x / {a99 / h99:.1f}x baseline)"
    )
    print(
        f"  PATCH -> new state      p50 {s50 * MS:7.2f} ms  p99 {s99 * MS:7.2f} ms"
        f"  ({s50 / h50:.1f}x / {s99 / h99:.1f}x baseline)"
    )


async def burst(cp: ControlPlane, size: int, running_before: int) -> int:
    """Time creations one at a time (the baseline), then fire ``size`` at once; report what
    they got, and retry the refused after their ``Retry-After``. Return how many sessions
    run at the end (``running_before`` ran before)."""
    http = await cp.admin(timeout_s=WAIT_S, connections=size)
    one_at_a_time = [(await create_session(http, BODY))[1] for _ in range(BASELINE_CREATIONS)]
    running_before += BASELINE_CREATIONS
    outcomes: dict[str, list[float]] = collections.defaultdict(list)
    retry_after: list[float] = []
    created: list[str] = []

    async def post() -> str | None:
        """One creation; return its Retry-After when refused with one."""
        t0, code = time.perf_counter(), ""
        try:
            r = await http.post("/api/v1/sessions", json=BODY)
        except httpx.HTTPError as exc:
            outcomes[f"error {type(exc).__name__}"].append(time.perf_counter() - t0)
            return None
        elapsed = time.perf_counter() - t0
        if r.status_code == 201:
            created.append(str(r.json()["id"]))
            outcomes["201"].append(elapsed)
        elif r.status_code == 429 and "Retry-After" in r.headers:
            outcomes["429 + Retry-After"].append(elapsed)
            return r.headers["Retry-After"]
        else:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                code = str(r.json()["error"]["code"])
            outcomes[f"{r.status_code} {code}".strip()].append(elapsed)
        return None

    try:
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(post() for _ in range(size)))
        answered_s = time.perf_counter() - t0
        retry_after = [float(a) for a in answers if a is not None]
        first = {k: list(v) for k, v in outcomes.items()}
        print(
            f"creation burst: {size} POST /api/v1/sessions at once, answered in {answered_s:.2f} s"
        )
        b50, b99 = quantiles(one_at_a_time)
        print(f"  baseline, one at a time  p50 {b50 * MS:7.1f} ms  p99 {b99 * MS:7.1f} ms")
        for status, times in sorted(first.items()):
            p50, p99 = quantiles(times)
            print(f"  {status:<22} {len(times):>6}  p50 {p50 * MS:7.1f} ms  p99 {p99 * MS:7.1f} ms")
        if retry_after:
            print(f"  Retry-After              {min(retry_after):g} .. {max(retry_after):g} s")
        errors = sum(len(v) for k, v in first.items() if not k.startswith(("201", "429 + ")))
        print(f"  errors (not 201, not 429 with Retry-After): {errors}")

        rounds = 0
        while retry_after and rounds < 100:
            rounds += 1
            await asyncio.sleep(max(retry_after))
            retry_after = [
                float(a) for a in await asyncio.gather(*(post() for _ in retry_after)) if a
            ]
        accepted_s = time.perf_counter() - t0
        lost = size - len(created)
        print(
            f"  retried after Retry-After: all but {lost} created in {accepted_s:.2f} s"
            f" ({rounds} rounds)"
        )
        later = {k: len(v) - len(first.get(k, ())) for k, v in outcomes.items()}
        later_errors = {k: n for k, n in later.items() if n and not k.startswith(("201", "429 + "))}
        shown = f" {later_errors}" if later_errors else ""
        print(f"  errors while retrying: {sum(later_errors.values())}{shown}")
        running = await wait_running(http, running_before + len(created), WAIT_S)
        print(
            f"  burst to all running: {time.perf_counter() - t0:.2f} s"
            f" ({running - running_before} / {len(created)} running)"
        )
        return running
    finally:
        await http.aclose()


async def storm(
    kind: str,
    cp: ControlPlane,
    balancer: Balancer | None,
    fleet: Fleet,
    http: httpx.AsyncClient,
    baseline_s: float,
    sessions: int,
) -> None:
    count = len(fleet.agents)
    # Storms come after a long stable run, when every agent's backoff starts from its first
    # step: wait until each connection has lasted the SDK's reset_after_s.
    youngest = max(s.registered_at or 0.0 for s in fleet.agents.values())
    await asyncio.sleep(max(0.0, youngest + fleet.backoff.reset_after_s + 1 - time.perf_counter()))
    online, dials = len(fleet.online), fleet.failed_dials
    fleet.mark()
    t0 = time.perf_counter()
    starting: asyncio.Task[float] | None = None
    if kind == "cut":
        assert balancer is not None
        links = await balancer.cut()
        what = f"{links} connections cut at the balancer"
    else:
        await cp.kill()
        starting = asyncio.create_task(cp.start())  # agents may register before /ready
    await fleet.wait_registered(count, WAIT_S)
    if starting is not None:
        what = f"control plane SIGKILLed; the new one's /ready 200 after {await starting:.2f} s"
    times = [s.registered_at - t0 for s in fleet.agents.values() if s.registered_at is not None]
    recovery_s = max(times)
    print(f"reconnect storm '{kind}': {online} agents online; {what}")
    print(
        f"  all {count} registered again in  {recovery_s:6.2f} s"
        f"  ({recovery_s / baseline_s:.2f}x first registration, {baseline_s:.2f} s)"
    )
    print(f"  per agent                         {spread(times)}")
    print(f"  dials that failed                 {fleet.failed_dials - dials}")
    listed = await agents_online(http)
    running = await wait_running(http, sessions, WAIT_S)
    print(f"  control plane lists {listed} online; {running} / {sessions} sessions running")


async def run(args: argparse.Namespace) -> None:
    raise_fd_limit()
    root = Path(tempfile.mkdtemp(prefix="ss-bench-cp-"))
    log = (root / "controlplane.log").open("wb")
    database = await create_database() if args.postgres else None
    quota = args.sessions + args.burst + BASELINE_CREATIONS
    env = {"MAX_SESSIONS_PER_USER": str(quota)}
    if args.max_concurrent_starts is not None:
        env["MAX_CONCURRENT_STARTS"] = str(args.max_concurrent_starts)
    cp = ControlPlane(root / "cp", log, database=database, env=env)
    storms = [s for s in args.storm.split(",") if s]
    balancer: Balancer | None = None
    fleet: Fleet | None = None
    http: httpx.AsyncClient | None = None
    try:
        await cp.start()
        if "cut" in storms:
            balancer = await Balancer.start(cp.port)
        http = await cp.admin()
        (await http.post("/api/v1/templates", json=TEMPLATE)).raise_for_status()
        user = {"username": USER, "password": "bench-password", "role": "user"}
        (await http.post("/api/v1/users", json=user)).raise_for_status()
        store = "PostgreSQL" if database else "SQLite"
        via = f", agents through a TcpBalancer on :{balancer.port}" if balancer else ""
        print(f"control plane on {store}, memory hub{via}; {args.agents} simulated agents")

        fleet = Fleet(
            f"ws://127.0.0.1:{balancer.port if balancer else cp.port}",
            Backoff(reset_after_s=args.backoff_reset),
            seed=args.seed,
        )
        per_agent = -(-quota // args.agents) + 1
        admin = http

        async def token(i: int) -> tuple[str, str]:
            agent_id = f"load-{i:05d}"
            r = await admin.post(f"/api/v1/agents/{agent_id}/tokens")
            r.raise_for_status()
            return agent_id, str(r.json()["token"])

        for agent_id, tok in await in_batches((token(i) for i in range(args.agents)), 64):
            fleet.add(agent_id, tok, max_sessions=per_agent)
        await asyncio.sleep(1)  # let the token burst's garbage settle before the idle figure
        rss_idle = proc_status_mib(cp.pid)
        baseline_s = await first_registration(fleet, args.agents)
        await asyncio.sleep(2)
        rss_agents = proc_status_mib(cp.pid)

        t0 = time.perf_counter()
        made = await in_batches((create_session(http, BODY) for _ in range(args.sessions)), 32)
        ids = [sid for sid, _elapsed in made]
        running = await wait_running(http, len(ids), WAIT_S)
        place_s = time.perf_counter() - t0
        rss_sessions = proc_status_mib(cp.pid)

        beats, cpu = fleet.beats, proc_cpu_s(cp.pid)
        await asyncio.sleep(HOLD_WINDOW_S)
        beat_rate = (fleet.beats - beats) / HOLD_WINDOW_S
        cpu_share = (proc_cpu_s(cp.pid) - cpu) / HOLD_WINDOW_S
        online = await agents_online(http)
        per_conn = (rss_agents - rss_idle) * 1024 / args.agents
        per_session = (rss_sessions - rss_agents) * 1024 / max(1, running)
        print(
            f"held by one process: {online} / {args.agents} agents online,"
            f" {running} / {len(ids)} sessions running"
        )
        print(f"  create + place + start sessions   {place_s:.1f} s")
        print(
            f"  RSS idle {rss_idle:.0f} MiB, with agents {rss_agents:.0f} MiB, with sessions"
            f" {rss_sessions:.0f} MiB"
        )
        print(f"  memory per agent connection       {per_conn:.1f} KiB")
        print(f"  memory per session                {per_session:.1f} KiB")
        print(
            f"  steady heartbeat: {beat_rate:.0f} beats/s, control plane CPU"
            f" {cpu_share * 100:.0f}% of a core, {proc_fds(cp.pid)} open files,"
            f" {proc_threads(cp.pid)} threads"
        )

        await commands(http, fleet, ids, args.samples)
        total = running - min(args.samples, len(ids))  # the samples hibernated
        if args.burst:
            total = await burst(cp, args.burst, total)
        for kind in storms:
            await storm(kind, cp, balancer, fleet, http, baseline_s, total)
        log.flush()
        text = (root / "controlplane.log").read_text(errors="replace")
        print(
            f"control plane log: {text.count('ERROR')} ERROR lines,"
            f" {text.count('Traceback')} tracebacks"
        )
    except BaseException:
        log.flush()
        tail = (root / "controlplane.log").read_text(errors="replace").splitlines()[-30:]
        print("the control plane's last log lines:", *tail, sep="\n  ", file=sys.stderr)
        raise
    finally:
        if fleet is not None:
            await fleet.stop()
        if http is not None:
            await http.aclose()
        if balancer is not None:
            await stop_process(balancer.proc)
        await cp.stop()
        log.close()
        if database is not None:
            await drop_database(database)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=10000)
    parser.add_argument("--samples", type=int, default=300, help="command round trips")
    parser.add_argument("--burst", type=int, default=1000, help="creations at once; 0: none")
    parser.add_argument("--storm", default="cut,restart", help="storms to run: cut, restart")
    parser.add_argument(
        "--max-concurrent-starts", type=int, help="MAX_CONCURRENT_STARTS (default: the server's)"
    )
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL on 127.0.0.1:5432")
    parser.add_argument("--seed", type=int, default=0, help="seed of the agents' jitter")
    parser.add_argument(
        "--backoff-reset",
        type=float,
        default=Backoff().reset_after_s,
        help="seconds a connection lasts before its backoff starts again (the SDK's: 60); "
        "each storm first waits that long after the last registration",
    )
    parser.add_argument("--balancer", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.balancer is not None:
        # asyncio's loop: under uvloop, TcpBalancer's write_eof on a transport the other
        # side reset raises RuntimeError where asyncio's returns quietly.
        asyncio.run(serve_balancer(args.balancer))
        return
    if not set(args.storm.split(",")) <= {"cut", "restart", ""}:
        parser.error("--storm takes cut, restart or both")
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:  # as agents run
        runner.run(run(args))


if __name__ == "__main__":
    main()
