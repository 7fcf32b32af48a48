"""What the benchmarks share: ports, percentiles, process memory, child processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
from pathlib import Path

import httpx


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


async def wait_ready(url: str, proc: asyncio.subprocess.Process, what: str) -> None:
    """Wait until ``url`` answers 200; exit the benchmark if ``proc`` dies or 60 s pass."""
    async with httpx.AsyncClient(timeout=2) as http:
        for _ in range(600):
            if proc.returncode is not None:
                raise SystemExit(f"{what} exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)  # a separate process: nothing to await but its port
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
