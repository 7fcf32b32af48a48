"""The load, soak and failover benchmarks, run at sizes CI can afford.

Each script runs as a user would run it, in its own process, and its printed figures are
read back. What is asserted is what must hold at any size: every agent and session held,
a burst answered with 201 or 429 + ``Retry-After`` and never an error, every agent back
after each storm, files, tasks and threads back to baseline after restarts, a failover
within its bound, no ERROR in any log. Speeds are printed, not asserted: they belong to
full-size runs on a quiet machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1]
TIMEOUT_S = 420


def run(script: str, *args: str) -> str:
    """Run ``bench/<script>`` with ``args``; return what it printed (it must exit 0)."""
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    out = done.stdout + done.stderr
    print(out)  # the figures, in the test's output
    assert done.returncode == 0, f"{script} exited with {done.returncode}:\n{out[-4000:]}"
    return out


def figure(pattern: str, text: str) -> tuple[str, ...]:
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"no line matching {pattern!r} in:\n{text}"
    return found.groups()


def test_load_holds_every_agent_and_sheds_a_burst_with_429() -> None:
    agents, sessions, burst = 100, 100, 100
    out = run(
        "controlplane.py",
        f"--agents={agents}",
        f"--sessions={sessions}",
        "--samples=10",
        f"--burst={burst}",
        "--max-concurrent-starts=20",
        "--storm=cut,restart",
        "--backoff-reset=5",
    )
    held = figure(r"held by one process: (\d+) / (\d+) agents online, (\d+) / (\d+) sessions", out)
    assert held == (str(agents), str(agents), str(sessions), str(sessions))
    created, refused = (
        int(figure(r"^\s+201\s+(\d+)", out)[0]),
        int(figure(r"^\s+429 \+ Retry-After\s+(\d+)", out)[0]),
    )
    assert created + refused == burst
    assert refused > 0  # 20 may start at once: a burst of 100 is shed, not queued
    assert figure(r"errors \(not 201, not 429 with Retry-After\): (\d+)", out) == ("0",)
    assert figure(r"all but (\d+) created", out) == ("0",)
    assert figure(r"errors while retrying: (\d+)", out) == ("0",)
    assert figure(r"burst to all running: [\d.]+ s \((\d+) / (\d+) running\)", out) == (
        str(burst),
        str(burst),
    )
    for storm in ("cut", "restart"):
        back = figure(rf"reconnect storm '{storm}'.*\n\s+all (\d+) registered again", out)
        assert back == (str(agents),)
    assert out.count(f"control plane lists {agents} online") == 2
    assert figure(r"control plane log: (\d+) ERROR lines, (\d+) tracebacks", out) == ("0", "0")


def test_soak_returns_to_baseline_after_agent_restarts() -> None:
    out = run("soak.py", "--sessions=10", "--duration=30s", "--restart-every=12s")
    for name in ("files", "tasks", "threads", "RSS"):
        assert re.search(rf"^{name}\s.*back to baseline$", out, re.MULTILINE), name
    viewers = figure(r"viewers: \d+ got the RFB banner, (\d+) failed; (\d+) sessions", out)
    assert viewers == ("0", "10")
    logged = figure(r"control plane and agent log: (\d+) ERROR lines, (\d+) tracebacks", out)
    assert logged == ("0", "0")


def test_a_replica_failover_is_within_its_bound() -> None:
    out = run(
        "multipod.py",
        "--starts=4",
        "--stream-mib=2",
        "--repeat=1",
        "--echoes=20",
        "--failovers=1",
        "--replica-timeout=3",
    )
    worst = float(figure(r"to running .* max ([\d.]+) s", out)[0])
    bound = float(figure(r"bound 4/3 REPLICA_TIMEOUT \+ 1 s = ([\d.]+) s", out)[0])
    assert worst <= bound


@pytest.mark.parametrize("backend", ["redis"])  # e2e/test_ha_e2e.py runs every backend
def test_an_agent_leader_failover_is_within_its_bound(backend: str) -> None:
    out = run("failover.py", "--runs=1", f"--backends={backend}")
    lease = figure(r"'LEASE_DURATION': '(\d+)s'.*'RETRY_PERIOD': '(\d+)ms'", out)
    bound = int(lease[0]) + int(lease[1]) / 1000
    worst = float(figure(rf"^{backend}: crash .* max\s+([\d.]+) s", out)[0])
    assert worst <= bound + 2.0  # the new leader's dial and registration come on top
